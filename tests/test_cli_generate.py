"""`sdxl generate` end to end on a tiny random model: outputs, metadata, reproduction, latents, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import FAST, draft_and_refine, run, tiny_checkpoints
from PIL import Image
from safetensors.torch import load_file

from sdxl.formats import checkpoint as ck
from sdxl.formats.png import file_hash
from sdxl.pipeline import Pipeline
from sdxl.request import Request


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("cli"))


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_writes_png_with_metadata(files, tmp_path, capsys):
    base, _ = files
    out = tmp_path / "a.png"
    code, text, _ = run(capsys, "generate", "a red circle", "--model", base, "--seed", 5, "-o", out, *FAST)
    assert code == 0 and f"wrote {out}" in text
    assert "s wall" in text and "s/step" in text and "peak memory" in text
    info = Image.open(out).info
    params = info["parameters"]
    assert params.startswith("a red circle\n")
    for field in ("Steps: 2", "Sampler: Euler", "Schedule type: Uniform", "CFG scale: 5.0", "Seed: 5", "Size: 64x64",
                  "Model: tiny", f"Model hash: {file_hash(base)[:10]}"):
        assert field in params
    rec = json.loads(info["sdxl-recipe"])
    assert rec["seed"] == 5 and rec["steps"] == 2 and rec["models"]["model"] == str(base)


def test_generate_never_overwrites(files, tmp_path, capsys):
    base, _ = files
    out = tmp_path / "a.png"
    run(capsys, "generate", "a red circle", "--model", base, "--seed", 5, "-o", out, *FAST)
    # the same command again: a new name, the first file untouched, the same image
    before = out.read_bytes()
    code, text, _ = run(capsys, "generate", "a red circle", "--model", base, "--seed", 5, "-o", out, *FAST)
    assert code == 0 and f"wrote {tmp_path / 'a-1.png'}" in text and out.read_bytes() == before
    assert np.array_equal(pixels(out), pixels(tmp_path / "a-1.png"))


def test_from_png_reproduces_exactly(files, tmp_path, capsys):
    base, _ = files
    out = tmp_path / "src.png"
    run(capsys, "generate", "two (blue:1.3) squares", "--negative", "blurry", "--model", base, "--seed", 9,
        "--sampler", "dpmpp_2m_sde", "--scheduler", "karras", "--cfg", "6.5", "--crop", "16,8", "-o", out, *FAST)
    code, _, _ = run(capsys, "generate", "--from-png", out, "-o", tmp_path / "again.png", "--no-watermark", "-q")
    assert code == 0
    assert np.array_equal(pixels(out), pixels(tmp_path / "again.png"))
    params = Image.open(out).info["parameters"]
    assert "Negative prompt: blurry" in params and "Sampler: DPM++ 2M SDE" in params and "Schedule type: Karras" in params


def test_batch_image_i_uses_seed_plus_i(files, tmp_path, capsys):
    base, _ = files
    code, _, _ = run(capsys, "generate", "a star", "--model", base, "--seed", 3, "--batch", "2", "-o", tmp_path / "b.png",
                     *FAST)
    assert code == 0
    assert json.loads(Image.open(tmp_path / "b-1.png").info["sdxl-recipe"])["seed_of_image"] == 4
    code, _, _ = run(capsys, "generate", "a star", "--model", base, "--seed", 4, "-o", tmp_path / "single.png", *FAST)
    # the same noise; batched and single fp32 convolutions round differently, by at most a few 1/255 steps
    diff = np.abs(pixels(tmp_path / "b-1.png").astype(int) - pixels(tmp_path / "single.png"))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_watermark_on_by_default(files, tmp_path, capsys):
    base, _ = files
    big = ["a star", "--model", base, "--seed", 4, "--steps", 1, "--width", 256, "--height", 256, "-q", "--dtype", "fp32"]
    run(capsys, "generate", *big, "-o", tmp_path / "marked.png")
    run(capsys, "generate", *big, "-o", tmp_path / "plain.png", "--no-watermark")
    # on by default, off with --no-watermark (its size on natural images is measured in test_watermark.py; on this
    # random model's saturated noise dwtDct moves pixels by ~15 on average, the reference's float path too)
    assert not np.array_equal(pixels(tmp_path / "marked.png"), pixels(tmp_path / "plain.png"))
    code, text, _ = run(capsys, "detect-watermark", tmp_path / "marked.png", tmp_path / "plain.png")
    assert code == 0 and text.count("/48 bits match: ") == 2


def test_save_latent(files, tmp_path, capsys):
    base, _ = files
    lat = tmp_path / "draft.safetensors"
    code, _, _ = run(capsys, "generate", "a boat", "--model", base, "--seed", 1, "--batch", 2, "--save-latent", lat,
                     "-o", tmp_path / "draft.png", *FAST)
    assert code == 0
    t = load_file(lat)["latent"]
    assert t.shape == (2, 4, 32, 32) and t.dtype == torch.float32
    from safetensors import safe_open

    with safe_open(lat, "pt") as f:
        assert json.loads(f.metadata()["recipe"])["prompt"] == "a boat"
    pipe = Pipeline.load(base, device="cpu", dtype=torch.float32)
    want = pipe.generate(Request("a boat", width=64, height=64, steps=2, seed=1, batch=2)).latents
    assert torch.equal(t, want)


def test_refine_a_chosen_saved_latent(files, tmp_path, capsys):
    base, ref = files
    (code, text, _), lat = draft_and_refine(capsys, base, ref, tmp_path, 0.3, tmp_path / "refined.png")
    assert code == 0 and "refined.png" in text
    code, _, err = run(capsys, "generate", "a boat", "--model", base, "--latent", lat, "--latent-index", 5, *FAST)
    assert code == 2 and "out of range" in err


def as_pipeline_makes(base, **kw) -> np.ndarray:
    """The image the library's Pipeline gives for a Request: what the CLI must write."""
    pipe = Pipeline.load(base, device="cpu", dtype=torch.float32)
    return np.asarray(pipe.generate(Request(width=64, height=64, steps=2, seed=1, **kw)).images[0])


def test_img2img_from_cli(files, tmp_path, capsys):
    base, _ = files
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    code, _, _ = run(capsys, "generate", "a circle", "--model", base, "--init-image", tmp_path / "init.png",
                     "--strength", 0.6, "--seed", 1, "-o", tmp_path / "i2i.png", *FAST)
    assert code == 0
    want = as_pipeline_makes(base, prompt="a circle", init_image=Image.open(tmp_path / "init.png"), strength=0.6)
    assert np.array_equal(pixels(tmp_path / "i2i.png"), want)


def test_inpaint_from_cli(files, tmp_path, capsys):
    base, _ = files
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))
    mask.save(tmp_path / "mask.png")
    code, _, _ = run(capsys, "generate", "a circle", "--model", base, "--init-image", tmp_path / "init.png",
                     "--mask", tmp_path / "mask.png", "--seed", 1, "-o", tmp_path / "inp.png", *FAST)
    assert code == 0 and Image.open(tmp_path / "inp.png").size == (64, 64)
    want = as_pipeline_makes(base, prompt="a circle", init_image=Image.open(tmp_path / "init.png"),
                             mask=Image.open(tmp_path / "mask.png"), strength=1.0)
    assert np.array_equal(pixels(tmp_path / "inp.png"), want)


@pytest.mark.parametrize("argv,message", [
    (["--width", "60"], "multiples of 8"),
    (["--sampler", "fast"], "unknown sampler 'fast'; choose one of: euler, euler_ancestral"),
    (["--scheduler", "fast"], "unknown scheduler 'fast'; choose one of: sgm, leading"),
    (["--init-image", "{tmp}/notimage.png"], "not a readable image"),
    (["--init-image", "{tmp}/missing.png"], "no such image file"),
    (["--init-image", "{tmp}/init.png", "--strength", "1.5"], r"strength must be in [0, 1], got 1.5"),
    (["--init-image", "{tmp}/init.png", "--mask", "{tmp}/small.png"], "mask is 32x32 but the image is 64x64"),
    (["--model", "{tmp}/nope.safetensors"], "no such file or folder"),
])
def test_bad_input_one_line_exit_2(files, tmp_path, capsys, argv, message):
    base, _ = files
    (tmp_path / "notimage.png").write_text("hello")
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    model = [] if "--model" in argv else ["--model", str(base)]
    code, out, err = run(capsys, "generate", "x", *model, "--steps", "2", "--width", "64", "--height", "64", "-q",
                         "--dtype", "fp32", *argv)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("sdxl*.png"))


def test_prompts_file_and_rank_share(files, tmp_path, capsys, monkeypatch):
    base, _ = files
    (tmp_path / "p.txt").write_text("a red circle\n\na blue square\na green star\n")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, text, _ = run(capsys, "generate", "--prompts", tmp_path / "p.txt", "--model", base, "--seed", 10,
                        "-o", tmp_path / "many.png", *FAST)
    assert code == 0
    written = sorted(p.name for p in tmp_path.glob("many-*.png"))
    assert written == ["many-0001.png"]  # rank 1 of 2 takes prompt 1 of 0..2
    rec = json.loads(Image.open(tmp_path / "many-0001.png").info["sdxl-recipe"])
    assert rec["prompt"] == "a blue square" and rec["seed"] == 11


@pytest.fixture(scope="module")
def lora(files, tmp_path_factory):
    from sdxl.adapters.lora import add_lora, save_lora

    model = ck.load(files[0])
    params = add_lora(model, rank=4, unet=True)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)
    return save_lora(model, tmp_path_factory.mktemp("lora") / "style.safetensors")


def test_lora_flag_changes_the_image(files, lora, tmp_path, capsys):
    common = ["a star", "--model", files[0], "--seed", 2, *FAST]
    run(capsys, "generate", *common, "-o", tmp_path / "plain.png")
    code, text, _ = run(capsys, "generate", *common, "--lora", f"{lora}:0.7", "-o", tmp_path / "lora.png")
    assert code == 0 and "LoRA" in text and "weight 0.7" in text
    assert not np.array_equal(pixels(tmp_path / "plain.png"), pixels(tmp_path / "lora.png"))


def test_lora_is_replayed_from_png(files, lora, tmp_path, capsys):
    run(capsys, "generate", "a star", "--model", files[0], "--seed", 2, *FAST, "--lora", f"{lora}:0.7",
        "-o", tmp_path / "lora.png")
    code, _, _ = run(capsys, "generate", "--from-png", tmp_path / "lora.png", "-o", tmp_path / "again.png", "-q",
                     "--no-watermark")
    assert code == 0 and np.array_equal(pixels(tmp_path / "lora.png"), pixels(tmp_path / "again.png"))


def test_missing_lora_is_named(files, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a star", "--model", files[0], *FAST, "--lora", tmp_path / "missing.safetensors")
    assert code == 2 and "missing.safetensors" in err and err.count("\n") == 1
