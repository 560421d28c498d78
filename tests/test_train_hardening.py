"""`sdxl train` against bad input (issue 11): every bad setting, path or file is one line and exit 2, nothing
non-finite is written, and no file the run did not write is replaced. Tiny models, 32 px images, CPU."""

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image
from safetensors.torch import save_file

from sdxl.cli import main
from sdxl.errors import SDXLError
from sdxl.models.model import TINY_BASE, SDXLModel
from sdxl.train import checkpointing, config, loop

TINY = dict(dataset="synthetic:8", resolution=32, bucket_step=16, batch_size=2, steps=2, lr=1e-3,
            checkpoint_every=1, save_dtype="fp32", unet={"model_channels": 32}, clip_l={"layers": 2},
            bigg={"layers": 2})

pytestmark = pytest.mark.usefixtures("one_thread")


def toml(path: Path, values: dict) -> Path:
    flat = [f"{k} = {json.dumps(v)}" for k, v in values.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in v.items())
              for k, v in values.items() if isinstance(v, dict)]
    path.write_text("\n".join(flat + tables) + "\n")
    return path


def train(capsys, *argv) -> tuple[int, str]:
    code = main(["train", *map(str, argv), "--quiet"])
    return code, capsys.readouterr().err


def one_line(err: str, message: str) -> bool:
    return message in err and err.count("\n") == 1


# --- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting,message", [
    ("lr=inf", "lr must be a finite number, got inf"),
    ("device=\"bogus\"", "--device 'bogus' is not a device; use cpu, cuda, cuda:N or mps"),
    ("lr_min=nan", "lr_min must be a finite number, got nan"),
    ("adam_eps=0", "adam_eps must be positive"),
    ("lora_alpha=nan", "lora_alpha must be a finite number, got nan"),
    ("offset_noise=nan", "offset_noise must be a finite number, got nan"),
    ("weight_decay=nan", "weight_decay must be a finite number, got nan"),
    ("adam_betas=[2.0, 0.9]", "adam_betas must each be in [0, 1), got [2.0, 0.9]"),
    ("num_workers=-1", "num_workers must be at least 0"),
    ("seed=100000000000000000000", "seed and sample_seed must be in [0, 2**63), got 100000000000000000000"),
    ("unet.model_channels=0", "[unet] model_channels must be positive, got 0"),
    ("vae.ch_mult=[]", "[vae] ch_mult: needs at least one value"),
    ("clip_l.vocab_size=10", "[clip_l] vocab_size 10 and max_length 77 must be at least the CLIP tokenizer's 49408"),
    ("lr=1e30", "lr must be in (0, 1] (AdamW"),
    ("resolution=100000", "resolution must be at most 4096"),
    ('dataset="synthetic:999999999"', "synthetic datasets are written synthetic:N with N in 1..1000000"),
    ("batch_size=100000", "batch_size must be at most 4096 per process, got 100000"),
])
def test_bad_setting_is_one_line_before_anything_runs(tmp_path, capsys, setting, message):
    code, err = train(capsys, toml(tmp_path / "c.toml", TINY), "--set", setting, "--output", tmp_path / "run")
    assert code == 2 and one_line(err, message), err
    assert not (tmp_path / "run").exists()


def test_a_config_built_in_python_gets_the_same_rules(tmp_path):
    cfg = dataclasses.replace(config.build(TINY), lr=math.inf)
    with pytest.raises(SDXLError, match="lr must be a finite number, got inf"):
        loop.train(cfg, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_deeply_nested_toml_is_one_line(tmp_path, capsys):
    deep = tmp_path / "deep.toml"
    deep.write_text("steps = " + "[" * 100_000 + "]" * 100_000 + "\n")
    code, err = train(capsys, deep)
    assert code == 2 and one_line(err, f"{deep}: not a usable config (arrays or tables nested too deeply)")


def test_config_path_a_folder_is_one_line(tmp_path, capsys):
    code, err = train(capsys, tmp_path)
    assert code == 2 and one_line(err, f"{tmp_path}: is a folder; give the TOML config file")


def test_a_fifo_as_the_config_is_refused_not_waited_on(tmp_path, capsys):
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    code, err = train(capsys, fifo)  # reading it would block forever
    assert code == 2 and one_line(err, f"config {fifo}: not a regular file; give a regular TOML file")


def test_a_fifo_named_by_a_manifest_is_skipped_not_opened(tmp_path):
    from sdxl.train import data

    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"file": "ok.png", "caption": "a"}) + "\n"
                        + json.dumps({"file": "pipe.png", "caption": "b"}) + "\n")
    items, skipped = data.scan(str(manifest), tmp_path)
    assert [Path(it.path).name for it in items] == ["ok.png"]
    assert skipped == [f"{tmp_path / 'pipe.png'}: not a regular file"]


def test_a_batch_larger_than_the_data_is_refused(tmp_path, capsys):
    code, err = train(capsys, toml(tmp_path / "c.toml", TINY), "--set", "batch_size=9", "--output", tmp_path / "run")
    assert code == 2 and one_line(err, "batch_size 9 x 1 process(es) is more than the 8 usable images"), err


def test_a_missing_dataset_says_so(tmp_path, capsys):
    code, err = train(capsys, toml(tmp_path / "c.toml", TINY), "--set", f'dataset="{tmp_path / "nothere"}"',
                      "--output", tmp_path / "run")
    assert code == 2 and one_line(err, "no such folder or file"), err


# --- the output folder -----------------------------------------------------------------------------

def test_output_an_existing_file_is_refused_and_kept(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    code, err = train(capsys, toml(tmp_path / "c.toml", TINY), "--output", mine)
    assert code == 2 and one_line(err, f"--output {mine} is a file; name a folder")
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("where", ["under-a-file", "proc", "long-name"])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys, where):
    (tmp_path / "afile").write_text("mine")
    output = {"under-a-file": tmp_path / "afile" / "sub", "proc": Path("/proc/sdxl-run"),
              "long-name": tmp_path / ("a" * 300)}[where]
    code, err = train(capsys, toml(tmp_path / "c.toml", TINY), "--output", output)
    assert code == 2 and one_line(err, f"--output {output}: cannot make the run's folder"), err
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("name", ["final.safetensors", "final_lora.safetensors"])
def test_a_users_final_file_is_never_overwritten(tmp_path, capsys, name):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"the user's own model")
    code, err = train(capsys, toml(tmp_path / "c.toml", TINY), "--output", out)
    assert code == 2 and one_line(err, f"{out} already holds {name} from another run; choose another --output")
    assert (out / name).read_bytes() == b"the user's own model"
    assert sorted(p.name for p in out.iterdir()) == [name]


# --- non-finite weights ----------------------------------------------------------------------------

def test_a_nan_input_model_is_refused(tmp_path, capsys):
    model = randomize(SDXLModel(TINY_BASE), seed=0, scale=0.05)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["model.diffusion_model.out.2.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(tmp_path / "nan.safetensors"))
    values = {k: v for k, v in TINY.items() if k not in ("unet", "clip_l", "bigg")}
    cfg = toml(tmp_path / "c.toml", {**values, "model": str(tmp_path / "nan.safetensors")})
    code, err = train(capsys, cfg, "--output", tmp_path / "run")
    message = "weight model.diffusion_model.out.2.weight holds NaN or Inf; a broken model cannot be trained"
    assert code == 2 and one_line(err, message), err
    assert not (tmp_path / "run" / "final.safetensors").exists()


@pytest.fixture
def set_weight(monkeypatch):
    """set_weight(step, value): an on_step hook that sets one trained weight of the run's model after `step`
    (as lr = 1e30 or a bad batch would)."""
    built = []
    real = loop.build_model
    monkeypatch.setattr(loop, "build_model", lambda *a: built.append(real(*a)) or built[-1])

    def hook(step: int, value: float):
        def on_step(state):
            if state["step"] == step:
                with torch.no_grad():
                    next(p for p in built[0].parameters() if p.requires_grad).view(-1)[0] = value
        return on_step
    return hook


def test_weights_that_turn_nan_are_never_saved(tmp_path, set_weight):
    """NaN weights after the checkpoint of step 2: steps 3-4 are skipped (fewer than max_nonfinite), and the end
    of the run refuses to write them; the last good checkpoint stays the latest."""
    cfg = config.build({**TINY, "steps": 4, "checkpoint_every": 2})
    out = tmp_path / "run"
    with pytest.raises(SDXLError, match=r"step 4: trained weight .* holds NaN or Inf; nothing was saved \(the last "
                                        r"good checkpoint is .*step-000002\); lower lr"):
        loop.train(cfg, out, quiet=True, on_step=set_weight(2, float("nan")))
    assert checkpointing.latest(out).name == "step-000002" and not (out / "final.safetensors").exists()
    assert not (out / "step-000004").exists()


def test_weights_that_overflow_the_save_dtype_are_never_written(tmp_path, set_weight):
    """1e6 is finite in fp32 (the checkpoint of the last step holds it) but Inf in fp16 (save_dtype)."""
    out = tmp_path / "run"
    message = r"final.safetensors: weight .* holds NaN or Inf; nothing was written \(fp16 cannot hold it"
    with pytest.raises(SDXLError, match=message):
        loop.train(config.build({**TINY, "save_dtype": "fp16"}), out, quiet=True, on_step=set_weight(2, 1e6))
    assert not (out / "final.safetensors").exists() and checkpointing.latest(out).name == "step-000002"


# --- resuming from a damaged checkpoint ------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-step run (checkpoints at steps 1 and 2) and its TOML."""
    d = tmp_path_factory.mktemp("finished")
    cfg = toml(d / "c.toml", TINY)
    loop.train(config.load(cfg), d / "run", quiet=True)
    return d / "run", cfg


@pytest.mark.parametrize("name,content", [
    ("state.json", b"{not json"),
    ("state.json", b"[]"),
    ("optimizer.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"),
    ("trained.safetensors", b""),
])
def test_a_damaged_checkpoint_is_one_line_on_resume(finished, tmp_path, capsys, name, content):
    run, cfg = finished
    out = shutil.copytree(run, tmp_path / "run")
    (out / "step-000002" / name).write_bytes(content)
    code, err = train(capsys, cfg, "--output", out, "--resume", "--set", "steps=3")
    assert code == 2 and one_line(err, f"{out / 'step-000002'}: the checkpoint cannot be read"), err
    assert f"point {out / 'latest'} at an earlier step-* folder" in err
    assert (out / "final.safetensors").read_bytes() == (run / "final.safetensors").read_bytes()


def test_a_folder_holding_a_run_is_not_started_again(finished, tmp_path, capsys):
    run, cfg = finished
    out = shutil.copytree(run, tmp_path / "run")
    code, err = train(capsys, cfg, "--output", out)
    assert code == 2 and one_line(err, f"{out} already holds a run (latest: step-000002); pass --resume")
    assert (out / "final.safetensors").read_bytes() == (run / "final.safetensors").read_bytes()


def test_resuming_a_finished_run_keeps_its_final_file(finished, tmp_path, capsys):
    run, cfg = finished
    out = shutil.copytree(run, tmp_path / "run")
    code, err = train(capsys, cfg, "--output", out, "--resume")
    assert code == 2 and one_line(err, "the run is already at step 2 of steps = 2; raise steps (--set steps=N)"), err
    assert (out / "final.safetensors").read_bytes() == (run / "final.safetensors").read_bytes()


def test_resuming_with_other_model_settings_names_the_mismatch(finished, tmp_path, capsys):
    run, cfg = finished
    out = shutil.copytree(run, tmp_path / "run")
    code, err = train(capsys, cfg, "--output", out, "--resume", "--set", "steps=3", "--set", "unet.model_channels=64")
    assert code == 2 and one_line(err, "its weights do not fit this config's model"), err
    assert "resume with the run's own model settings" in err


def test_resume_with_nothing_to_resume_is_one_line(tmp_path, capsys):
    code, err = train(capsys, toml(tmp_path / "c.toml", TINY), "--output", tmp_path / "run", "--resume")
    assert code == 2 and one_line(err, f"{tmp_path / 'run'}: nothing to resume (no {tmp_path / 'run' / 'latest'})")


# --- unreadable images -----------------------------------------------------------------------------

def truncated_images(folder: Path, n: int = 4) -> Path:
    """PNGs whose header reads (so the scan keeps them) but whose pixels are cut off."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        good = (folder / f"{i}.png").read_bytes()
        (folder / f"{i}.png").write_bytes(good[: len(good) // 2])
        (folder / f"{i}.txt").write_text(f"image {i}")
    return folder


def test_every_image_unreadable_with_a_cache_is_one_line(tmp_path, capsys):
    images = truncated_images(tmp_path / "imgs")
    cfg = toml(tmp_path / "c.toml", {**TINY, "dataset": str(images), "cache_dir": str(tmp_path / "cache")})
    code, err = train(capsys, cfg, "--output", tmp_path / "run")
    assert code == 2 and one_line(err, f"dataset {str(images)!r}: no readable images (4 could not be decoded)"), err


def test_an_unreadable_bucket_in_a_worker_is_one_line(tmp_path, capsys):
    images = truncated_images(tmp_path / "imgs")
    cfg = toml(tmp_path / "c.toml", {**TINY, "dataset": str(images), "num_workers": 1})
    code, err = train(capsys, cfg, "--output", tmp_path / "run")
    assert code == 2 and one_line(err, "every image of bucket (32, 32) is unreadable (4 tried"), err
    assert "Traceback" not in err


# --- eval ------------------------------------------------------------------------------------------

def test_eval_out_naming_a_file_is_one_line(tmp_path, capsys):
    mine = tmp_path / "results.txt"
    mine.write_text("mine")
    code = main(["eval", "--model", str(tmp_path / "missing.safetensors"), "--out", str(mine)])
    err = capsys.readouterr().err
    assert code == 2 and one_line(err, f"--out {mine} is a file; name a folder") and mine.read_text() == "mine"
