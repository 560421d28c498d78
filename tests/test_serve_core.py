"""`sdxl serve`'s core on a tiny model: the native API round trip, the CLI's image, progress, cancel/skip, the
models folder, restart after SIGKILL and many concurrent clients."""

import base64
import hashlib
import io
import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_fixtures import FAST, live_server, served, served_process, tiny_models  # noqa: F401  (fixtures)

from sdxl.cli import main
from sdxl.errors import SDXLError
from sdxl.request import NOT_SETTINGS, Request
from sdxl.serve.app import open_jobs
from sdxl.serve.models import ModelsFolder
from sdxl.adapters.tags import LoraUse, split_loras

SLOW = {"steps": 400, "width": 64, "height": 64}  # long enough to be caught running


def png(live, url: str) -> Image.Image:
    r = httpx.get(live.url + url, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def wait_running(live, job_id: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        d = httpx.get(f"{live.url}/v1/jobs/{job_id}", timeout=30).json()
        if d["state"] == "running" and d["step"] >= 1:
            return d
        time.sleep(0.02)
    raise TimeoutError(job_id)


def test_round_trip(served):
    job_id = served.submit(prompt="a red circle", negative_prompt="blue", seed=3, **FAST)
    d = served.wait(job_id)
    assert d["state"] == "done" and d["step"] == d["total"] == 2 and d["error"] is None
    assert d["seeds"] == [3] and d["prompts"] == ["a red circle"] and (d["width"], d["height"]) == (64, 64)
    im = png(served, d["images"][0])
    assert im.size == (64, 64) and im.info["parameters"] == d["infotexts"][0]
    assert im.info["parameters"].startswith("a red circle\nNegative prompt: blue\nSteps: 2")
    assert "Seed: 3," in im.info["parameters"] and "Model: tiny" in im.info["parameters"]
    assert json.loads(im.info["sdxl-recipe"])["seed"] == 3


def test_random_seed_is_fixed_at_submit(served):
    d = served.wait(served.submit(prompt="a dot", seed=-1, **FAST))
    assert d["state"] == "done" and 0 <= d["seeds"][0] < 2**32 and f"Seed: {d['seeds'][0]}," in d["infotexts"][0]


def test_served_image_equals_cli(served, tiny_models, tmp_path, capsys):
    d = served.wait(served.submit(prompt="a green square", seed=11, cfg=4.0, sampler="dpmpp_2m", batch=2, **FAST))
    out = tmp_path / "cli.png"
    code = main(["generate", "a green square", "--model", str(tiny_models / "checkpoints" / "tiny.safetensors"),
                 "--seed", "11", "--cfg", "4", "--sampler", "dpmpp_2m", "--batch", "2", "--steps", "2", "--width",
                 "64", "--height", "64", "--dtype", "fp32", "--device", "cpu", "-q", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    for i in range(2):
        served_im, cli_im = png(served, d["images"][i]), Image.open(tmp_path / f"cli-{i}.png")
        assert np.array_equal(np.asarray(served_im), np.asarray(cli_im))
        assert served_im.info["parameters"] == cli_im.info["parameters"]


def test_n_iter_advances_the_seed_by_batch(served):
    d = served.wait(served.submit(prompt="two runs", seed=100, batch=2, n_iter=2, **FAST))
    assert d["state"] == "done" and d["seeds"] == [100, 101, 102, 103] and d["total"] == 4
    assert [f"Seed: {s}," in t for s, t in zip(d["seeds"], d["infotexts"])] == [True] * 4


def test_lora_tag_in_prompt_loads_the_lora(served):
    plain = served.wait(served.submit(prompt="a cat", seed=5, **FAST))
    tagged = served.wait(served.submit(prompt="a cat <lora:style:0.8>", seed=5, **FAST))
    assert tagged["state"] == "done" and tagged["prompts"] == ["a cat"]
    recipe = json.loads(png(served, tagged["images"][0]).info["sdxl-recipe"])
    assert recipe["prompt"] == "a cat <lora:style:0.8>" and list(recipe["lora_hashes"]) == ["style"]
    a, b = (np.asarray(png(served, d["images"][0])) for d in (plain, tagged))
    assert not np.array_equal(a, b)
    missing = httpx.post(served.url + "/v1/jobs", json={"prompt": "a cat <lora:nope:1>", **FAST})
    assert missing.status_code == 422 and "'nope'" in missing.json()["detail"] and "style" in missing.json()["detail"]


def test_split_loras():
    assert split_loras("a cat <lora:style:0.8>, sitting <lora:sub/x>") == (
        "a cat, sitting", (LoraUse("style", None, 0.8, 0.8), LoraUse("sub/x")))
    assert split_loras("no tags (word:1.2)") == ("no tags (word:1.2)", ())
    with pytest.raises(SDXLError, match="must be a number"):
        split_loras("<lora:style:strong>")


def test_cli_lora_tag_equals_served(served, tiny_models, tmp_path, capsys):
    d = served.wait(served.submit(prompt="a dog <lora:style:0.5>", seed=8, **FAST))
    out = tmp_path / "cli.png"
    code = main(["generate", "a dog <lora:style:0.5>", "--model", str(tiny_models / "checkpoints" / "tiny.safetensors"),
                 "--seed", "8", "--steps", "2", "--width", "64", "--height", "64", "--dtype", "fp32", "--device", "cpu",
                 "-q", "-o", str(out), "--lora-dir", str(tiny_models / "loras")])
    assert code == 0, capsys.readouterr().err
    cli_im = Image.open(out)
    data = (tiny_models / "loras" / "style.safetensors").read_bytes()  # A1111's hash: the bytes after the header
    lora_hash = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    # as A1111 writes it: the tag in the prompt, the file's hash in `Lora hashes`
    assert cli_im.info["parameters"].startswith("a dog <lora:style:0.5>\n")
    assert f'Lora hashes: "style: {lora_hash}"' in cli_im.info["parameters"]
    assert cli_im.info["parameters"] == d["infotexts"][0]
    assert json.loads(cli_im.info["sdxl-recipe"])["lora_hashes"] == {"style": lora_hash}
    assert np.array_equal(np.asarray(png(served, d["images"][0])), np.asarray(cli_im))
    # the recipe replays through the CLI with the LoRA applied (a LoRA-free run differs)
    for flags, name in (([], "again.png"), (["a dog"], "zero.png")):
        assert main(["generate", "--from-png", str(out), *flags, "-q", "-o", str(tmp_path / name)]) == 0
    again, zero = (Image.open(tmp_path / n) for n in ("again.png", "zero.png"))
    assert np.array_equal(np.asarray(again), np.asarray(cli_im)) and again.info["parameters"] == cli_im.info[
        "parameters"]
    assert not np.array_equal(np.asarray(zero), np.asarray(cli_im))
    # the infotext's prompt, sent back to the server (a dropped PNG, A1111's "send to txt2img"), loads it again
    prompt = cli_im.info["parameters"].split("\n")[0]
    d2 = served.wait(served.submit(prompt=prompt, seed=8, **FAST))
    assert np.array_equal(np.asarray(png(served, d2["images"][0])), np.asarray(cli_im))


def test_progress_preview_and_cancel_running(served):
    job_id = served.submit(prompt="long", seed=1, **SLOW)
    queued = served.submit(prompt="queued", seed=2, **SLOW)
    d = wait_running(served, job_id)
    assert d["total"] == 400 and 1 <= d["step"] < 400 and d["job_count"] == 2
    preview = Image.open(io.BytesIO(base64.b64decode(d["preview"])))
    assert preview.mode == "RGB" and preview.size == (64, 64)  # a small latent, decoded by the (tiny) VAE
    assert httpx.get(f"{served.url}/v1/jobs/{queued}").json()["state"] == "queued"
    assert httpx.delete(f"{served.url}/v1/jobs/{queued}").json()["state"] == "cancelled"
    httpx.delete(f"{served.url}/v1/jobs/{job_id}")
    d = served.wait(job_id)
    assert d["state"] == "cancelled" and d["step"] < 400 and d["images"] == []
    assert httpx.delete(f"{served.url}/v1/jobs/nope").status_code == 404


def test_skip_abandons_the_current_run(served):
    job_id = served.submit(prompt="skipped", seed=50, n_iter=2, **(SLOW | {"steps": 20}))
    wait_running(served, job_id)
    served.app.state.jobs.skip()
    d = served.wait(job_id)
    assert d["state"] == "done" and d["seeds"] == [51]  # run 0 (seed 50) skipped, run 1 done


def test_server_sent_events(served):
    job_id = served.submit(prompt="streamed", seed=9, **(FAST | {"steps": 4}))
    events = []
    with httpx.stream("GET", f"{served.url}/v1/jobs/{job_id}/events", timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: "):
                events[-1] = (events[-1], json.loads(line[6:]))
    assert events[-1][0] == "done" and events[-1][1]["state"] == "done" and events[-1][1]["seeds"] == [9]
    steps = [d["step"] for kind, d in events if kind == "progress"]
    assert steps == sorted(steps) and len(events) >= 2


def test_openapi_schema_documents_every_request_field(served):
    schema = httpx.get(served.url + "/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    settings = {f for f in Request.__dataclass_fields__ if f not in NOT_SETTINGS}
    assert settings | {"model", "refiner", "vae", "loras", "init_image", "mask", "n_iter"} == set(body["properties"])
    assert all(p["description"] for p in body["properties"].values())
    assert "multiple of 8" in body["properties"]["width"]["description"]
    assert body["properties"]["steps"]["type"] == "integer" and body["required"] == ["prompt"]
    assert {"get", "delete"} <= set(schema["paths"]["/v1/jobs/{job_id}"])
    assert "/v1/jobs/{job_id}/events" in schema["paths"]


def test_img2img_with_mask(served):
    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    d = served.wait(served.submit(prompt="paint", seed=4, steps=2, init_image="data:image/png;base64," + b64(init),
                                  mask=b64(mask)))
    assert d["state"] == "done" and (d["width"], d["height"]) == (64, 64)
    a = np.asarray(png(served, d["images"][0])).astype(int)
    assert np.abs(a[:, 40:] - [200, 30, 30]).max() <= 3  # the unmasked half kept


def test_models_folder_listing_and_names(tiny_models, tmp_path):
    root = tmp_path / "models"
    (root / "Stable-diffusion" / "sub").mkdir(parents=True)
    (root / "Lora").mkdir()
    os.link(tiny_models / "checkpoints" / "tiny.safetensors", root / "Stable-diffusion" / "sub" / "base.safetensors")
    (root / "Stable-diffusion" / "old.ckpt").write_bytes(b"\x80\x02pickle")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (root / "Lora" / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    m = ModelsFolder(root, "cpu", "fp32")
    listed = {f.name: f for f in m.list("checkpoints")}
    assert set(listed) == {"old.ckpt", "sub/base.safetensors"} and m.current == "sub/base.safetensors"
    assert listed["old.ckpt"].refused and "pickle" in listed["old.ckpt"].refused
    assert len(listed["sub/base.safetensors"].hash) == 10 and m.list("loras") == []  # the symlink out is not listed
    assert m.resolve("checkpoints", "sub/base", "model").name == "base.safetensors"
    assert m.resolve("checkpoints", listed["sub/base.safetensors"].title, "model").name == "base.safetensors"
    assert m.switch("sub/base [x]") == "sub/base.safetensors" and m.current == "sub/base.safetensors"
    with pytest.raises(SDXLError, match="pickle"):
        m.switch("old.ckpt")
    for bad, words in [("old.ckpt", "pickle"), ("../x.safetensors", "not a path"), ("/etc/passwd", "not a path"),
                       ("nope", "no such file"), ("escape", "no such file")]:
        kind = "loras" if bad == "escape" else "checkpoints"
        with pytest.raises(SDXLError, match=words):
            m.resolve(kind, bad, "model")


@pytest.mark.parametrize("layout", [None, "loras-only"])
def test_without_a_checkpoint_the_default_model_is_served(tiny_models, tmp_path, layout):
    from sdxl.default_model import default_model_paths

    if layout:
        (tmp_path / "Lora").mkdir()
        os.link(tiny_models / "loras" / "style.safetensors", tmp_path / "Lora" / "style.safetensors")
    m = ModelsFolder(tmp_path if layout else None, "cpu", "fp32")
    assert [c.name for c in m.list("checkpoints")] == ["default"] and m.current == "default"
    chosen, info = m.models(None, None, None, ()), default_model_paths()
    assert (chosen.model, chosen.refiner) == (str(info["base"]), str(info["refiner"])) and chosen.default_refiner
    assert chosen.native["resolution"] == info["resolution"]
    off = m.models(None, "none", None, ())  # a request's refiner "none": not even the built-in one
    assert (off.model, off.refiner, off.default_refiner) == (str(info["base"]), None, False)


def test_default_model_refiner_none_equals_the_cli_without_refiner(tmp_path, capsys):
    """POST /v1/jobs with refiner "none" runs the default model without its built-in refiner, the image the CLI
    makes with --no-refiner; without the field the refiner runs (the model's default)."""
    prompt = {"prompt": "a red circle on a blue background", "seed": 1, "steps": 4, "width": 128, "height": 128}
    with live_server(tmp_path / "served") as live:
        off = live.wait(live.submit(**prompt, refiner="none"))
        on = live.wait(live.submit(**prompt))
        served_off = png(live, off["images"][0])
    assert off["state"] == on["state"] == "done"
    assert "Refiner" not in off["infotexts"][0] and "Refiner: default_refiner" in on["infotexts"][0]
    out = tmp_path / "cli.png"
    assert main(["generate", prompt["prompt"], "--seed", "1", "--steps", "4", "--width", "128", "--height", "128",
                 "--no-refiner", "--dtype", "fp32", "--device", "cpu", "-q", "-o", str(out)]) == 0, \
        capsys.readouterr().err
    cli = Image.open(out)
    assert np.array_equal(np.asarray(served_off), np.asarray(cli))
    assert served_off.info["parameters"] == cli.info["parameters"]


def test_pipelines_kept_within_the_memory_budget(tiny_models, tmp_path):
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    for name in ("a", "b"):
        os.link(tiny_models / "checkpoints" / "tiny.safetensors", root / "checkpoints" / f"{name}.safetensors")
    size = (tiny_models / "checkpoints" / "tiny.safetensors").stat().st_size
    m = ModelsFolder(root, "cpu", "fp32", budget=int(size * 1.5))  # room for one
    first = m.pipeline(m.models("a", None, None, ()), log=lambda _: None)
    assert m.pipeline(m.models("a", None, None, ()), log=lambda _: None) is first  # loaded once
    m.pipeline(m.models("b", None, None, ()), log=lambda _: None)
    assert [k[0].rsplit("/", 1)[-1] for k in m.loaded] == ["b.safetensors"]
    roomy = ModelsFolder(root, "cpu", "fp32", budget=size * 3)
    for name in ("a", "b", "a"):
        roomy.pipeline(roomy.models(name, None, None, ()), log=lambda _: None)
    assert [k[0].rsplit("/", 1)[-1] for k in roomy.loaded] == ["b.safetensors", "a.safetensors"]  # LRU order


def test_switching_model_by_request(served):
    d = served.wait(served.submit(prompt="p", seed=1, model="tiny", refiner="tiny_refiner", refiner_switch=0.5,
                                  **FAST))
    assert d["state"] == "done" and "Refiner: tiny_refiner" in d["infotexts"][0]
    models = httpx.get(served.url + "/v1/models").json()
    assert models["current"] == "tiny.safetensors"
    assert [c["name"] for c in models["checkpoints"]] == ["tiny.safetensors", "tiny_refiner.safetensors"]


def test_vae_switched_by_request(tiny_models, tmp_path):
    from conftest import randomize
    from safetensors.torch import save_file

    from sdxl.models.model import TINY_BASE, SDXLModel

    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "VAE").mkdir()
    os.link(tiny_models / "checkpoints" / "tiny.safetensors", root / "checkpoints" / "tiny.safetensors")
    vae = randomize(SDXLModel(TINY_BASE), seed=5).vae
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, root / "VAE" / "other.safetensors")
    with live_server(tmp_path / "out", root) as live:
        plain, swapped = (live.wait(live.submit(prompt="v", seed=3, **FAST, **extra)) for extra in ({}, {"vae": "other"}))
        recipes = [json.loads(png(live, d["images"][0]).info["sdxl-recipe"]) for d in (plain, swapped)]
        assert "vae" not in recipes[0]["models"] and recipes[1]["models"]["vae"].endswith("VAE/other.safetensors")
        assert not np.array_equal(*(np.asarray(png(live, d["images"][0])) for d in (plain, swapped)))
        assert [m["name"] for m in httpx.get(live.url + "/v1/models").json()["vae"]] == ["other.safetensors"]


def test_a_job_failing_at_run_time_reports_why_and_the_worker_goes_on(tiny_models, tmp_path):
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    for name in ("a", "b"):
        os.link(tiny_models / "checkpoints" / "tiny.safetensors", root / "checkpoints" / f"{name}.safetensors")
    with live_server(tmp_path / "out", root) as live:
        busy = live.submit(prompt="busy", model="a", **SLOW)
        doomed = live.submit(prompt="doomed", model="b", **FAST)
        wait_running(live, busy)
        (root / "checkpoints" / "b.safetensors").unlink()  # gone before its job runs
        httpx.delete(f"{live.url}/v1/jobs/{busy}")
        d = live.wait(doomed)
        assert d["state"] == "failed" and "'b'" in d["error"] and "no such file" in d["error"] and d["images"] == []
        assert live.wait(live.submit(prompt="after", model="a", **FAST))["state"] == "done"


def test_stopping_requeues_the_running_job_and_crash_loops_end(tiny_models, tmp_path):
    from sdxl.serve.config import ServeConfig
    from sdxl.serve.jobs import MAX_ATTEMPTS, JobSpec

    config = ServeConfig(models_dir=tiny_models, output_dir=tmp_path, device="cpu", dtype="fp32")
    _, jobs = open_jobs(config)
    running = jobs.start().submit(JobSpec({"prompt": "long", **SLOW}))
    crashing = jobs.submit(JobSpec({"prompt": "kills the server", **FAST}))
    while jobs.get(running).step < 1:
        time.sleep(0.02)
    jobs.close()  # a clean stop: the running job goes back to the queue, not counted as an attempt
    assert jobs.get(running).state == "queued" and jobs.get(crashing).state == "queued"
    jobs.db.execute("UPDATE jobs SET state='running', attempts=? WHERE id=?", (MAX_ATTEMPTS, crashing))
    jobs.db.execute("UPDATE jobs SET state='running', attempts=attempts+1 WHERE id=?", (running,))  # one crash
    jobs.db.close()
    _, jobs = open_jobs(config)
    assert jobs.get(running).state == "queued"
    d = jobs.get(crashing)
    assert d.state == "failed" and f"{MAX_ATTEMPTS} times" in d.error
    jobs.close()


def test_unusable_job_database_is_one_line(tiny_models, tmp_path):
    from sdxl.serve.config import ServeConfig

    (tmp_path / "jobs.sqlite3").write_bytes(b"not a database" * 100)
    with pytest.raises(SDXLError, match="not a usable job database"):
        open_jobs(ServeConfig(models_dir=tiny_models, output_dir=tmp_path, device="cpu", dtype="fp32"))


def test_one_server_per_output_dir(served, capsys, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    assert main(["serve", "--output-dir", str(served.config.output_dir)]) == 2
    assert "another sdxl serve is using" in capsys.readouterr().err
    with pytest.raises(SDXLError, match="another sdxl serve"):
        open_jobs(served.config)
    assert served.wait(served.submit(prompt="still served", **FAST))["state"] == "done"


def test_restart_after_sigkill_keeps_results_and_runs_the_queue(tiny_models, tmp_path):
    out = tmp_path / "out"
    with served_process(out, tiny_models) as live:
        done = live.wait(live.submit(prompt="finished first", seed=1, **FAST))
        kept = httpx.get(live.url + done["images"][0]).content
        running = live.submit(prompt="running when killed", seed=2, **(SLOW | {"steps": 40}))
        queued = [live.submit(prompt=f"queued {k}", seed=10 + k, **FAST) for k in range(3)]
        wait_running(live, running)
        os.kill(live.process.pid, signal.SIGKILL)
        live.process.wait()
    with served_process(out, tiny_models) as live:
        assert live.wait(done["id"])["state"] == "done" and httpx.get(live.url + done["images"][0]).content == kept
        for job_id, prompt, seed in [(running, "running when killed", 2)] + [
                (j, f"queued {k}", 10 + k) for k, j in enumerate(queued)]:
            d = live.wait(job_id)
            assert d["state"] == "done" and d["prompts"] == [prompt] and d["seeds"] == [seed]
            assert png(live, d["images"][0]).info["parameters"].startswith(f"{prompt}\n")
    assert sorted(p.name.split("-")[0] for p in out.glob("*.png")) == sorted([done["id"], running, *queued])


def test_sixteen_clients_four_jobs_each(served):
    results, errors = {}, []

    def client(c: int):
        try:
            with served.client() as http:
                for j in range(4):
                    prompt, seed = f"client {c} job {j}", 1000 * c + j
                    r = http.post("/v1/jobs", json={"prompt": prompt, "seed": seed, "steps": 2, "width": 32,
                                                    "height": 32})
                    results[(prompt, seed)] = served.wait(r.json()["id"], timeout=600)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 64
    for (prompt, seed), d in results.items():
        assert d["state"] == "done" and d["prompts"] == [prompt] and d["seeds"] == [seed]
        text = png(served, d["images"][0]).info["parameters"]
        assert text.startswith(prompt + "\n") and f"Seed: {seed}," in text
    assert len({d["images"][0] for d in results.values()}) == 64


def test_two_workers_share_one_queue(tiny_models, tmp_path):
    """`sdxl serve --workers 2` on CPU: two jobs run at once, every job is done exactly once with its own prompt and
    seed; two jobs with the same settings give the same image."""
    import sqlite3

    import torch

    threads = torch.get_num_threads()  # the workers split the cores (a process-wide setting): restored after
    try:
        with live_server(tmp_path, tiny_models, workers=2) as live:
            assert len(live.app.state.jobs.workers) == 2
            slow = [live.submit(prompt=f"slow {k}", seed=k, **(SLOW | {"steps": 60})) for k in range(2)]
            end = time.monotonic() + 120
            while not all(httpx.get(f"{live.url}/v1/jobs/{j}").json()["state"] == "running" for j in slow):
                assert time.monotonic() < end, "the two workers never ran two jobs at once"
                time.sleep(0.02)
            ids = {live.submit(prompt=f"job {k}", seed=100 + k % 4, **FAST): k for k in range(10)}
            twins = [live.submit(prompt="twin", seed=7, **FAST) for _ in range(2)]
            done = {j: live.wait(j) for j in [*slow, *ids, *twins]}
            done = {j: d | {"images": [live.app.state.jobs.get(j).images[0]]} for j, d in done.items()}
    finally:
        torch.set_num_threads(threads)
    assert all(d["state"] == "done" and len(d["images"]) == 1 for d in done.values())
    for job_id, k in ids.items():
        d = done[job_id]
        assert d["prompts"] == [f"job {k}"] and d["seeds"] == [100 + k % 4]
        assert d["infotexts"][0].startswith(f"job {k}\n") and f"Seed: {100 + k % 4}," in d["infotexts"][0]
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        assert db.execute("SELECT count(*), min(attempts), max(attempts) FROM jobs").fetchone() == (14, 1, 1)
    assert len(list(tmp_path.glob("*.png"))) == 14
    a, b = (np.asarray(Image.open(done[j]["images"][0]).convert("RGB")) for j in twins)
    assert np.array_equal(a, b)  # the same settings, on whichever worker


def test_worker_devices(monkeypatch, capsys):
    import uvicorn

    from sdxl.serve.app import worker_devices

    assert worker_devices("cpu", 3) == ["cpu"] * 3 and worker_devices(None, 1) in ([None], ["cuda:0"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert worker_devices(None, 3) == ["cuda:0", "cuda:1", "cuda:0"] and worker_devices("cuda", 2) == [
        "cuda:0", "cuda:1"]
    assert worker_devices("cuda:1", 2) == ["cuda:1", "cuda:1"]
    with pytest.raises(SDXLError, match="--workers 0"):
        worker_devices("cpu", 0)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("must not start"))
    assert main(["serve", "--workers", "0"]) == 2
    assert "--workers 0: give 1 or more" in capsys.readouterr().err
