"""Issue 11 at the input boundary: every example of a bad input gets one line and exit 2, or the right result.

Grouped by kind as in the issue: silent wrong results, sizes, numbers, text, paths, images, PNG recipes.
Most refusals happen before a model is loaded; the rest run a tiny random model for 2 steps at 64x64.
"""

import json
import os
from pathlib import Path
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import FAST, draft_and_refine, randomize, run, tiny_checkpoints
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from sdxl.cli import main
from sdxl.formats import checkpoint as ck
from sdxl.formats.png import file_hash
from sdxl.images import load_image
from sdxl.request import Request
from sdxl.sampling import names
from sdxl.sampling.samplers import SAMPLERS
from sdxl.sampling.schedules import SCHEDULES


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("inputs"))


def refused(capsys, message: str, *argv) -> str:
    """Run; assert exit 2, exactly one line on stderr holding `message`; return that line."""
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("sdxl: error: ") and "Traceback" not in err, err
    assert message in err, err
    return err


def bomb_png(path, width=2147483647, height=1):
    """A ~70-byte PNG whose header claims width x height pixels (a decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
                     + chunk(b"IEND", b""))
    return path


def recipe_png(path, text: str):
    info = PngImagePlugin.PngInfo()
    info.add_text("sdxl-recipe", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


# --- silent wrong results ----------------------------------------------------------------------

def test_from_png_with_another_model_warns_naming_both_hashes(files, tmp_path, capsys):
    base, _ = files
    from sdxl.models.model import TINY_BASE, SDXLModel

    other = ck.save_single_file(randomize(SDXLModel(TINY_BASE), 7, 0.05), tmp_path / "other.safetensors")
    run(capsys, "generate", "a star", "--model", base, "--seed", 1, "-o", tmp_path / "a.png", *FAST)
    with pytest.warns(UserWarning) as caught:
        code, _, _ = run(capsys, "generate", "--from-png", tmp_path / "a.png", "--model", other, "-q",
                         "-o", tmp_path / "b.png")
    assert code == 0
    assert [str(w.message) for w in caught] == [
        f"model {other} has hash {file_hash(other)[:10]} but {tmp_path / 'a.png'} was made with hash "
        f"{file_hash(base)[:10]}; the image will differ"]


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "photo.png", exif=exif)
    im = load_image(tmp_path / "photo.png")
    assert im.size == (20, 40)
    assert im.getpixel((10, 5)) == (255, 0, 0) and im.getpixel((10, 35)) == (0, 0, 0)  # red on top


def test_generate_uses_the_upright_init_image(files, tmp_path, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 32), (200, 30, 30)).save(tmp_path / "portrait.jpg", exif=exif)  # shown 32 wide, 64 high
    code, _, _ = run(capsys, "generate", "x", "--model", files[0], "--init-image", tmp_path / "portrait.jpg",
                     "--steps", 2, "-q", "--no-watermark", "--dtype", "fp32", "-o", tmp_path / "out.png")
    assert code == 0 and Image.open(tmp_path / "out.png").size == (32, 64)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "grey16.png")
    im = load_image(tmp_path / "grey16.png")
    assert im.mode == "L" and im.getpixel((3, 3)) == 128
    assert im.convert("RGB").getpixel((0, 0)) == (128, 128, 128)


def test_from_png_replays_a_saved_latent(files, tmp_path, capsys):
    base, ref = files
    (code, _, _), lat = draft_and_refine(capsys, base, ref, tmp_path, 0.5, tmp_path / "r.png")
    assert code == 0
    rec = json.loads(Image.open(tmp_path / "r.png").info["sdxl-recipe"])
    assert rec["latent"] == {"file": str(lat), "index": 1, "hash": file_hash(lat)[:10]}
    code, _, _ = run(capsys, "generate", "--from-png", tmp_path / "r.png", "-o", tmp_path / "again.png", "-q",
                     "--no-watermark")
    assert code == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "r.png")), np.asarray(Image.open(tmp_path / "again.png")))


@pytest.mark.parametrize("present,message", [
    (False, "was made from the saved latent {lat} (index 1), which is not there; pass that file with --latent"),
    (True, "which has changed since (hash {have}, recorded 0123456789); replaying would give another image"),
])
def test_from_png_refuses_a_missing_or_changed_latent(tmp_path, capsys, present, message):
    lat = tmp_path / "d.safetensors"
    if present:
        save_file({"latent": torch.zeros(1, 4, 8, 8)}, str(lat))
    recipe = GOOD | {"latent": {"file": str(lat), "index": 1, "hash": "0123456789"}}
    png = recipe_png(tmp_path / "r.png", json.dumps(recipe))
    have = file_hash(lat)[:10] if present else ""
    refused(capsys, message.format(lat=lat, have=have), "generate", "--from-png", png, "-q")


def test_small_checkpoint_uses_its_recorded_native_size(files, tmp_path, capsys):
    from sdxl.models.model import TINY_BASE, SDXLModel

    meta = {"sdxl.train.config": json.dumps({"resolution": 48, "sample_steps": 2, "sample_cfg": 4.0})}
    small = ck.save_single_file(randomize(SDXLModel(TINY_BASE), 0, 0.05), tmp_path / "small.safetensors",
                                metadata=meta)
    code, out, _ = run(capsys, "generate", "a star", "--model", small, "--seed", 1, "-o", tmp_path / "s.png", "-q",
                       "--no-watermark", "--dtype", "fp32")
    assert code == 0 and f"size 48x48: the native resolution recorded in {small}" in out
    rec = json.loads(Image.open(tmp_path / "s.png").info["sdxl-recipe"])
    assert Image.open(tmp_path / "s.png").size == (48, 48) and rec["steps"] == 2 and rec["cfg"] == 4.0


# --- sizes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--width", "100000"], "over the limit of 4096 pixels a side"),
    (["--hires-scale", "100"], "makes 6400x6400, over the limit of 4096 pixels a side"),
])
def test_size_limits(files, capsys, argv, message):
    refused(capsys, message, "generate", "x", "--model", files[0], *FAST, *argv)


def test_oversized_latent_is_refused_before_loading(tmp_path, capsys):
    save_file({"latent": torch.zeros(1, 4, 1000, 1000)}, str(tmp_path / "big.safetensors"))
    refused(capsys, "over the limit of 64 latents of 512x512 (4096 pixels a side)", "generate", "x", "--model",
            tmp_path / "not-loaded.safetensors", "--latent", tmp_path / "big.safetensors", *FAST)


# --- numbers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--cfg", "-1"], "cfg must be in 0..100 (1 turns guidance off), got -1.0"),
    (["--strength", "0.5"], "strength 0.5 applies to img2img; give --init-image"),
    (["--seed", "18446744073709551616"], "seed must be in 0..2**64-1"),
    (["--seed", "-2"], "seed must be in 0..2**64-1"),
    (["--steps", "1001"], "steps must be in 1..1000, got 1001"),
    (["--steps", "1000", "--scheduler", "leading"], "at most 999 steps"),
    (["--hires-scale", "-1"], "hires-scale must be at least 1"),
    (["--guidance-interval", "-5", "5"], "guidance-interval must be START END with 0 <= START <= END <= 1"),
    (["--refiner-steps", "-1"], "refiner-steps must be in 1..1000, got -1"),
    (["--batch", "100000"], "batch must be in 1..64, got 100000"),
    (["--device", "nope"], "--device 'nope' is not a device"),
    (["--cfg", "nan"], "cfg must be a finite number"),
    (["--outpaint", "8,8,8,8"], "outpainting needs an init image (--init-image)"),
    (["--aesthetic-score", "1e300"], "aesthetic-score must be in 0..10"),
    (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--seed", "18446744073709551615", "--batch", "2"], "image i of a batch uses seed + i, which passes 2**64-1"),
    (["--hires-scale", "1.03"], "hires-scale 1.03 leaves 64x64 unchanged"),
    (["--latent-index", "1"], "--latent-index picks one latent of a --latent file; give --latent FILE too"),
    (["--device", "cpu:5"], "--device cpu:5: the CPU is one device; use cpu"),
    (["--cfg", "-inf"], "cfg must be a finite number, got -inf"),  # a value, not a flag
    (["--crop", "-5,-5"], "crop must be in 0..65536 (micro-conditioning sizes, crops and outpaint pads), got (-5, -5)"),
])
def test_numbers_out_of_range(tmp_path, capsys, argv, message):
    # the model file does not exist: every one of these is refused before anything is loaded
    refused(capsys, message, "generate", "x", "--model", tmp_path / "not-loaded.safetensors", *FAST, *argv)


def test_seed_minus_one_is_random(files, tmp_path, capsys):
    for name in ("r1.png", "r2.png"):
        assert run(capsys, "generate", "x", "--model", files[0], "--seed", -1, "-o", tmp_path / name, *FAST)[0] == 0
    seeds = [json.loads(Image.open(tmp_path / n).info["sdxl-recipe"])["seed"] for n in ("r1.png", "r2.png")]
    assert all(0 <= s < 2**32 for s in seeds) and seeds[0] != seeds[1]


def test_summary_names_the_dtype_and_why(files, tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "x", "--model", files[0], "-o", tmp_path / "d.png", *FAST)
    assert code == 0 and out.rstrip().endswith("fp32 (as asked)")


def generate_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_says_how_the_dtype_is_chosen(capsys):
    assert "on CPUs bf16 where a quick matmul probe finds it faster than fp32" in \
        generate_help(capsys)


# --- text --------------------------------------------------------------------------------------

def test_non_utf8_prompt_argument(tmp_path, capsys):
    prompt = b"a \xff cat".decode("utf-8", "surrogateescape")  # how Python hands over such a byte in argv
    refused(capsys, r"prompt holds a byte that is not UTF-8 text (b'\xff' at character 2)", "generate", prompt,
            "--model", tmp_path / "not-loaded.safetensors", *FAST)


def test_non_utf8_prompt_argument_from_a_real_command_line(tmp_path):
    import subprocess
    import sys

    argv = [sys.executable, "-m", "sdxl.cli", "generate", b"a \xff cat", "--model", tmp_path / "none.safetensors", "-q"]
    r = subprocess.run(argv, capture_output=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and b"not UTF-8 text" in r.stderr, r.stderr


def test_latin1_prompts_file(tmp_path, capsys):
    (tmp_path / "p.txt").write_bytes("a café\n".encode("latin-1"))
    refused(capsys, "not UTF-8 text (byte 0xe9 at offset 5); save the file as UTF-8", "generate", "--prompts",
            tmp_path / "p.txt", "--model", tmp_path / "not-loaded.safetensors", *FAST)


# --- paths -------------------------------------------------------------------------------------

def test_output_under_a_regular_file(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    refused(capsys, "is a file, not a folder", "generate", "x", "--model", tmp_path / "not-loaded.safetensors",
            "-o", tmp_path / "file.txt" / "a.png", *FAST)
    assert (tmp_path / "file.txt").read_text() == "mine"


@pytest.mark.parametrize("name,message", [
    ("/dev/null", "-o /dev/null is not a regular file (a device or pipe)"),
    ("out.jpg", "the file written is PNG (it carries the infotext) so its name must end in .png, e.g. out.png"),
])
def test_output_that_is_not_a_png_file(tmp_path, capsys, name, message):
    target = name if name.startswith("/") else tmp_path / name
    refused(capsys, message, "generate", "x", "--model", tmp_path / "not-loaded.safetensors", "-o", target, *FAST)
    assert not Path("/dev/null-1").exists() and (name.startswith("/") or not (tmp_path / name).exists())


def test_output_name_with_a_byte_that_is_not_utf8(files, tmp_path, capsys):
    name = os.fsdecode(b"\xff.png")  # what Python makes of such a command-line argument
    assert run(capsys, "generate", "x", "--model", files[0], "-o", tmp_path / name, *FAST)[0] == 0
    assert Image.open(tmp_path / name).size == (64, 64)


def test_a_latent_keeps_its_size(files, tmp_path, capsys):
    lat = tmp_path / "d.safetensors"
    assert run(capsys, "generate", "x", "--model", files[0], "--save-latent", lat, "-o", tmp_path / "d.png", *FAST)[0] == 0
    refused(capsys, f"--latent {lat} is 64x64 pixels; --width/--height cannot change it", "generate", "x", "--model",
            files[0], "--latent", lat, "-o", tmp_path / "e.png", *FAST[:2], "--width", "128", *FAST[6:])


def test_output_name_too_long(tmp_path, capsys):
    refused(capsys, "a name of 304 bytes is too long here", "generate", "x", "--model",
            tmp_path / "not-loaded.safetensors", "-o", tmp_path / ("n" * 300 + ".png"), *FAST)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_output_in_a_read_only_folder(tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    refused(capsys, "cannot write in", "generate", "x", "--model", tmp_path / "not-loaded.safetensors",
            "-o", tmp_path / "ro" / "a.png", *FAST)


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs sysfs, a file system that refuses new files")
def test_output_on_a_file_system_that_refuses_new_files(capsys):
    # sysfs refuses every new file, to root too: the check runs before anything is loaded
    refused(capsys, "-o /sys/kernel/a.png: cannot write in /sys/kernel (read-only); choose another folder",
            "generate", "x", "--model", "/nonexistent/not-loaded.safetensors", "-o", "/sys/kernel/a.png", *FAST)


def test_save_latent_into_a_missing_folder_writes_both(files, tmp_path, capsys):
    code, _, _ = run(capsys, "generate", "x", "--model", files[0], "-o", tmp_path / "a.png",
                     "--save-latent", tmp_path / "new" / "deep" / "l.safetensors", *FAST)
    assert code == 0 and (tmp_path / "a.png").is_file() and (tmp_path / "new" / "deep" / "l.safetensors").is_file()


def test_save_latent_under_a_file_fails_before_the_png(files, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("mine")
    refused(capsys, "--save-latent", "generate", "x", "--model", files[0], "-o", tmp_path / "a.png",
            "--save-latent", tmp_path / "file.txt" / "l.safetensors", *FAST)
    assert not (tmp_path / "a.png").exists()


def test_fifo_init_image_does_not_block(tmp_path, capsys):
    import threading

    os.mkfifo(tmp_path / "pipe.png")
    # should the FIFO ever be opened for reading, this writer lets the read end (empty) instead of hanging the suite
    threading.Thread(target=lambda: open(tmp_path / "pipe.png", "wb").close(), daemon=True).start()
    refused(capsys, "pipe.png: not a regular file", "generate", "x", "--model", tmp_path / "not-loaded.safetensors",
            "--init-image", tmp_path / "pipe.png", *FAST)


# --- images ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--init-image", "--mask", "--from-png", "detect-watermark"])
def test_decompression_bomb(tmp_path, capsys, flag):
    bomb = bomb_png(tmp_path / "bomb.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    if flag == "detect-watermark":
        argv = ["detect-watermark", bomb]
    else:
        extra = ["--init-image", tmp_path / "init.png"] if flag == "--mask" else []
        argv = ["generate", "x", "--model", tmp_path / "not-loaded.safetensors", *FAST, *extra, flag, bomb]
    refused(capsys, "claims more than 89478485 pixels (a decompression bomb?); refused", *argv)


def test_outpaint_a_one_pixel_image(tmp_path, capsys):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    refused(capsys, "the init image is 1x1 pixels; it must be at least 8x8", "generate", "x", "--model",
            tmp_path / "not-loaded.safetensors", "--init-image", tmp_path / "dot.png", "--outpaint", "8,8,8,8",
            "--steps", "2", "-q")


def test_a_one_pixel_init_image_is_named(tmp_path, capsys):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    refused(capsys, "the init image is 1x1 pixels; it must be at least 8x8", "generate", "x", "--model",
            tmp_path / "not-loaded.safetensors", "--init-image", tmp_path / "dot.png", "--steps", "2", "-q")


def test_an_init_image_over_the_size_limit_is_named(tmp_path, capsys):
    Image.new("RGB", (4104, 16)).save(tmp_path / "wide.png")
    refused(capsys, "4104x16 is over the limit of 4096 pixels a side; give a smaller --init-image", "generate", "x",
            "--model", tmp_path / "not-loaded.safetensors", "--init-image", tmp_path / "wide.png", "--steps", "2", "-q")


def test_mask_and_outpaint_together_are_refused(tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    refused(capsys, "--mask and --outpaint cannot be combined", "generate", "x", "--model",
            tmp_path / "not-loaded.safetensors", "--init-image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
            "--outpaint", "8,8,8,8", "--steps", "2", "-q")


# --- PNG recipes -------------------------------------------------------------------------------

GOOD = {"prompt": "a star", "width": 64, "height": 64, "steps": 2, "seed": 3}


@pytest.mark.parametrize("recipe,message", [
    ([1, 2], "its sdxl recipe is not a JSON object"),
    (GOOD | {"models": ["m.safetensors"]}, "models must be an object, got ['m.safetensors']"),
    (GOOD | {"models": {"model": 5}}, "models.model must be a file name (a string), got 5"),
    (GOOD | {"models": {"model": "/etc/passwd"}}, "models.model '/etc/passwd' is not a checkpoint name"),
    (GOOD | {"models": {"lora0": "/etc/passwd:0.5"}}, "models.lora0 '/etc/passwd:0.5' is not a checkpoint name"),
    (GOOD | {"models": {"model": "sdxl:../../x.safetensors"}}, "is not a checkpoint name"),
    (GOOD | {"width": "abc"}, "its sdxl recipe: width must be an integer, got 'abc'"),
    (GOOD | {"cfg": "high"}, "cfg must be a number, got 'high'"),
    (GOOD | {"crop": [0]}, "crop must be a list of 2 integers, got [0]"),
    (GOOD | {"prompt": 7}, "prompt must be a string or a list of strings, got 7"),
    (GOOD | {"init_image": "x.png"}, "init_image cannot be given as a setting; pass the file with --init-image"),
    (GOOD | {"seed": 2**64}, "seed must be in 0..2**64-1"),
    (GOOD | {"dtype": "fp8"}, "dtype must be one of fp32, bf16, fp16"),
    (GOOD | {"latent": "d.safetensors"}, "latent must be an object with file, index and hash"),
    (GOOD | {"colour": "red"}, "unknown setting 'colour'"),
])
def test_bad_recipes(tmp_path, capsys, recipe, message):
    png = recipe_png(tmp_path / "r.png", json.dumps(recipe))
    refused(capsys, message, "generate", "--from-png", png, "--model", tmp_path / "not-loaded.safetensors", "-q")


def test_a_recipe_key_given_twice_is_refused(tmp_path, capsys):
    png = recipe_png(tmp_path / "r.png", '{"prompt": "a", "steps": 4, "width": 64, "height": 64, "steps": 999}')
    refused(capsys, "its sdxl recipe is ambiguous: the key 'steps' is given twice", "generate", "--from-png", png,
            "--model", tmp_path / "not-loaded.safetensors", "-q")


def test_a_recipe_without_a_prompt_says_so(tmp_path, capsys):
    png = recipe_png(tmp_path / "r.png", json.dumps({"width": 64, "height": 64, "steps": 2}))
    refused(capsys, f"{png}: its recipe holds no prompt; give one", "generate", "--from-png", png, "--model",
            tmp_path / "not-loaded.safetensors", "-q")


def test_a_recipe_model_missing_here_names_the_flag(tmp_path, capsys):
    png = recipe_png(tmp_path / "r.png", json.dumps(GOOD | {"models": {"model": "/nowhere/m.safetensors",
                                                                       "refiner": None}}))
    refused(capsys, "was made with model /nowhere/m.safetensors, which is not on this machine; give --model PATH",
            "generate", "--from-png", png, "-q")


def test_the_default_model_is_recorded_without_a_local_path(tmp_path, capsys):
    assert main(["generate", "a red circle on a blue background", "--steps", "2", "-q", "--no-watermark",
                 "-o", str(tmp_path / "d.png")]) == 0
    rec = json.loads(Image.open(tmp_path / "d.png").info["sdxl-recipe"])
    assert rec["models"] == {"model": "sdxl:default_base.safetensors", "refiner": "sdxl:default_refiner.safetensors"}
    assert main(["generate", "--from-png", str(tmp_path / "d.png"), "-q", "--no-watermark",
                 "-o", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d.png")), np.asarray(Image.open(tmp_path / "again.png")))


def test_replaying_img2img_needs_the_same_init_image(files, tmp_path, capsys):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    made = tmp_path / "made.png"
    assert run(capsys, "generate", "x", "--model", files[0], "--init-image", tmp_path / "a.png", "--strength", "0.5",
               "-o", made, *FAST)[0] == 0
    refused(capsys, f"{made} was made from an init image (hash ", "generate", "--from-png", made, "-q")
    with pytest.warns(UserWarning) as caught:
        code, _, _ = run(capsys, "generate", "--from-png", made, "--init-image", tmp_path / "b.png", "-q",
                         "-o", tmp_path / "other.png")
    assert code == 0 and [f"but {made} was made from one with hash" in str(w.message) for w in caught] == [True]
    assert run(capsys, "generate", "--from-png", made, "--init-image", tmp_path / "a.png", "-q", "--no-watermark",
               "-o", tmp_path / "same.png")[0] == 0
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(tmp_path / "same.png")))


def test_a_recipe_with_one_prompt_per_image_names_each_in_its_infotext(files, tmp_path, capsys):
    png = recipe_png(tmp_path / "r.png", json.dumps(GOOD | {"prompt": ["a star", "a moon"], "batch": 2}))
    assert run(capsys, "generate", "--from-png", png, "--model", files[0], "-o", tmp_path / "o.png", *FAST)[0] == 0
    firsts = [Image.open(tmp_path / f"o-{i}.png").info["parameters"].splitlines()[0] for i in (0, 1)]
    assert firsts == ["a star", "a moon"]


def test_prompts_not_one_per_image_are_refused_before_loading(tmp_path, capsys):
    png = recipe_png(tmp_path / "r.png", json.dumps(GOOD | {"prompt": ["a star", "a moon"], "batch": 3}))
    refused(capsys, "prompt: 2 prompts for a batch of 3; give one per image or a single one", "generate",
            "--from-png", png, "--model", tmp_path / "not-loaded.safetensors", "-q")


def test_deeply_nested_recipe(tmp_path, capsys):
    png = recipe_png(tmp_path / "deep.png", "[" * 100_000 + "]" * 100_000)
    refused(capsys, "its sdxl recipe is not valid JSON (or nested too deeply)", "generate", "--from-png", png, "-q")


def test_oversized_ztxt_recipe(tmp_path, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("sdxl-recipe", " " * (8 << 20), zip=True)  # 8 MiB of text in a few kB of zTXt
    Image.new("RGB", (8, 8)).save(tmp_path / "z.png", pnginfo=info)
    refused(capsys, "not a readable image (Decompressed data too large", "generate", "--from-png",
            tmp_path / "z.png", "-q")


def test_a_good_handwritten_recipe_runs(files, tmp_path, capsys):
    png = recipe_png(tmp_path / "r.png", json.dumps(GOOD | {"models": {"model": str(files[0])}, "dtype": "fp32"}))
    code, _, _ = run(capsys, "generate", "--from-png", png, "-o", tmp_path / "out.png", "-q", "--no-watermark")
    rec = json.loads(Image.open(tmp_path / "out.png").info["sdxl-recipe"])
    assert code == 0 and rec["seed"] == 3 and rec["steps"] == 2 and Image.open(tmp_path / "out.png").size == (64, 64)


# --- one set of rules, one name table ----------------------------------------------------------

def test_request_from_dict_names_the_field():
    req = Request.from_dict({"prompt": "a", "guidance_interval": [0, 0.5], "crop": (8, 16), "seed": 4}, "api")
    assert req.guidance_interval == (0.0, 0.5) and req.crop == (8, 16) and req.seed == 4
    with pytest.raises(Exception, match=r"^api: steps must be an integer, got True$"):
        Request.from_dict({"prompt": "a", "steps": True}, "api")
    with pytest.raises(Exception, match=r"^api: no prompt$"):
        Request.from_dict({"steps": 4}, "api")


def test_a1111_names_cover_every_sampler_and_schedule():
    assert list(names.A1111_SAMPLERS) == list(SAMPLERS) and sorted(names.A1111_SCHEDULES) == sorted(SCHEDULES)
    assert names.to_a1111("dpmpp_2m", "karras") == ("DPM++ 2M", "Karras")
    assert names.from_a1111("Euler a") == ("euler_ancestral", "sgm")
    assert names.from_a1111("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert names.from_a1111("DPM++ SDE", "Karras") == ("dpmpp_sde", "karras")
    assert names.from_a1111("DPM++ 2M SDE Exponential") == ("dpmpp_2m_sde", "exponential")
    assert names.from_a1111("UniPC", "Automatic") == ("uni_pc", "sgm")
    with pytest.raises(Exception, match="unknown sampler 'Euler b'"):
        names.from_a1111("Euler b")


def test_help_lists_every_sampler_and_schedule(capsys):
    text = generate_help(capsys)
    assert ", ".join(SAMPLERS) in text and ", ".join(SCHEDULES) in text
