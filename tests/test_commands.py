"""The commands that moved into `sdxl` (cli.py): judge train, recipe, train-vae, detect-watermark.

Each runs through `sdxl.cli.main` as a user would; bad input gives exit code 2 and one line on stderr.
The recipe's stages at a tiny scale are in test_recipe.py (called directly; its data stage through `main(["recipe", ...])`).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdxl.cli import main
from sdxl.lab import world
from sdxl.lab.judge import Judge
from sdxl.watermark import add_watermark

pytestmark = pytest.mark.usefixtures("one_thread")


def error_line(capsys) -> str:
    """The single stderr line of a refused command."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_library_code_never_raises_system_exit():
    src = Path(__file__).parent.parent / "src" / "sdxl"
    offenders = [str(p) for p in src.rglob("*.py") if p.name != "cli.py" and "SystemExit" in p.read_text()]
    assert offenders == []


@pytest.fixture(scope="module")
def watermarked(tmp_path_factory):
    """A textured 256x256 image with the mark, and one without."""
    folder = tmp_path_factory.mktemp("wm")
    pixels = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    clean = Image.fromarray(pixels)
    clean.save(folder / "clean.png")
    add_watermark([clean])[0].save(folder / "marked.png")
    return folder


def test_detect_watermark_prints_one_line_per_image(watermarked, capsys):
    paths = [str(watermarked / "marked.png"), str(watermarked / "clean.png")]
    assert main(["detect-watermark", *paths]) == 0
    marked_line, clean_line = capsys.readouterr().out.splitlines()
    assert re.fullmatch(rf"{re.escape(paths[0])}: (4[4-8])/48 bits match: very likely watermarked", marked_line)
    assert re.fullmatch(rf"{re.escape(paths[1])}: \d+/48 bits match: (no watermark|partial match)", clean_line)


@pytest.mark.parametrize("name, content, message", [
    ("missing.png", None, "missing.png: no such file"),
    ("notes.txt", "not an image", "notes.txt: not a readable image"),
    ("small.png", (200, 300), r"small.png is 200x300; .* at least 256x256"),
])
def test_detect_watermark_refuses_a_bad_file_in_one_line(name, content, message, tmp_path, capsys):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        Image.new("RGB", content).save(path)
    assert main(["detect-watermark", str(path)]) == 2
    assert re.fullmatch(rf"sdxl: error: .*{message}.*", error_line(capsys))


def test_judge_train_writes_a_loadable_judge_and_its_record(tmp_path, capsys):
    out = tmp_path / "j" / "judge"
    argv = ["judge", "train", "--steps", "2", "--batch", "4", "--pool", "8", "--heldout", "4", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "held-out clean_64px:" in printed and f"saved {out}.safetensors" in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["train"]["command"] == f"sdxl judge train --steps 2 --seed 0 --pool 8 --out {out}"
    assert meta["heldout"]["n"] == 4 and 0 <= meta["heldout"]["clean_64px"]["labels"]["background"] <= 1
    assert len(Judge.load(out).predict([Image.new("RGB", (64, 64), (200, 30, 30))])) == 1


def test_judge_train_refuses_zero_steps(tmp_path, capsys):
    assert main(["judge", "train", "--steps", "0", "--out", str(tmp_path / "judge")]) == 2
    assert error_line(capsys).startswith("sdxl: error: steps, batch, pool and heldout must be at least 1")
    assert list(tmp_path.iterdir()) == []


def test_recipe_refuses_an_unknown_stage_before_doing_anything(tmp_path, capsys):
    assert main(["recipe", "--out", str(tmp_path / "run"), "--stages", "data,bake"]) == 2
    assert error_line(capsys) == ("sdxl: error: unknown stage 'bake'; choose from data, vae, init, vae-decoder, "
                                  "base, refiner, variants, export, export-variants")
    assert not (tmp_path / "run").exists()


def test_python_m_recipe_still_runs_the_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "sdxl.lab.recipe", "--out", str(tmp_path), "--stages", "bake"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().endswith("unknown stage 'bake'; choose from data, vae, "
                                                                  "init, vae-decoder, base, refiner, variants, "
                                                                  "export, export-variants")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    world.make_dataset(folder, 4, 0, sizes=((64, 64),), supersample=1)
    return folder


def test_train_vae_writes_the_file_and_its_record(images, tmp_path):
    out = tmp_path / "vae.safetensors"
    argv = ["train-vae", "--dataset", str(images), "--out", str(out), "--set", "steps=2", "--set", "batch_size=2", "-q"]
    assert main(argv) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert out.is_file() and meta["steps"] == 2 and meta["batch_size"] == 2 and meta["images"] == 4


@pytest.mark.parametrize("existing", ["mine.safetensors", "mine.json"])
def test_train_vae_never_overwrites_out_or_its_record(images, tmp_path, capsys, existing):
    out = tmp_path / "mine.safetensors"
    (tmp_path / existing).write_bytes(b"the user's file")
    assert main(["train-vae", "--dataset", str(images), "--out", str(out), "--set", "steps=2"]) == 2
    assert f"{existing}: already exists" in error_line(capsys)
    assert (tmp_path / existing).read_bytes() == b"the user's file" and len(list(tmp_path.iterdir())) == 1


def test_train_vae_out_is_a_safetensors_name(images, tmp_path, capsys):
    assert main(["train-vae", "--dataset", str(images), "--out", str(tmp_path / "vae.txt"), "--set", "steps=2"]) == 2
    assert "give a .safetensors file name" in error_line(capsys) and not list(tmp_path.iterdir())


@pytest.mark.parametrize("item, message", [
    ("steps=two", "--set steps: expected an integer, got 'two'"),
    ("stepz=2", "--set 'stepz=2': expected KEY=VALUE, KEY one of crop, resolution"),
    ("steps", "--set 'steps': expected KEY=VALUE"),
    ("lr=nan", "lr must be a finite number, got nan"),
    ("lr=1e30", "lr must be in (0, 1], got 1e+30"),
    ("steps=0", "steps must be at least 1, got 0"),
    ("crop=7", "crop must be 0 (whole buckets) or a multiple of 8 from 8 to"),
    ("crop=4096", "crop must be 0 (whole buckets) or a multiple of 8 from 8 to"),
    ("bucket_step=0", "resolution (128) must be a multiple of bucket_step (0)"),
    ("probe=0", "probe must be in 1..4096 crops, got 0"),
    ("kl_weight=-1", "kl_weight must be at least 0, got -1.0"),
    ('device="bogus"', "--device 'bogus' is not a device"),
])
def test_train_vae_refuses_a_bad_setting_in_one_line(item, message, images, tmp_path, capsys):
    out = tmp_path / "vae.safetensors"
    assert main(["train-vae", "--dataset", str(images), "--out", str(out), "--set", item]) == 2
    assert error_line(capsys).startswith("sdxl: error: " + message) and not out.exists()
