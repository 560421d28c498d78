"""`sdxl eval` on tiny random models: measures, UNet swapping, each experiment's rows, the CLI end to end."""

import contextlib
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize, tiny_checkpoints
from PIL import Image, ImageFilter
from safetensors.torch import save_file

from sdxl.formats import checkpoint as ck
from sdxl.lab import evaluate as ev
from sdxl.cli import main
from sdxl.errors import SDXLError
from sdxl.lab.judge import Judge
from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel
from sdxl.pipeline import Pipeline
from sdxl.models.tokenizer import Tokenizer
from sdxl.lab.world import render

S = ev.Settings(resolution=64, n=2, steps=(2,), samplers=("euler",), native_steps=40, batch=2)
S32 = replace(S, resolution=32)  # where the sizes do not matter: a UNet call on 16x16 latents is ~3x faster
FAST = ["--resolution", 64, "--n", 2, "--steps", 2, "--samplers", "euler", "--dtype", "fp32", "-q"]


def unet_file(path, seed: int, dtype=torch.float32):
    """A UNet-only single file (keys model.diffusion_model.*), as the trainer's variants."""
    sd = randomize(SDXLModel(TINY_BASE), seed, 0.05).state_dict()
    save_file({k: v.to(dtype).contiguous() for k, v in sd.items() if k.startswith("model.diffusion_model.")}, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    base, ref = tiny_checkpoints(d)
    (d / "variants").mkdir()
    for i, name in enumerate(("full", "no-crop", "no-size", "no-size-drop-small")):
        unet_file(d / "variants" / f"{name}.safetensors", 10 + i, torch.float16 if i % 2 else torch.float32)
    return base, ref, d / "variants"


@pytest.fixture(scope="module")
def pipe(files):
    base, ref, _ = files
    return Pipeline.load(base, ref, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


@pytest.fixture(scope="module")
def scenes():
    return ev.eval_scenes(S.n, S.seed)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def fraction(v) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0


def test_sharpness_blur_lowers_it_and_constant_is_zero(scenes):
    sharp = render(scenes[0], 128, 128)
    assert ev.sharpness(Image.new("RGB", (64, 64), (30, 200, 90))) == 0.0
    assert ev.sharpness(sharp.filter(ImageFilter.GaussianBlur(2))) < 0.5 * ev.sharpness(sharp)
    # the kernel on a known image: one bright pixel in a 3x3 field -> Laplacian -4 * 255 at its centre only
    dot = np.zeros((5, 5, 3), np.uint8)
    dot[2, 2] = 255
    lap = np.array([[0, 255, 0], [255, -1020, 255], [0, 255, 0]], float)
    assert ev.sharpness(Image.fromarray(dot)) == pytest.approx(lap.var())


def test_eval_scenes_are_fixed_and_aspect_sizes():
    assert [s.caption for s in ev.eval_scenes(3, 0)] == [s.caption for s in ev.eval_scenes(3, 0)]
    assert [s.caption for s in ev.eval_scenes(3, 0)] != [s.caption for s in ev.eval_scenes(3, 1)]
    assert ev.aspect_sizes(128) == [(128, 128), (160, 96), (96, 160)]
    assert ev.aspect_sizes(256) == [(256, 256), (320, 192), (192, 320)]


def test_with_unet_swaps_the_unet_only(files):
    base_path, _, variants = files
    base = ck.load(base_path)
    unet = ck.load(variants / "no-crop.safetensors", dtype=torch.float32, components=("unet",))  # stored fp16
    model = ev.with_unet(base, unet)
    assert model.unet is unet.unet and model.conditioner is base.conditioner and model.vae is base.vae
    # the same images as one full model holding the base's encoders and VAE and the variant's UNet
    whole = SDXLModel(TINY_BASE)
    whole.load_state_dict(base.state_dict() | unet.state_dict())
    req = S32.request(prompt="a red circle on a blue background", seed=3)
    latents = lambda m: Pipeline(m, dtype=torch.float32, tokenizer=tok).generate(req).latents  # noqa: E731
    tok = Tokenizer.default()
    ours = latents(model)
    torch.testing.assert_close(ours, latents(whole))
    assert not torch.allclose(ours, latents(ck.load(base_path)))


def test_with_unet_refuses_a_unet_of_another_model(files):
    base = ck.load(files[0])
    with pytest.raises(SDXLError, match="context_dim 128 and adm_in_channels 1376 but the base's"):
        ev.with_unet(base, SDXLModel(TINY_REFINER, device="meta").unet)


def test_batched_prompts_equal_single_runs(pipe, scenes):
    prompts = [s.caption for s in scenes]
    req = S.request(prompt=tuple(prompts), seed=5, batch=2, crop=(8, 0), refiner_switch=0.8)
    batched = pipe.generate(req).latents
    singles = [pipe.generate(S.request(prompt=p, seed=5 + i, crop=(8, 0), refiner_switch=0.8)).latents
               for i, p in enumerate(prompts)]
    # as in test_pipeline: across batch sizes only fp32 GEMM blocking differs, so compare at the latents' scale
    torch.testing.assert_close(batched, torch.cat(singles), rtol=0, atol=2e-5 * float(batched.abs().max()))


def test_prompt_experiment(pipe, judge, scenes, tmp_path):
    rows = ev.prompt_experiment(pipe, judge, scenes, S, tmp_path)["rows"]
    assert [(r["model"], r["sampler"], r["steps"]) for r in rows] == [("base", "euler", 2), ("base+refiner", "euler", 2)]
    for r in rows:
        assert all(fraction(r[k]) for k in ("accuracy", "objects", "background"))
        assert r["position"] is None or fraction(r["position"])
        assert r["seconds"] > 0
    assert Image.open(tmp_path / "grid_prompts.png").size == (150 + 2 * 68, 2 * 68)  # cells of 64 px + 4 px gap


@pytest.fixture(scope="module")
def variants(pipe, files) -> dict:
    return {n: ev.variant_pipeline(pipe, files[2] / f"{n}.safetensors") for n in ev.VARIANTS["size"] + ("no-crop",)}


def test_crop_experiment_on_variants(variants, judge, scenes, tmp_path):
    crop = ev.crop_experiment(variants, judge, scenes, S32, tmp_path)["rows"]
    assert [(r["variant"], r["crop"]) for r in crop] == [
        (v, c) for v in ("full", "no-crop") for c in ("0,0", "0,8", "8,0", "8,8")]  # r/4 = 8 px at 32
    assert all(fraction(r["border_cut"]) and fraction(r["accuracy"]) for r in crop)
    assert Image.open(tmp_path / "grid_crop.png").height == 8 * 36


def test_size_experiment_on_variants(variants, judge, scenes, tmp_path):
    size = ev.size_experiment(variants, judge, scenes, S32, tmp_path)
    assert [r["variant"] for r in size["rows"]] == ["full", "no-size", "no-size-drop-small"]
    assert all(r["fd"] >= 0 and fraction(r["accuracy"]) for r in size["rows"])
    assert [(r["variant"], r["original_size"]) for r in size["sharpness"]] == [
        ("full", 8), ("full", 16), ("full", 32), ("full", 64), ("no-size", "default"), ("no-size-drop-small", "default")]
    assert all(r["sharpness"] > 0 for r in size["sharpness"])
    assert Image.open(tmp_path / "grid_size.png").height == 6 * 36


def test_aspect_experiment(pipe, judge, scenes, tmp_path):
    rows = ev.aspect_experiment(pipe, judge, scenes, S, tmp_path)["rows"]
    assert [(r["model"], r["size"]) for r in rows] == [("base+refiner", s) for s in ("64x64", "96x64", "64x96")]
    assert all(fraction(r["accuracy"]) and fraction(r["border_cut"]) for r in rows)
    assert Image.open(tmp_path / "grid_aspect.png").size == (150 + 2 * 100, 3 * 100)


FAST32 = [*FAST, "--resolution", 32]  # the CLI's plumbing; the experiments' sizes are tested above at 64


@pytest.fixture(scope="module")
def cli_run(files, tmp_path_factory) -> tuple[int, str, Path]:
    """`sdxl eval` with base and refiner, experiments 1 and 4: (exit code, stdout, --out)."""
    base, ref, _ = files
    out = tmp_path_factory.mktemp("cli") / "out"
    with contextlib.redirect_stdout(io.StringIO()) as text:
        code = main(["eval", *map(str, ["--model", base, "--refiner", ref, "--experiments", "1,4", "--out", out,
                                        *FAST32])])
    return code, text.getvalue(), out


def test_cli_eval_writes_tables_results_and_grids(cli_run, files):
    code, text, out = cli_run
    assert code == 0
    assert "## 1. Prompt accuracy" in text and "| model | sampler | steps | accuracy |" in text
    assert "## 4. Multi-aspect" in text and "| base+refiner | 32x32 |" in text
    assert {p.name for p in out.iterdir()} == {"results.json", "grid_prompts.png", "grid_aspect.png"}
    first = json.loads((out / "results.json").read_text())
    assert first["settings"]["n"] == 2 and first["settings"]["other_steps"] == 2
    assert first["models"]["model"] == str(files[0])
    assert first["prompts"] == [s.caption for s in ev.eval_scenes(2, 0)]
    assert len(first["prompt_accuracy"]["rows"]) == 2 and len(first["aspect"]["rows"]) == 3


def test_cli_eval_never_replaces_results_before_reading_a_model(cli_run, tmp_path, capsys):
    _, _, out = cli_run
    before = (out / "results.json").read_bytes()
    code, _, err = run(capsys, "--model", tmp_path / "missing.safetensors", "--out", out, *FAST32)
    assert code == 2 and "results.json exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "results.json").read_bytes() == before


def test_cli_eval_overwrite_repeats_the_same_numbers(cli_run, files, tmp_path, capsys):
    base, ref, _ = files
    out = shutil.copytree(cli_run[2], tmp_path / "out")
    first = json.loads((out / "results.json").read_text())
    code, _, _ = run(capsys, "--model", base, "--refiner", ref, "--experiments", "1", "--out", out, "--overwrite",
                     *FAST32)
    assert code == 0
    again = json.loads((out / "results.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["prompt_accuracy"]["rows"]) == strip(first["prompt_accuracy"]["rows"])
    assert "aspect" not in again


def test_cli_missing_variants_are_skipped_with_a_note(files, tmp_path, capsys, monkeypatch):
    base, _, folder = files
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "no-crop.safetensors").write_bytes((folder / "no-crop.safetensors").read_bytes())
    code, text, _ = run(capsys, "--model", base, "--variants", partial, "--experiments", "2,3", "--out",
                        tmp_path / "a", *FAST)
    assert code == 0
    assert f"skipped: missing full.safetensors in {partial}" in text
    assert f"skipped: missing full.safetensors, no-size.safetensors, no-size-drop-small.safetensors in {partial}" in text
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert "skipped" in results["crop"] and "skipped" in results["size"]
    monkeypatch.chdir(tmp_path)  # no --variants and no bench/variants here
    code, text, _ = run(capsys, "--model", base, "--experiments", "2", "--out", tmp_path / "b", *FAST)
    assert code == 0 and "no --variants given" in text


@pytest.mark.parametrize("argv,message", [
    (["--samplers", "fast"], "unknown sampler fast"),
    (["--experiments", "5"], "--experiments takes numbers from 1,2,3,4"),
    (["--resolution", "100"], "multiple of 32"),
    (["--n", "0"], "at least 1"),
])
def test_cli_bad_input_one_line_exit_2(files, tmp_path, capsys, argv, message):
    base, _, _ = files
    code, _, err = run(capsys, "--model", base, "--out", tmp_path / "o", *FAST, *argv)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
