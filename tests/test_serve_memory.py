"""`sdxl serve --memory-budget`: each pipeline the server loads is planned by sdxl.memory as `sdxl generate`'s is,
one pipeline is loaded at a time (the plan is for the whole budget), images equal a resident server's (fp32,
exactly: releasing weights does not change numbers), LoRAs are refused with the plan's reason, and workers sharing
a device share the budget."""

import io
import os

import numpy as np
import pytest
from PIL import Image
from conftest import run
from serve_fixtures import live_server, tiny_models  # noqa: F401 (fixture)

from sdxl import memory
from sdxl.serve.models import ModelsFolder

FAST = {"steps": 2, "width": 64, "height": 64}  # the same names in both APIs
TINY_BUDGET = "100MB"  # below every level's estimate: the last level (stream) for the tiny models


def test_each_pipeline_planned_and_one_loaded(tiny_models, tmp_path):  # noqa: F811
    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    for name in ("a", "b"):
        os.link(tiny_models / "checkpoints" / "tiny.safetensors", root / "checkpoints" / f"{name}.safetensors")
    lines = []
    m = ModelsFolder(root, "cpu", "fp32", budget=10 * memory.GiB, plan=TINY_BUDGET)
    pipe = m.pipeline(m.models("a", None, None, ()), log=lines.append)
    assert pipe.memory.plan.level == "stream" and pipe.memory.plan.budget == 100 << 20
    assert any(line.startswith("memory plan: stream for a budget of 100 MiB on cpu") for line in lines)
    m.pipeline(m.models("b", None, None, ()), log=lines.append)
    assert [k[0].rsplit("/", 1)[-1] for k in m.loaded] == ["b.safetensors"]  # never two planned pipelines


@pytest.fixture(scope="module")
def two_servers(tiny_models, tmp_path_factory):  # noqa: F811
    with live_server(tmp_path_factory.mktemp("plan"), tiny_models, memory_plan=TINY_BUDGET) as planned, \
            live_server(tmp_path_factory.mktemp("resident"), tiny_models) as resident:
        yield planned, resident


def test_planned_server_gives_the_resident_image(two_servers):
    planned, resident = two_servers
    body = {"prompt": "a red circle", "seed": 5, **FAST}
    got = [s.wait(s.submit(**body)) for s in (planned, resident)]
    assert [d["state"] for d in got] == ["done", "done"], got
    a, b = (Image.open(io.BytesIO(s.http.get(d["images"][0]).content)) for s, d in zip((planned, resident), got))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert got[0]["infotexts"] == got[1]["infotexts"]  # a plan that only releases weights is not recorded


def test_planned_server_refuses_loras_at_submit(two_servers, tiny_models):  # noqa: F811
    """A LoRA (a prompt tag or the native API's `loras`) under a plan that releases weights: 422 at once, naming
    the plan, on both APIs; nothing queued."""
    planned, _ = two_servers
    lora = next((tiny_models / "loras").glob("*.safetensors")).stem
    want = "LoRAs need the model's weights resident; the memory plan (stream) releases them"
    for path, body in (("/v1/jobs", {"prompt": f"a red circle <lora:{lora}:0.5>", **FAST}),
                       ("/v1/jobs", {"prompt": "a red circle", "loras": [[lora, 0.5]], **FAST}),
                       ("/sdapi/v1/txt2img", {"prompt": f"x <lora:{lora}:1>", **FAST})):
        r = planned.http.post(path, json=body)
        assert r.status_code == 422 and want in r.text, (path, r.status_code, r.text)
    assert planned.http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


@pytest.mark.parametrize("budget, n, share", [("8GB", 2, "4096MB"), ("medvram", 4, "2048MB"), ("6GB", 1, "6144MB"),
                                               (None, 2, None)])
def test_workers_sharing_a_device_share_the_budget(budget, n, share):
    assert memory.share(budget, "cpu", n) == share


def test_auto_budget_shared_from_the_free_memory(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda device: 10 << 30)
    assert memory.share("auto", "cpu", 4) == "2560MB"


@pytest.mark.parametrize("flags", [("--memory-budget", "6XB"), ("--memory-budget", "0GB"), ("--memory-budget", "")])
def test_serve_bad_budget_is_one_line_before_it_starts(capsys, flags):
    code, out, err = run(capsys, "serve", "--port", "1", *flags)
    assert code == 2 and err.count("\n") == 1 and "--memory-budget" in err and "give a size such as" in err


def test_unusable_checkpoints_are_listed_as_refused_and_never_current(tiny_models, tmp_path):  # noqa: F811
    """A LoRA or a damaged file in checkpoints/ is listed with the reason (as a broken LoRA is), the current model
    is the first usable one, and naming a refused one is one line (the server's 422), not a failed job."""
    from sdxl.errors import SDXLError

    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    os.link(next((tiny_models / "loras").glob("*.safetensors")), root / "checkpoints" / "a_lora.safetensors")
    (root / "checkpoints" / "b_junk.safetensors").write_bytes(b"junk!")
    os.link(tiny_models / "checkpoints" / "tiny.safetensors", root / "checkpoints" / "c_model.safetensors")
    m = ModelsFolder(root, "cpu", "fp32")
    refused = {f.name: f.refused for f in m.list("checkpoints")}
    assert refused["c_model.safetensors"] is None and m.current == "c_model.safetensors"
    assert refused["a_lora.safetensors"] and refused["b_junk.safetensors"], refused
    with pytest.raises(SDXLError, match="model 'a_lora.safetensors': refused: "):
        m.models("a_lora.safetensors", None, None, ())


def test_a_mask_of_another_size_is_refused_at_submit(two_servers):
    """The native API checks a job as the A1111 API does, at once (422), not in the queue (a failed job)."""
    import base64

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    _, resident = two_servers
    body = {"prompt": "paint", "init_image": b64(Image.new("RGB", (128, 128))), "mask": b64(Image.new("L", (64, 64))),
            **FAST}
    r = resident.http.post("/v1/jobs", json=body)
    assert r.status_code == 422 and "mask is 64x64 but the image is 128x128; they must match" in r.text, r.text


def test_a1111_job_failed_by_its_input_is_a_422(tiny_models, tmp_path):  # noqa: F811
    """A LoRA the request names that turns out damaged when the job runs (NaN values): A1111's API answers 422 with
    the reason (the client's input), not 500 (kept for the server's own faults)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path / "models"
    (root / "checkpoints").mkdir(parents=True)
    (root / "loras").mkdir()
    os.link(tiny_models / "checkpoints" / "tiny.safetensors", root / "checkpoints" / "tiny.safetensors")
    tensors = load_file(next((tiny_models / "loras").glob("*.safetensors")))
    tensors = {k: v.fill_(float("nan")) if "lora_up" in k else v for k, v in tensors.items()}
    save_file(tensors, root / "loras" / "broken.safetensors")
    with live_server(tmp_path / "out", root) as live:
        r = live.http.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:broken:0.5>", **FAST})
    assert r.status_code == 422 and "broken.safetensors" in r.text and "non-finite" in r.text, r.text
