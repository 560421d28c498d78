"""Training (`sdxl train`): buckets and crops, the objective against inference, resume, two processes, LoRA,
atomic checkpoints, corrupt images, non-finite steps and config errors. Tiny models, 32 px images, CPU."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdxl.formats import checkpoint as ck
from sdxl.cli import main
from sdxl.errors import SDXLError
from sdxl.train import checkpointing, config, data, loop

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_tiny.toml"
TINY = dict(dataset="synthetic:12", resolution=32, bucket_step=16, batch_size=2, steps=4, lr=1e-3,
            checkpoint_every=2, save_dtype="fp32", caption_dropout=0.25, unet={"model_channels": 32},
            clip_l={"layers": 2}, bigg={"layers": 2})

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> config.TrainConfig:
    return config.build({**TINY, **kw})


def to_toml(values: dict) -> str:
    flat = [f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
              for k, v in values.items() if isinstance(v, dict)]
    return "\n".join(flat + tables) + "\n"


def weights(path) -> dict:
    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def steps_logged(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "event" not in r]


def events(out: Path, name: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r.get("event") == name]


class Stop(Exception):
    pass


def stop_at(n: int):
    def on_step(state):
        if state["step"] == n:
            raise Stop
    return on_step


# --- buckets, order, crops -------------------------------------------------------------------------

def test_buckets_are_the_reports():
    from sdxl.pipeline import BUCKETS  # the report's list, (width, height)

    buckets = data.make_buckets(1024, 64, 4.0)
    assert set(buckets) == {(h, w) for w, h in BUCKETS} - {(960, 1024), (1024, 960)}
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.85 * 1024**2 < h * w <= 1024**2
        assert max(h / w, w / h) <= 4.0
    assert all(max(h / w, w / h) <= 2.0 for h, w in data.make_buckets(1024, 64, 2.0))


def test_every_image_in_one_bucket_and_batches_never_mix():
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(20, 400)), int(rng.integers(20, 400))) for _ in range(57)]
    buckets = data.make_buckets(256, 32, 4.0)
    bucket_of = [data.nearest_bucket(s, buckets) for s in sizes]
    for s, b in zip(sizes, bucket_of):  # the nearest aspect ratio
        best = min(abs(math.log(bh / bw) - math.log(s[0] / s[1])) for bh, bw in buckets)
        assert abs(math.log(buckets[b][0] / buckets[b][1]) - math.log(s[0] / s[1])) == best
    plan = data.BucketBatches(bucket_of, global_batch=4, seed=1)
    for epoch in range(3):
        batches = plan.epoch(epoch)
        assert len(batches) == len(plan)
        assert {i for _, items in batches for i in items} == set(range(len(sizes)))  # every image, every epoch
        for b, items in batches:
            assert len(items) == 4 and {bucket_of[i] for i in items} == {b}  # one bucket per batch
    assert plan.epoch(0) != plan.epoch(1)
    # two processes with 2 each see exactly what one process with 4 sees
    one = data.RankBatches(plan, 0, 4, start=5)
    two = [data.RankBatches(plan, r, 2, start=5) for r in range(2)]
    for a, b0, b1 in zip(iter(one), iter(two[0]), iter(two[1])):
        assert a == b0 + b1
        if a[0][0] > 40:
            break


def test_conditioning_values_are_real_sizes_and_crop_offsets(tmp_path):
    im = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)  # (h, w)
    Image.fromarray(im).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a photo")
    items, skipped = data.scan(str(tmp_path), tmp_path)
    assert skipped == [] and items[0].size == (50, 90) and items[0].caption == "a photo"
    buckets = data.make_buckets(64, 16, 4.0)
    b = data.nearest_bucket(items[0].size, buckets)
    ds = data.ImageDataset(items, buckets, [b], seed=3, random_crop=True, aesthetic_score=6.0)
    offsets = set()
    for k in range(12):
        s = ds[(k, 0, 0)]
        bh, bw = buckets[b]
        (rh, rw), (top, left) = data.crop_box((50, 90), (bh, bw), np.random.default_rng(
            data.stable_seed(3, "crop", k, 0)))
        assert min(rh / 50, rw / 90) == pytest.approx(max(bh / 50, bw / 90), rel=0.02)  # shortest side fits
        assert s["original_size"] == (50, 90) and s["target_size"] == (bh, bw)
        assert s["crop_coords_top_left"] == (top, left) and 0 <= top <= rh - bh and 0 <= left <= rw - bw
        resized = Image.fromarray(im).resize((rw, rh), Image.LANCZOS).crop((left, top, left + bw, top + bh))
        expect = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        assert torch.equal(s["pixels"], expect)
        offsets.add((top, left))
    assert len(offsets) > 1  # random crops
    batch = data.collate([ds[(0, 0, 0)], ds[(1, 0, 0)]])
    assert batch["original_size"].tolist() == [[50.0, 90.0]] * 2
    assert batch["target_size"].tolist() == [list(map(float, buckets[b]))] * 2


def test_training_feeds_the_unet_what_inference_does(tmp_path):
    """Same caption, sizes, crop, latent x and sigma: the UNet gets equal input, timestep, context and vector."""
    from sdxl.pipeline import GuidedDenoiser, Pipeline
    from sdxl.request import Request

    cfg = tiny(caption_dropout=0.0, offset_noise=0.0)
    torch.manual_seed(0)
    model = loop.build_model(cfg, torch.device("cpu"))
    tok = loop.Tokenizer.default()
    pixels = torch.rand(1, 3, 32, 64) * 2 - 1
    batch = {"key": [(7, 0)], "failed": [], "caption": ["a red circle"], "pixels": pixels,
             "original_size": torch.tensor([[50.0, 90.0]]), "crop_coords_top_left": torch.tensor([[3.0, 11.0]]),
             "target_size": torch.tensor([[32.0, 64.0]]), "aesthetic_score": torch.tensor([[6.0]])}
    inputs = loop.prepare(batch, model, tok, cfg, torch.device("cpu"), None)
    seen = []
    model.unet.forward = lambda *a: seen.append(a) or torch.zeros_like(a[0])
    loop.Objective(model, cfg)(inputs)
    t = int(inputs["t"][0])
    sigma = loop.discrete_sigmas()[t].float()
    x = inputs["latents"] + sigma * inputs["noise"]
    pipe = Pipeline(model, dtype=torch.float32, tokenizer=tok, channels_last=False)
    req = Request("a red circle", width=64, height=32, original_size=(50, 90), crop=(3, 11), target_size=(32, 64))
    cond, _ = pipe.conditioning(model, req)
    GuidedDenoiser(model.unet, cond, None, 1.0)(x, sigma.reshape(1))
    (x_train, t_train, ctx_train, vec_train), (x_inf, t_inf, ctx_inf, vec_inf) = seen
    assert torch.allclose(x_train, x_inf, atol=1e-6) and torch.equal(t_train, t_inf)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # DDPM form, docs/training.md §1
    abar = torch.cumprod(1 - betas, 0)[t].float()
    assert torch.allclose(x_train, abar.sqrt() * inputs["latents"] + (1 - abar).sqrt() * inputs["noise"], atol=1e-5)
    assert torch.allclose(ctx_train, ctx_inf, atol=1e-5) and torch.allclose(vec_train, vec_inf, atol=1e-5)


def test_a_dropped_caption_is_the_bases_empty_prompt():
    """Caption dropout at training = an empty negative prompt at inference: zero text, micro-conditioning kept."""
    from sdxl.pipeline import Pipeline
    from sdxl.request import Request

    cfg = tiny(caption_dropout=1.0)
    torch.manual_seed(0)
    model = loop.build_model(cfg, torch.device("cpu"))
    tok = loop.Tokenizer.default()
    batch = {"key": [(7, 0)], "failed": [], "caption": ["a red circle"], "pixels": torch.zeros(1, 3, 32, 64),
             "original_size": torch.tensor([[50.0, 90.0]]), "crop_coords_top_left": torch.tensor([[3.0, 11.0]]),
             "target_size": torch.tensor([[32.0, 64.0]]), "aesthetic_score": torch.tensor([[6.0]])}
    inputs = loop.prepare(batch, model, tok, cfg, torch.device("cpu"), None)
    assert inputs["drop"].tolist() == [True]
    seen = []
    model.unet.forward = lambda *a: seen.append(a) or torch.zeros_like(a[0])
    loop.Objective(model, cfg)(inputs)
    pipe = Pipeline(model, dtype=torch.float32, tokenizer=tok, channels_last=False)
    req = Request("a red circle", width=64, height=32, original_size=(50, 90), crop=(3, 11), target_size=(32, 64))
    _, uncond = pipe.conditioning(model, req)
    assert seen[0][2].abs().max() == 0 and uncond.crossattn.abs().max() == 0
    torch.testing.assert_close(seen[0][3], uncond.vector, rtol=0, atol=1e-6)


# --- the loop --------------------------------------------------------------------------------------

def eval_loss(model, cfg: config.TrainConfig, out: Path) -> float:
    """Mean loss on fixed images, noise and timesteps."""
    items, _ = data.scan(cfg.dataset, out)
    buckets = data.make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect)
    bucket_of = [data.nearest_bucket(it.size, buckets) for it in items]
    ds = data.ImageDataset(items, buckets, bucket_of, 0, False, 6.0)
    total = 0.0
    with torch.no_grad():
        for b in sorted(set(bucket_of)):
            members = [i for i in range(len(items)) if bucket_of[i] == b]
            batch = data.collate([ds[(10**6 + j, j, i)] for j, i in enumerate(members)])
            inputs = loop.prepare(batch, model, loop.Tokenizer.default(), cfg, torch.device("cpu"), None)
            total += float(loop.Objective(model, cfg)(inputs).sum())
    return total / len(items)


def test_loss_decreases_and_final_file_generates(tmp_path, capsys):
    cfg = tiny(steps=20, lr=2e-3, caption_dropout=0.0, sample_every=20, sample_prompts=("a red circle",),
               sample_steps=2, checkpoint_every=10, keep_checkpoints=1)
    out = tmp_path / "run"
    loop.seed_everything(cfg.seed)
    before = eval_loss(loop.build_model(cfg, torch.device("cpu")), cfg, out.parent / "data")
    final = loop.train(cfg, out, quiet=True)
    after = eval_loss(ck.load(final), cfg, out.parent / "data")
    print(f"eval loss before {before:.4f}, after 20 steps {after:.4f}")
    assert after < 0.6 * before, (before, after)
    assert (out / "latest").read_text().strip() == "step-000020"
    assert [p.name for p in out.glob("step-*")] == ["step-000020"]  # keep_checkpoints = 1
    assert (out / "samples" / "step-000020-0.png").is_file()
    log = steps_logged(out)
    assert [r["step"] for r in log] == list(range(1, 21)) and all(r["lr"] == 2e-3 for r in log)
    code = main(["generate", "a red circle", "--model", str(final), "--width", "32", "--height", "32", "--steps", "2",
                 "--dtype", "fp32", "--seed", "1", "-o", str(tmp_path / "g.png"), "-q", "--no-watermark"])
    assert code == 0 and (tmp_path / "g.png").is_file()


def test_resume_ends_with_the_same_weights(tmp_path):
    """Killed after step 3 (last checkpoint: step 2), resumed: bitwise equal to an uninterrupted run."""
    cfg = tiny(steps=4, grad_accum=2, ema_decay=0.9, lr_schedule="cosine", warmup_steps=2, min_snr_gamma=5.0)
    straight = loop.train(cfg, tmp_path / "a", quiet=True)
    with pytest.raises(Stop):
        loop.train(cfg, tmp_path / "b", quiet=True, on_step=stop_at(3))
    assert checkpointing.latest(tmp_path / "b").name == "step-000002"
    resumed = loop.train(cfg, tmp_path / "b", resume=True, quiet=True)
    assert max_diff(weights(straight), weights(resumed)) == 0.0
    for name in ("trained", "optimizer", "ema"):
        a = weights(tmp_path / "a" / "step-000004" / f"{name}.safetensors")
        assert max_diff(a, weights(tmp_path / "b" / "step-000004" / f"{name}.safetensors")) == 0.0
    losses_b = [(r["step"], r["loss"]) for r in steps_logged(tmp_path / "b")]  # step 3 ran twice
    assert losses_b[2] == losses_b[3] and [r["loss"] for r in steps_logged(tmp_path / "a")] == [
        loss for _, loss in dict(losses_b).items()]
    assert events(tmp_path / "b", "resumed")[0]["step"] == 2


# adam_eps 1e-4: with the default 1e-8 Adam turns rounding noise in gradients that are zero in exact arithmetic
# (biases just before a GroupNorm) into full +-lr steps, which would hide real differences between the runs
TWO = {**TINY, "steps": 3, "batch_size": 1, "checkpoint_every": 3, "adam_eps": 1e-4, "ema_decay": 0.9}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    loop.train(config.build({**TWO, "batch_size": 2}), out, quiet=True)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, one_process, mode):
    """torchrun, 2 processes x batch 1 (gloo) vs 1 process x batch 2: the same global batch, the same result."""
    (tmp_path / "c.toml").write_text(to_toml({**TWO, "distributed": mode}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sdxl.cli",
           "train", str(tmp_path / "c.toml"), "-q", "--output", str(tmp_path / "two")]
    r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote") == 1
    diffs = {name: max_diff(weights(one_process / name), weights(tmp_path / "two" / name))
             for name in ("final.safetensors", "step-000003/trained.safetensors", "step-000003/optimizer.safetensors",
                          "step-000003/ema.safetensors")}
    print(f"{mode}, two processes vs one: max |difference| {diffs}")
    assert max(diffs.values()) < 2e-6, diffs  # float sums in another order; the weights moved by up to ~3e-3
    assert {p.name for p in (tmp_path / "two" / "step-000003").glob("rng-rank*")} == {"rng-rank0.safetensors",
                                                                                      "rng-rank1.safetensors"}
    la, lb = steps_logged(one_process), steps_logged(tmp_path / "two")
    assert len(la) == len(lb) == 3 and all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(la, lb))


def test_lora_changes_only_lora_weights(tmp_path):
    from sdxl.adapters.lora import DEFAULT_TARGETS, load_lora

    loop.seed_everything(1)
    start_file = ck.save_single_file(loop.build_model(tiny(), torch.device("cpu")), tmp_path / "start.safetensors")
    cfg = tiny(model=str(start_file), unet={}, clip_l={}, bigg={}, train="lora", lora_rank=4, lora_alpha=2.0,
               lora_text_encoders=True, steps=2, lr=1e-2)  # the shapes come from the file
    out = tmp_path / "lora"
    final = loop.train(cfg, out, quiet=True)
    trained = weights(out / "step-000002" / "trained.safetensors")
    assert trained and all(".lora_down." in k or ".lora_up." in k for k in trained)
    assert any(k.startswith("conditioner.") for k in trained) and any(k.startswith("model.") for k in trained)
    assert all(float(v.abs().max()) > 0 for k, v in trained.items() if ".lora_up." in k)  # they trained
    assert not any(".layers.1." in k for k in trained if k.startswith("conditioner.embedders.0."))  # CLIP-L's unused last
    # the initial model + the saved LoRA (either format) is exactly the final merged model
    merged = weights(final)
    for name in ("final_lora.safetensors", "final_lora_peft.safetensors"):
        base = ck.load(start_file)
        start = {k: v.clone() for k, v in base.state_dict().items()}
        report = load_lora(base, out / name)
        assert report.total > 0
        got = base.state_dict()
        assert max_diff(got, merged) < 1e-6
        changed = {k for k in got if not torch.equal(got[k], start[k])}
        assert changed and all(k.endswith("weight") for k in changed)
        assert all(k.removesuffix(".weight").removesuffix("_weight").endswith(DEFAULT_TARGETS) for k in changed)


def test_refiner_trains_on_the_first_200_noise_levels(tmp_path, seen_inputs):
    seen = seen_inputs
    final = loop.train(tiny(model_config="tiny-refiner", timestep_range=(0, 200), steps=3, checkpoint_every=3,
                            bigg={"layers": 2}, clip_l={}), tmp_path / "run", quiet=True)
    assert max(int(i["t"].max()) for i in seen) < 200 and len({int(t) for i in seen for t in i["t"]}) > 1
    assert all(i["micro"]["aesthetic_score"].tolist() == [[6.0], [6.0]] for i in seen)
    assert ck.load(final).cfg.is_refiner


@pytest.fixture
def seen_inputs(monkeypatch) -> list[dict]:
    """Every batch the objective sees."""
    seen = []
    real = loop.Objective.forward
    monkeypatch.setattr(loop.Objective, "forward", lambda self, inputs: seen.append(inputs) or real(self, inputs))
    return seen


@pytest.fixture
def sized_images(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (h, w) in enumerate([(20, 60), (24, 40), (48, 96), (64, 40), (80, 80)]):
        Image.new("RGB", (w, h), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return folder


def test_micro_conditioning_ablations_tell_the_bucket_size_and_no_crop(tmp_path, seen_inputs, sized_images):
    """The report's ablations (§2.2): no size conditioning tells the bucket's size, no crop conditioning (0, 0)."""
    loop.train(tiny(dataset=str(sized_images), steps=3, checkpoint_every=3, size_conditioning=False,
                    crop_conditioning=False), tmp_path / "a", quiet=True)
    for inputs in seen_inputs:
        m = inputs["micro"]
        assert torch.equal(m["original_size"], m["target_size"]) and m["crop_coords_top_left"].abs().max() == 0


def test_micro_conditioning_tells_real_sizes_and_crops(tmp_path, seen_inputs, sized_images):
    loop.train(tiny(dataset=str(sized_images), steps=6, checkpoint_every=6), tmp_path / "b", quiet=True)
    sizes = {tuple(map(int, s)) for i in seen_inputs for s in i["micro"]["original_size"]}
    crops = {tuple(map(int, c)) for i in seen_inputs for c in i["micro"]["crop_coords_top_left"]}
    assert (20, 60) in sizes and crops != {(0, 0)}


def test_min_original_size_drops_small_images_before_bucketing(tmp_path, seen_inputs, sized_images):
    loop.train(tiny(dataset=str(sized_images), steps=4, checkpoint_every=4, min_original_size=40), tmp_path / "c",
               quiet=True)
    assert {tuple(map(int, s)) for i in seen_inputs for s in i["micro"]["original_size"]} <= {
        (48, 96), (64, 40), (80, 80)}
    assert events(tmp_path / "c", "data")[0]["dropped_small"] == 2


def test_every_image_smaller_than_min_original_size_is_one_line(tmp_path, sized_images):
    with pytest.raises(SDXLError, match="every image is smaller than min_original_size 500"):
        loop.train(tiny(dataset=str(sized_images), min_original_size=500), tmp_path / "d", quiet=True)


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny(steps=6)
    out = tmp_path / "run"
    real = checkpointing.write_tensors

    def dies_on_second_optimizer(path, tensors, metadata=None):
        if path.name == "optimizer.safetensors" and ".tmp-step-000004" in str(path):
            path.write_bytes(b"partial")  # half a file, then the process is gone
            raise Stop
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpointing, "write_tensors", dies_on_second_optimizer)
    with pytest.raises(Stop):
        loop.train(cfg, out, quiet=True)
    assert (out / "latest").read_text().strip() == "step-000002"
    assert (out / ".tmp-step-000004" / "trained.safetensors").is_file()  # the partial one is left, never named
    assert not (out / "step-000004").exists()
    ckpt = checkpointing.load(checkpointing.latest(out), 0)
    assert ckpt["state"]["step"] == 2 and ckpt["trained"]
    monkeypatch.setattr(checkpointing, "write_tensors", real)
    loop.train(cfg, out, resume=True, quiet=True)
    assert (out / "latest").read_text().strip() == "step-000006"
    assert not list(out.glob(".tmp-*")) and (out / "final.safetensors").is_file()


@pytest.fixture
def some_corrupt(tmp_path) -> Path:
    """Five good images, one that is not an image, one cut in half (its header reads)."""
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"image {i}")
    (d / "garbage.png").write_bytes(b"not an image at all")  # fails when scanned
    good = (d / "0.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels missing: fails when loaded
    return d


def test_a_manifest_skips_broken_lines_missing_and_unreadable_files(tmp_path, some_corrupt):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join([json.dumps({"file": "imgs/1.png", "caption": "one"}), "{broken",
                                   json.dumps({"file": "imgs/missing.png", "caption": "gone"}),
                                   json.dumps({"file": "imgs/truncated.png", "caption": "half"})]))
    items, skipped = data.scan(str(manifest), tmp_path)
    assert [Path(it.path).name for it in items] == ["1.png", "truncated.png"] and len(skipped) == 2


def test_corrupt_images_are_skipped_and_counted(tmp_path, some_corrupt):
    d = some_corrupt
    out = tmp_path / "run"
    loop.train(tiny(dataset=str(d), steps=4, checkpoint_every=4), out, quiet=True)
    ev = events(out, "data")[0]
    assert ev["images"] == 6 and ev["skipped"] == 1 and "garbage.png" in ev["skipped_files"][0]
    assert steps_logged(out)[-1]["images_skipped"] == 2  # + the truncated one, met in the first epoch


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch):
    real = loop.Objective.forward
    calls = []

    def sometimes_nan(self, inputs):
        calls.append(1)
        loss = real(self, inputs)
        return loss * float("nan") if len(calls) == 2 or len(calls) >= 5 else loss

    monkeypatch.setattr(loop.Objective, "forward", sometimes_nan)
    out = tmp_path / "run"
    with pytest.raises(SDXLError, match="3 non-finite steps in a row.*step-000004"):
        loop.train(tiny(steps=10, max_nonfinite=3), out, quiet=True)
    bad = [e["step"] for e in events(out, "nonfinite")]
    assert bad == [2, 5, 6, 7]
    assert checkpointing.latest(out).name == "step-000004"
    # a skipped step leaves the weights alone: only steps 1, 3, 4 trained
    assert checkpointing.load(out / "step-000004", 0)["optimizer"]["state"]
    opt = weights(out / "step-000004" / "optimizer.safetensors")
    assert {float(v) for k, v in opt.items() if k.endswith("/step")} == {3.0}


CACHED = dict(steps=2, checkpoint_every=2, random_crop=False, adam_eps=1e-4)  # eps: see TWO below


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> dict:
    """One cached run ("a") on 12 images: its output, the cache's files and their modification times."""
    d = tmp_path_factory.mktemp("cached")
    shapes = data.make_synthetic(12, d / "shapes")
    same = dict(CACHED, dataset=str(shapes))
    a = loop.train(tiny(cache_dir=str(d / "cache"), **same), d / "a", quiet=True)
    latents, texts = (sorted((d / "cache" / kind).glob("*.safetensors")) for kind in ("latents", "text"))
    captions = {p.read_text() for p in shapes.glob("*.txt")}
    return {"dir": d, "a": a, "same": same, "files": latents + texts, "counts": (len(latents), len(texts)),
            "captions": captions, "stamps": [f.stat().st_mtime_ns for f in latents + texts]}


def test_cache_holds_one_file_per_image_and_per_caption(cached):
    assert cached["counts"] == (12, len(cached["captions"]))


def test_a_second_run_reads_the_cache_and_equals_an_uncached_one(cached, tmp_path):
    cfg = tiny(cache_dir=str(cached["dir"] / "cache"), **cached["same"])
    b = loop.train(cfg, tmp_path / "b", quiet=True)
    assert [f.stat().st_mtime_ns for f in cached["files"]] == cached["stamps"]  # not re-encoded
    # with the same (centre) crops the cache changes nothing but float rounding in the encoders
    plain = loop.train(tiny(**cached["same"]), tmp_path / "c", quiet=True)
    assert max_diff(weights(b), weights(plain)) < 1e-5


def from_file(cached, model: Path, cache: Path) -> config.TrainConfig:
    values = {k: v for k, v in {**TINY, **cached["same"]}.items() if k not in config.SECTIONS}
    return config.build({**values, "cache_dir": str(cache), "model": str(model)})


def test_the_cache_is_named_by_weights_so_a_continuation_reuses_it(cached, tmp_path):
    loop.train(from_file(cached, cached["a"], cached["dir"] / "cache"), tmp_path / "d", quiet=True)
    assert sorted((cached["dir"] / "cache").rglob("*.safetensors")) == sorted(cached["files"])
    assert [f.stat().st_mtime_ns for f in cached["files"]] == cached["stamps"]


def test_other_text_encoders_get_their_own_text_files_and_the_same_latents(cached, tmp_path):
    model = ck.load(cached["a"], dtype=torch.float32)
    with torch.no_grad():
        model.conditioner.bigg.model.positional_embedding.add_(0.5)
    other = ck.save_single_file(model, tmp_path / "other.safetensors")
    cache = shutil.copytree(cached["dir"] / "cache", tmp_path / "cache")
    loop.train(from_file(cached, other, cache), tmp_path / "e", quiet=True)
    assert len(list((cache / "latents").glob("*.safetensors"))) == 12
    assert len(list((cache / "text").glob("*.safetensors"))) == 2 * len(cached["captions"])


def test_text_cache_is_shared_out_whatever_order_the_ranks_run_in(tmp_path):
    """Each rank takes its share of all captions before looking at what exists: a rank that starts after
    another has written its files still leaves no caption to nobody."""
    captions = [f"caption {i % 7}" for i in range(20)]  # 7 distinct
    files = [data.text_cache_file(tmp_path, c, "fp") for c in captions]
    encode = lambda caption: {"crossattn": torch.zeros(2, 3), "pooled": torch.zeros(3)}  # noqa: E731
    data.fill_text_cache(captions, files, encode, rank=1, world=2)  # rank 1 first, then rank 0
    data.fill_text_cache(captions, files, encode, rank=0, world=2)
    assert len(set(files)) == 7 and all(f.is_file() for f in files)


# --- config ----------------------------------------------------------------------------------------

def test_config_overrides_reach_fields_and_tables():
    cfg = config.load(EXAMPLE, ["lr=3e-4", "sample_prompts=[\"a\", \"b\"]", "unet.model_channels=128",
                                "timestep_range=[0, 200]", "dataset=some/folder", "lora_alpha=none"])
    assert cfg.lr == 3e-4 and cfg.sample_prompts == ("a", "b") and cfg.unet["model_channels"] == 128
    assert cfg.timestep_range == (0, 200) and cfg.dataset == "some/folder" and cfg.lora_alpha is None
    assert cfg.model_config_resolved().unet.model_channels == 128


@pytest.mark.parametrize("argv,message", [
    (["--set", "steps=abc"], "--set steps: expected an integer, got 'abc'"),
    (["--set", "steps=1.5"], "--set steps: expected an integer, got 1.5"),
    (["--set", "lr=fast"], "--set lr: expected a number, got 'fast'"),
    (["--set", "lrr=1"], "unknown setting 'lrr' (did you mean 'lr'?)"),
    (["--set", "train=full"], "--set train: expected one of 'unet', 'lora', got 'full'"),
    (["--set", "unet.model_channels=wide"], "--set unet.model_channels: expected an integer"),
    (["--set", "unet.widht=3"], "unknown setting 'unet.widht'"),
    (["--set", "steps"], "expected key=value"),
    (["--set", "caption_dropout=2"], "caption_dropout must be in [0, 1]"),
])
def test_a_bad_override_is_one_line(capsys, argv, message):
    code = main(["train", str(EXAMPLE), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_a_bad_value_in_the_file_is_named_as_the_files(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('dataset = "x"\nsteps = "many"\n')
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: steps: expected an integer, got 'many'" in err and err.count("\n") == 1


# --- the learning rate (one helper for the UNet, VAE and judge trainers) ----------------------------

@pytest.mark.parametrize("step,schedule,expected", [
    (0, "cosine", 0.5), (1, "cosine", 1.0),  # linear warm-up over 2 steps
    (2, "cosine", 1.0), (6, "cosine", 0.55), (10, "cosine", 0.1),  # half cosine from 1 to the floor 0.1
    (6, "constant", 1.0),
])
def test_learning_rate_warms_up_then_follows_its_schedule(step, schedule, expected):
    from sdxl.train.lr import learning_rate

    assert learning_rate(step, 10, 1.0, warmup=2, schedule=schedule, floor=0.1) == pytest.approx(expected)


def test_the_log_records_the_schedules_rates(tmp_path):
    out = tmp_path / "run"
    loop.train(tiny(steps=4, checkpoint_every=4, lr_schedule="cosine", warmup_steps=1, lr_min=1e-4), out, quiet=True)
    expected = [1e-3, 1e-3, 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 3)),
                1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(2 * math.pi / 3))]
    assert [r["lr"] for r in steps_logged(out)] == pytest.approx(expected)
