"""A seeded mutation fuzz over generate's inputs (issue 11): CLI numbers and PNG recipes.

Each case runs `sdxl.cli.main` in-process and must end in "exit 2 and exactly one line on stderr, or success",
never a traceback. The model path does not exist, so a case that passes every input check ends in the
one-line "no such file" error instead of loading: the fuzz stays at the input boundary and takes seconds.
"""

import json
import random

import pytest
from PIL import Image, PngImagePlugin

from sdxl.cli import main
from sdxl.sampling.samplers import SAMPLERS as FLAGS_SAMPLERS
from sdxl.sampling.schedules import SCHEDULES as SCHEDULE_NAMES

NUMBERS = ["-1", "0", "1", "-0", "0.5", "1.5", "8", "64", "1000", "1001", "4096", "4104", "100000", "1e400", "nan",
           "inf", "-inf", "1e-300", "18446744073709551615", "18446744073709551616", "-9223372036854775809", "abc",
           "", " 5", "0x10", "1_000", "\u0663", "1,2", "8,8,8,8", "-8,8", "1.2.3", "--", "-5"]
FLAGS = {"--width": 1, "--height": 1, "--steps": 1, "--cfg": 1, "--seed": 1, "--batch": 1, "--strength": 1,
         "--hires-scale": 1, "--hires-strength": 1, "--hires-steps": 1, "--refiner-steps": 1, "--refiner-switch": 1,
         "--refiner-strength": 1, "--guidance-rescale": 1, "--guidance-interval": 2, "--latent-index": 1,
         "--aesthetic-score": 1, "--crop": 1, "--original-size": 1, "--outpaint": 1, "--sampler": 1, "--scheduler": 1,
         "--dtype": 1, "--device": 1}
JSON_VALUES = [None, True, False, 0, -1, 1, 2**64, -(2**64), 10**400 // 10**300, 1.5, -0.0, 1e308, "abc", "",
               "\udcff", [], [1], [1, 2], [1, 2, 3, 4], ["a", "b"], {}, {"a": 1}, [[[[]]]], "euler", "karras", 64]
RECIPE = {"prompt": "a star", "negative_prompt": "", "width": 64, "height": 64, "steps": 2, "sampler": "euler",
          "schedule": "sgm", "cfg": 5.0, "guidance_interval": [0.0, 1.0], "seed": 3, "batch": 1, "crop": [0, 0],
          "strength": 1.0, "hires_upscale": "latent", "hires_strength": 0.5, "models": {"model": "m.safetensors"},
          "hashes": {}, "index": 0, "seed_of_image": 3, "dtype": "fp32"}


def check(capsys, argv) -> None:
    """One case: exit 0, or exit 2 with exactly one `sdxl: error:` line on stderr."""
    try:
        code = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 - any escape is the failure being looked for
        pytest.fail(f"{type(e).__name__}: {e} for {argv!r}")
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 0 or (code == 2 and len(lines) == 1 and lines[0].startswith("sdxl: error: ")), (argv, code, err)


def test_fuzz_cli_numbers(tmp_path, capsys):
    rng = random.Random(11)
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    base = ["generate", "x", "--model", tmp_path / "missing.safetensors", "-q", "-o", tmp_path / "o.png"]
    for _ in range(600):
        argv = list(base)
        for flag in rng.sample(sorted(FLAGS), rng.randint(1, 3)):
            argv += [flag, *(rng.choice(NUMBERS) for _ in range(FLAGS[flag]))]
        if rng.random() < 0.3:
            argv += ["--init-image", tmp_path / "init.png"]
        check(capsys, argv)


def mutate(recipe: dict, rng: random.Random):
    """A recipe with one to three random changes: a value replaced, a key dropped or added, the whole replaced."""
    r = json.loads(json.dumps(recipe))
    for _ in range(rng.randint(1, 3)):
        kind, key = rng.random(), rng.choice(sorted(r) or ["prompt"]) if isinstance(r, dict) else None
        if not isinstance(r, dict) or kind < 0.05:
            r = rng.choice(JSON_VALUES)
        elif kind < 0.7:
            r[key] = rng.choice(JSON_VALUES)
        elif kind < 0.8:
            r.pop(key, None)
        elif kind < 0.9:
            r[rng.choice(["models", "hashes", "latent"])] = {rng.choice(["model", "lora0", "x", "file"]):
                                                             rng.choice(JSON_VALUES)}
        else:
            r[rng.choice(["init_image", "mask", "init_latent", "colour", "index"])] = rng.choice(JSON_VALUES)
    return r


def test_fuzz_png_recipes(tmp_path, capsys):
    rng = random.Random(12)
    png = tmp_path / "r.png"
    for i in range(600):
        text = json.dumps(mutate(RECIPE, rng))
        if i % 10 == 0:  # byte-level damage to the JSON text
            j = rng.randrange(len(text))
            text = text[:j] + rng.choice(["", "{", "]", "\"", "\\", "\x00", "9" * 400]) + text[j + 1:]
        info = PngImagePlugin.PngInfo()
        info.add_text("sdxl-recipe", text, zip=rng.random() < 0.5)
        Image.new("RGB", (8, 8)).save(png, pnginfo=info)
        check(capsys, ["generate", "--from-png", png, "--model", tmp_path / "missing.safetensors", "-q",
                       "-o", tmp_path / "o.png"])


def test_fuzz_valid_looking_runs_on_a_tiny_model(tmp_path, capsys):
    """Inputs near the edges of what is allowed, run for real on a tiny random model (sizes in latent pixels of 2)."""
    from conftest import tiny_checkpoints

    base, refiner = tiny_checkpoints(tmp_path)
    rng = random.Random(13)
    Image.new("RGB", (37, 21), (200, 30, 30)).save(tmp_path / "odd.png")
    for i in range(12):
        argv = ["generate", rng.choice(["x", "", "(a:1.2.3) BREAK", "a " * 100]), "--model", base, "-q",
                "--no-watermark", "--dtype", "fp32", "-o", tmp_path / f"o{i}.png",
                "--steps", rng.choice(["1", "2", "3"]), "--seed", rng.choice(["-1", "0", "18446744073709551614"]),
                "--sampler", rng.choice(sorted(FLAGS_SAMPLERS)), "--scheduler", rng.choice(SCHEDULE_NAMES)]
        argv += rng.choice([["--width", rng.choice(["8", "24", "40", "72"]), "--height", rng.choice(["8", "16", "56"])],
                            ["--init-image", tmp_path / "odd.png", "--strength", rng.choice(["0", "0.01", "1"])],
                            ["--init-image", tmp_path / "odd.png", "--outpaint", "0,3,9,0", "--width", "64"]])
        argv += rng.choice([[], ["--hires-scale", "1.3"], ["--refiner", refiner, "--refiner-strength", "0.5"],
                            ["--cfg", "0"], ["--guidance-interval", "0.5", "0.5"]])
        check(capsys, argv)
