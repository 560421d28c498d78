"""`--preset`: each few-step model's published settings, on a tiny model in the layout that model ships in.

turbo: an all-in-one checkpoint; lightning: a UNet-only file (`--unet`); hyper-8step and lcm: LoRAs (kohya and
PEFT files written by `sdxl.adapters.lora`). Each run must load, sample and record exactly the preset's settings.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, run
from PIL import Image

from sdxl.errors import SDXLError
from sdxl.formats import checkpoint as ck
from sdxl.adapters.lora import add_lora, save_lora
from sdxl.models.model import TINY_BASE, SDXLModel
from sdxl.presets import PRESETS, preset_settings
from test_fewstep import unet_files

pytestmark = pytest.mark.usefixtures("one_thread")
QUIET = ["--no-watermark", "-q", "--dtype", "fp32", "--seed", "1"]
SMALL = ["--width", "64", "--height", "64"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("presets")
    base = randomize(SDXLModel(TINY_BASE), 0, 0.05)
    out = {"base": ck.save_single_file(base, d / "base.safetensors"),
           "unet": unet_files(randomize(SDXLModel(TINY_BASE), 3, 0.05), d)["diffusers"]}
    for name, fmt in (("hyper", "kohya"), ("lcm", "peft")):
        adapter = SDXLModel(TINY_BASE)
        for p in add_lora(adapter, rank=4):
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        out[name] = save_lora(adapter, d / f"{name}.safetensors", format=fmt)
    return out


def recipe(path) -> dict:
    return json.loads(Image.open(path).info["sdxl-recipe"])


# (preset, the files' flags, size flags); turbo's 512x512 is checked on its Request (a run at 512 takes a minute)
CASES = [("turbo", lambda f: ["--model", f["base"]], SMALL),
         ("lightning-4step", lambda f: ["--model", f["base"], "--unet", f["unet"]], SMALL),
         ("lightning-8step", lambda f: ["--model", f["base"], "--unet", f["unet"]], SMALL),
         ("hyper-8step", lambda f: ["--model", f["base"], "--lora", f["hyper"]], SMALL),
         ("lcm", lambda f: ["--model", f["base"], "--lora", f["lcm"]], SMALL)]


@pytest.mark.parametrize("preset, model_flags, size", CASES, ids=[c[0] for c in CASES])
def test_preset_loads_samples_and_records_the_published_settings(files, tmp_path, capsys, preset, model_flags, size):
    out = tmp_path / f"{preset}.png"
    code, text, err = run(capsys, "generate", "a red circle", *model_flags(files), "--preset", preset, *size,
                          "-o", out, *QUIET)
    assert code == 0, err
    expected = preset_settings(preset) | {"width": 64, "height": 64}
    rec = recipe(out)
    assert {k: rec[k] for k in expected} == expected
    assert Image.open(out).size == (expected["width"], expected["height"])


def test_turbo_requests_512_pixels_unless_a_size_is_given(files):
    from sdxl.cli import _settings, build_parser
    from sdxl.session import build_request, resolve_models

    for extra, size in (([], 512), (["--width", "64", "--height", "64"], 64)):
        args = build_parser().parse_args(["generate", "a cat", "--model", str(files["base"]), "--preset", "turbo",
                                          *extra])
        models = resolve_models(args.model, None, True)
        req = build_request(_settings(args, None, models, None) | {"prompt": args.prompt}, models, "test")
        assert (req.sampler, req.schedule, req.steps, req.cfg, req.width, req.height) == (
            "euler_ancestral", "trailing", 1, 1.0, size, size)


def test_published_values():
    assert preset_settings("turbo") == {"sampler": "euler_ancestral", "schedule": "trailing", "steps": 1, "cfg": 1.0,
                                        "width": 512, "height": 512}
    assert {n: (p.sampler, p.schedule, p.steps, p.cfg) for n, p in PRESETS.items() if n != "turbo"} == {
        "lightning-4step": ("euler", "trailing", 4, 1.0), "lightning-8step": ("euler", "trailing", 8, 1.0),
        "hyper-8step": ("ddim", "trailing", 8, 1.0), "lcm": ("lcm", "sgm_uniform", 4, 1.0)}


def test_explicit_flags_override_the_preset(files, tmp_path, capsys):
    out = tmp_path / "o.png"
    code, _, err = run(capsys, "generate", "a red circle", "--model", files["base"], "--preset", "turbo", "--steps", 2,
                       "--cfg", 1.5, "--sampler", "tcd", *SMALL, "-o", out, *QUIET)
    assert code == 0, err
    rec = recipe(out)
    assert (rec["sampler"], rec["schedule"], rec["steps"], rec["cfg"], rec["width"]) == ("tcd", "trailing", 2, 1.5, 64)


def test_unknown_preset_is_refused(capsys):
    code, _, err = run(capsys, "generate", "a red circle", "--preset", "fast")
    assert code == 2 and "invalid choice: 'fast'" in err and "turbo" in err
    with pytest.raises(SDXLError, match="unknown preset 'fast'; choose one of: turbo, lightning-4step"):
        preset_settings("fast")
