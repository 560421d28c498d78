"""What a generation starts from and what a server starts with, found by a fresh tester: a named refiner runs at
the native switch (A1111's refiner_switch_at default) instead of being recorded and never run; saved latents of
another count than the batch, an empty one, or a latent with an init image are one line; `sdxl serve` refuses a
bad port, an unavailable device, a port in use and a damaged job database before it starts."""

import socket

import numpy as np
import pytest
import torch
from conftest import FAST, run, tiny_checkpoints
from PIL import Image
from safetensors.torch import save_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("start"))


def pixels(path):
    return np.asarray(Image.open(path))


def test_a_named_refiner_runs_at_the_native_switch(files, tmp_path, capsys):
    base, refiner = files
    common = ["a red boat", "--model", base, "--seed", 3, *FAST, "--steps", 10]
    out = {}
    for name, extra in (("named", ["--refiner", refiner]), ("switch", ["--refiner", refiner, "--refiner-switch", 0.8]),
                        ("none", [])):
        code, _, err = run(capsys, "generate", *common, *extra, "-o", tmp_path / f"{name}.png")
        assert code == 0, err
        out[name] = pixels(tmp_path / f"{name}.png")
    assert np.array_equal(out["named"], out["switch"]) and not np.array_equal(out["named"], out["none"])
    assert "Refiner switch at: 0.8" in Image.open(tmp_path / "named.png").info["parameters"]


@pytest.fixture(scope="module")
def latents(files, tmp_path_factory):
    base, _ = files
    folder = tmp_path_factory.mktemp("latents")
    save_file({"latent": torch.randn(2, 4, 8, 8)}, folder / "two.safetensors")
    save_file({"latent": torch.zeros(0, 4, 8, 8)}, folder / "none.safetensors")
    save_file({"latent": torch.zeros(1, 4, 8, 8, dtype=torch.int32)}, folder / "ints.safetensors")
    return folder


@pytest.mark.parametrize("file, extra, words", [
    ("two", [], "holds 2 latents for a batch of 1: pick one with --latent-index I (0 to 1), or give --batch 2"),
    ("two", ["--batch", 3], "holds 2 latents for a batch of 3"),
    ("none", [], "latent has shape (0, 4, 8, 8), expected (N, 4, H/8, W/8) with N >= 1"),
    ("ints", [], "latent is torch.int32, expected floating point (as --save-latent writes)"),
])
def test_saved_latents_that_do_not_fit_the_batch(files, latents, tmp_path, capsys, file, extra, words):
    code, _, err = run(capsys, "generate", "a boat", "--model", files[0], "--latent", latents / f"{file}.safetensors",
                       *FAST, *extra, "-o", tmp_path / "x.png")
    assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "x.png").exists()


def test_saved_latents_of_the_batch_size_run(files, latents, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a boat", "--model", files[0], "--latent", latents / "two.safetensors",
                       "--batch", 2, "--steps", 2, "-q", "--no-watermark", "-o", tmp_path / "x.png")  # its size
    assert code == 0, err
    assert (tmp_path / "x-0.png").exists() and (tmp_path / "x-1.png").exists()


def test_a_latent_and_an_init_image_are_one_or_the_other(files, latents, tmp_path, capsys):
    Image.new("RGB", (64, 64), (200, 0, 0)).save(tmp_path / "red.png")
    code, _, err = run(capsys, "generate", "a boat", "--model", files[0], "--latent", latents / "two.safetensors",
                       "--latent-index", 0, "--init-image", tmp_path / "red.png", *FAST, "-o", tmp_path / "x.png")
    assert code == 2 and "--latent and --init-image both give the start of the image: give one of them" in err


@pytest.mark.parametrize("flags, words", [
    (["--port", "99999"], "expected a port number from 1 to 65535, got '99999'"),
    (["--port", "-1"], "expected a port number from 1 to 65535, got '-1'"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
])
def test_serve_refuses_bad_start_settings_in_one_line(capsys, tmp_path, flags, words):
    code, _, err = run(capsys, "serve", "--output-dir", tmp_path / "out", *flags)
    assert code == 2 and err.count("\n") == 1 and words in err, err


def test_serve_refuses_a_port_in_use_and_a_damaged_database(capsys, tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code, _, err = run(capsys, "serve", "--port", port, "--output-dir", tmp_path / "out")
    assert code == 2 and f"--port {port} on 127.0.0.1:" in err and "give a free --port" in err
    assert not (tmp_path / "out").exists()  # nothing made for a server that never started
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "jobs.sqlite3").write_bytes(b"not a database at all, just some bytes")
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    code, _, err = run(capsys, "serve", "--port", port, "--output-dir", tmp_path / "damaged")
    assert code == 2 and "jobs.sqlite3: not a usable job database" in err and "give another --output-dir" in err
    assert (tmp_path / "damaged" / "jobs.sqlite3").read_bytes() == b"not a database at all, just some bytes"


def test_a_mask_of_another_size_is_one_line_before_loading(files, tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (32, 32)).save(tmp_path / "mask.png")
    code, out, err = run(capsys, "generate", "a boat", "--model", files[0], "--init-image", tmp_path / "init.png",
                         "--mask", tmp_path / "mask.png", *FAST, "-o", tmp_path / "x.png")
    assert code == 2 and "mask is 32x32 but the image is 64x64; they must match" in err and "loaded" not in out


@pytest.mark.parametrize("argv, words", [
    (["generate", "a boat", "--medvram", "--lowvram"], "argument --lowvram: not allowed with argument --medvram"),
    (["generate", "a boat", "--refiner", "PROMPTS", "--no-refiner"],
     "argument --no-refiner: not allowed with argument --refiner"),
    (["generate", "a boat", "--prompts", "PROMPTS"], "a prompt and --prompts FILE were both given"),
    (["serve", "--models-dir", "PROMPTS"], "--models-dir PROMPTS: not a folder"),
    (["generate", "a boat", "--save-latent", "."],
     "--save-latent . is a folder; give a file name such as sdxl.safetensors"),
    (["generate", "a boat", "-o", "."], "-o . is a folder; give a file name such as sdxl.png"),
])
def test_conflicting_or_misplaced_inputs_are_one_line(capsys, tmp_path, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "PROMPTS").write_text("a red boat\n")
    code, _, err = run(capsys, *argv)
    assert code == 2 and words in err and err.count("\n") == 1, err
