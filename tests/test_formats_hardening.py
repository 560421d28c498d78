"""Issue 11, files in and out: checkpoint headers, diffusers folders and LoRA files that once gave tracebacks or silently
wrong results (each kind's example, with the right answer), and the one atomic writer (issue 10 item 6)."""

import json
import shutil

import pytest
import torch
from conftest import randomize, tiny_checkpoints
from PIL import Image
from safetensors.torch import save_file

from sdxl.cli import main
from sdxl.errors import CheckpointError, SDXLError
from sdxl.formats import checkpoint as ck
from sdxl.formats.files import SafetensorsFile, write_file, write_tensors
from sdxl.adapters.lora import add_lora, load_lora, lora_state_dict
from sdxl.formats.png import save_png
from sdxl.models.model import TINY_BASE, SDXLModel

pytestmark = pytest.mark.usefixtures("one_thread")
GENERATE = ["--steps", "1", "--width", "64", "--height", "64", "--no-watermark", "-q", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random base (tiny.safetensors) and its state dict."""
    base, _ = tiny_checkpoints(tmp_path_factory.mktemp("hardening"))
    return base, {k: v.contiguous() for k, v in ck.load(base).state_dict().items()}


def one_line_error(capsys, argv, *fragments) -> str:
    """`sdxl ARGV` exits 2 with one line on stderr that holds every fragment."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdxl: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def raw_safetensors(path, header, data: bytes = b""):
    """A safetensors file written byte by byte: `header` a dict (JSON-encoded) or raw bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


# --- checkpoint headers ---------------------------------------------------------------------------

F32x2 = {"dtype": "F32", "shape": [2]}


@pytest.mark.parametrize("header,data,fragment", [
    (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, b"", "recursion limit exceeded"),  # 100k deep: no RecursionError
    (b"[" * 100_000 + b"]" * 100_000, b"", "corrupt safetensors header"),
    (b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,8]}}', bytes(8), "corrupt safetensors header"),
    (b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,1e400]}}', bytes(8), "corrupt safetensors header"),
    ({"a": F32x2 | {"data_offsets": [0, 8]}, "b": F32x2 | {"data_offsets": [4, 12]}}, bytes(12), "overlaps"),
    ({"a": F32x2 | {"data_offsets": [0, 8]}, "b": F32x2 | {"data_offsets": [12, 20]}}, bytes(20), "leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "malformed tensor entry (a)"),
    ({"__metadata__": [1, 2], "a": F32x2 | {"data_offsets": [0, 8]}}, bytes(8), "corrupt safetensors header"),
], ids=["deep-object", "deep-list", "shape-infinity", "offset-1e400", "overlap", "gap", "size", "metadata-list"])
def test_bad_headers_are_refused_by_the_safetensors_validation(tmp_path, capsys, header, data, fragment):
    path = raw_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(CheckpointError, match="re-download the file"):
        SafetensorsFile(path)
    one_line_error(capsys, ["inspect", path], str(path), fragment)


@pytest.mark.parametrize("length", [0x280, 0x380, 0x580])
def test_header_lengths_that_start_like_a_pickle_still_load(tmp_path, length):
    """A header of 640-1535 bytes starts 0x80 0x02..0x05, as a pickle does (found by test_fuzz_formats)."""
    raw = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode().ljust(length)
    path = raw_safetensors(tmp_path / "lora.safetensors", raw, torch.tensor([1.5, -2.0]).numpy().tobytes())
    assert path.read_bytes()[0] == 0x80 and 2 <= path.read_bytes()[1] <= 5
    assert torch.equal(SafetensorsFile(path)["w"], torch.tensor([1.5, -2.0]))


def test_overlapping_offsets_in_a_real_checkpoint_are_refused(tiny, tmp_path, capsys):
    """Issue 11 item 4: two tensors sharing bytes once loaded and silently changed the image."""
    path, _ = tiny
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = (header[k]["data_offsets"] for k in ("model.diffusion_model.out.2.bias", "model.diffusion_model.out.0.bias"))
    header["model.diffusion_model.out.2.bias"]["data_offsets"] = [b[0], b[0] + a[1] - a[0]]  # same size, other bytes
    raw = json.dumps(header).encode()
    bad = raw_safetensors(tmp_path / "overlap.safetensors", raw + b" " * (-len(raw) % 8), bytes(data[8 + n:]))
    with pytest.raises(CheckpointError, match="overlaps another tensor's or leaves a gap"):
        ck.load(bad)
    one_line_error(capsys, ["inspect", bad], "invalid offset")


def test_float_weight_labelled_int16_fails_inspect_and_load(tiny, tmp_path, capsys):
    _, sd = tiny
    key = "model.diffusion_model.out.2.weight"
    save_file(sd | {key: sd[key].half().view(torch.int16)}, tmp_path / "i16.safetensors")
    one_line_error(capsys, ["inspect", tmp_path / "i16.safetensors"], f"non-float dtype where weights belong ({key} int16)")
    with pytest.raises(CheckpointError, match=f"{key} int16"):
        ck.load(tmp_path / "i16.safetensors")


def test_first_conv_with_its_shape_reversed(tiny, tmp_path, capsys):
    _, sd = tiny
    key = "model.diffusion_model.input_blocks.0.0.weight"
    save_file(sd | {key: sd[key].permute(3, 2, 1, 0).contiguous()}, tmp_path / "rev.safetensors")
    one_line_error(capsys, ["inspect", tmp_path / "rev.safetensors"], f"{key} has shape (3, 3, 4, 64)", "transposed")


@pytest.mark.parametrize("kept,fragment", [
    (("model.diffusion_model.", "conditioner."), "has no VAE (first_stage_model.*): give one with --vae FILE"),
    (("model.diffusion_model.", "first_stage_model."), "has no text encoders (conditioner.*)"),
    (("first_stage_model.",), "has no UNet (model.diffusion_model.*): --model and --refiner take checkpoints with one"),
], ids=["no-vae", "no-text-encoders", "vae-only"])
def test_partial_checkpoint_as_model_names_the_missing_part_and_its_flag(tiny, tmp_path, capsys, kept, fragment):
    _, sd = tiny
    path = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith(kept)}, path)
    one_line_error(capsys, ["generate", "a cat", "--model", path, *GENERATE, "-o", tmp_path / "o.png"], fragment)
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("kept", ["first_stage_model.", "conditioner."], ids=["vae-only", "text-encoders-only"])
def test_refiner_without_a_unet(tiny, tmp_path, capsys, kept):
    path, sd = tiny
    save_file({k: v for k, v in sd.items() if k.startswith(kept)}, tmp_path / "refiner.safetensors")
    one_line_error(capsys, ["generate", "a cat", "--model", path, "--refiner", tmp_path / "refiner.safetensors", *GENERATE,
                            "-o", tmp_path / "o.png"], "refiner.safetensors: has no UNet (model.diffusion_model.*)")


def test_partial_checkpoint_with_vae_flag_loads(tiny, tmp_path):
    """The flag the message names supplies the part: --vae completes a checkpoint without a VAE."""
    path, sd = tiny
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, tmp_path / "novae.safetensors")
    save_file({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, tmp_path / "vae.safetensors")
    model = ck.load(tmp_path / "novae.safetensors", vae_path=tmp_path / "vae.safetensors", require=("unet", "conditioner", "vae"))
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


# --- diffusers folders ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory):
    _, sd = tiny
    model = SDXLModel(TINY_BASE, device="meta")
    model.load_state_dict(sd, assign=True)
    return ck.save_diffusers(model, tmp_path_factory.mktemp("diffusers") / "ok")


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("how,fragment", [
    ("index-list", "model_index.json: holds a JSON list, not an object"),
    ("index-folder", "model_index.json: is a folder"),
    ("unet-no-block_out_channels", "unet/config.json: missing key 'block_out_channels'"),
    ("bigg-no-hidden_size", "text_encoder_2/config.json: missing key 'hidden_size'"),
    ("vae-zero-width", "vae/config.json: malformed (ZeroDivisionError"),
    ("bigg-million-layers", "text_encoder_2/config.json: layers = 1000000 is not a plausible value"),
])
def test_broken_diffusers_folders(folder, tmp_path, capsys, how, fragment):
    d = shutil.copytree(folder, tmp_path / "f")
    if how == "index-list":
        (d / "model_index.json").write_text("[1, 2]")
    elif how == "index-folder":
        (d / "model_index.json").unlink()
        (d / "model_index.json").mkdir()
    elif how == "unet-no-block_out_channels":
        edit_json(d / "unet/config.json", lambda c: {k: v for k, v in c.items() if k != "block_out_channels"})
    elif how == "bigg-no-hidden_size":
        edit_json(d / "text_encoder_2/config.json", lambda c: {k: v for k, v in c.items() if k != "hidden_size"})
    elif how == "vae-zero-width":
        edit_json(d / "vae/config.json", lambda c: c | {"block_out_channels": [0, 0]})
    else:
        edit_json(d / "text_encoder_2/config.json", lambda c: c | {"num_hidden_layers": 1_000_000})
    one_line_error(capsys, ["inspect", d], fragment)
    with pytest.raises(CheckpointError, match="config.json|model_index.json"):
        ck.load(d)


# --- LoRA files -----------------------------------------------------------------------------------

def kohya(name: str, down: torch.Tensor, up: torch.Tensor, alpha) -> dict:
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.as_tensor(alpha)}


PROJ_IN = "lora_unet_middle_block_1_proj_in"  # the tiny base's middle_block.1.proj_in: Linear(128 -> 128)


@pytest.mark.parametrize("tensors,metadata,fragment", [
    (kohya(PROJ_IN, torch.zeros(0, 128), torch.zeros(128, 0), 1.0), None, f"{PROJ_IN}: rank 0"),
    (kohya(PROJ_IN, torch.ones(4, 128), torch.ones(128, 4), [1.0, 2.0]), None, f"{PROJ_IN}: alpha holds 2 values"),
    (kohya(PROJ_IN, torch.ones(4, 128, dtype=torch.int16), torch.ones(128, 4), 1.0), None, "non-float dtype"),
    ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 128),
      "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(128, 4)},
     {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.alpha_pattern": {"proj_in(": 2}})},
     "alpha_pattern key 'proj_in(' is not a valid regular expression"),
    ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 128),
      "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(128, 4)},
     {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "8"})}, "unet: lora_alpha = '8' is not a number"),
], ids=["rank-0", "alpha-two-values", "int16-weights", "alpha_pattern-regex", "lora_alpha-string"])
def test_bad_lora_files(tiny, tmp_path, capsys, tensors, metadata, fragment):
    path, _ = tiny
    save_file(tensors, tmp_path / "bad.safetensors", metadata=metadata)
    one_line_error(capsys, ["generate", "a cat", "--model", path, "--lora", tmp_path / "bad.safetensors", *GENERATE,
                            "-o", tmp_path / "o.png"], fragment)
    assert not (tmp_path / "o.png").exists()


def test_lora_metadata_a_list(tiny, tmp_path, capsys):
    path, _ = tiny
    tensors = kohya(PROJ_IN, torch.ones(4, 128), torch.ones(128, 4), 1.0)
    header, offset, data = {"__metadata__": ["not", "a", "map"]}, 0, b""
    for k, t in tensors.items():
        b = t.float().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset, data = offset + len(b), data + b
    bad = raw_safetensors(tmp_path / "meta.safetensors", header, data)
    one_line_error(capsys, ["generate", "a cat", "--model", path, "--lora", bad, *GENERATE, "-o", tmp_path / "o.png"],
                   "corrupt safetensors header (invalid JSON in header: invalid type: sequence")


def test_layer_under_its_kohya_and_peft_names_is_refused(tiny, tmp_path, capsys):
    """Issue 11 item 5: both spellings of one layer were merged, so it was applied twice."""
    path, _ = tiny
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 128, generator=g), torch.randn(128, 4, generator=g)
    both = kohya(PROJ_IN, down, up, 4.0) | {"unet.mid_block.attentions.0.proj_in.lora_A.weight": down.clone(),
                                             "unet.mid_block.attentions.0.proj_in.lora_B.weight": up.clone()}
    save_file(both, tmp_path / "both.safetensors")
    one_line_error(capsys, ["generate", "a cat", "--model", path, "--lora", tmp_path / "both.safetensors", *GENERATE,
                            "-o", tmp_path / "o.png"],
                   f"1 layer listed under two names ({PROJ_IN} and unet.mid_block.attentions.0.proj_in)")


def test_float8_lora_is_upcast_and_merged(tiny, tmp_path):
    """F8_E4M3 weights: `isfinite` has no float8 kernel; the merge equals the same values in fp32."""
    _, sd = tiny
    g = torch.Generator().manual_seed(0)
    down8 = (torch.randn(4, 128, generator=g) * 0.1).to(torch.float8_e4m3fn)
    up8 = (torch.randn(128, 4, generator=g) * 0.1).to(torch.float8_e4m3fn)
    results = []
    for down, up in ((down8, up8), (down8.float(), up8.float())):
        model = SDXLModel(TINY_BASE, device="meta")
        model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
        path = write_tensors(tmp_path / f"{down.dtype}.safetensors", kohya(PROJ_IN, down, up, 2.0))
        assert load_lora(model, path).total == 1
        results.append(model.state_dict()["model.diffusion_model.middle_block.1.proj_in.weight"])
    key = "model.diffusion_model.middle_block.1.proj_in.weight"
    expected = sd[key] + 0.5 * up8.float() @ down8.float()  # alpha / rank = 2 / 4
    assert torch.equal(results[0], results[1])
    torch.testing.assert_close(results[0], expected, rtol=0, atol=1e-6)


def test_kohya_text_projection_is_applied(tiny, tmp_path):
    """lora_te2_text_projection: bigG's projection, transformers' Linear(width -> proj).weight = our Parameter.T."""
    _, sd = tiny
    bigg = TINY_BASE.conditioner.bigg
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(2, bigg.width, generator=g), torch.randn(bigg.proj_dim, 2, generator=g)
    tensors = kohya("lora_te2_text_projection", down, up, 1.0) | kohya(PROJ_IN, torch.zeros(2, 128), torch.zeros(128, 2), 1.0)
    save_file(tensors, tmp_path / "proj.safetensors")
    model = SDXLModel(TINY_BASE, device="meta")
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    report = load_lora(model, tmp_path / "proj.safetensors", multiplier=0.5)
    assert report.applied == {"unet": 1, "text_encoder": 0, "text_encoder_2": 1}
    key = "conditioner.embedders.1.model.text_projection"
    torch.testing.assert_close(model.state_dict()[key], sd[key] + (0.25 * up @ down).T, rtol=0, atol=1e-6)


def test_trained_lora_round_trip_still_counts_every_layer(tiny, tmp_path):
    """A saved kohya LoRA has one name per layer: nothing is a collision."""
    _, sd = tiny
    model = SDXLModel(TINY_BASE, device="meta")
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    add_lora(model, rank=2, text_encoders=True)
    n = len(lora_state_dict(model)) // 3
    path = write_tensors(tmp_path / "l.safetensors", lora_state_dict(model))
    target = SDXLModel(TINY_BASE, device="meta")
    target.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    assert load_lora(target, path).total == n


# --- one atomic writer ----------------------------------------------------------------------------

def test_free_name_is_taken_atomically(tmp_path):
    """A file that appears while ours is written (another process) is never replaced: ours takes the next name."""
    target = tmp_path / "out.png"

    def write_while_another_process_takes_the_name(tmp):
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")

    assert write_file(target, write_while_another_process_takes_the_name, mode="free") == tmp_path / "out-1.png"
    assert target.read_bytes() == b"theirs" and (tmp_path / "out-1.png").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out.png"]  # no temporary file left


def test_new_never_replaces_and_replace_does(tmp_path):
    target = tmp_path / "x.bin"

    def race(tmp):
        tmp.write_bytes(b"ours")
        target.write_bytes(b"theirs")

    with pytest.raises(SDXLError, match="already exists; choose another name"):
        write_file(target, race, mode="new")
    assert target.read_bytes() == b"theirs"
    assert write_file(target, lambda tmp: tmp.write_bytes(b"ours"), mode="replace") == target
    assert target.read_bytes() == b"ours" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    with pytest.raises(SDXLError, match="no such folder"):
        write_file(tmp_path / "missing" / "x.bin", lambda tmp: None)


def test_save_png_keeps_existing_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"mine")
    im = Image.new("RGB", (4, 4), (255, 0, 0))
    first = save_png(im, tmp_path / "a.png", "a red square", {"seed": 1})
    second = save_png(im, tmp_path / "a.png", "a red square", {"seed": 1})
    assert (first.name, second.name) == ("a-1.png", "a-2.png")
    assert (tmp_path / "a.png").read_bytes() == b"mine"
    with Image.open(first) as back:
        assert back.info["parameters"] == "a red square" and back.getpixel((0, 0)) == (255, 0, 0)


def test_written_files_get_the_usual_permissions(tmp_path):
    """A file we write is readable like any other new file (0o666 less the umask), even though the safetensors
    library itself creates 0600 files."""
    import os

    from sdxl.formats.files import write_tensors

    umask = os.umask(0o022)
    try:
        path = write_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644
