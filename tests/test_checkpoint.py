"""Checkpoint formats: single file, diffusers folders (both directions), standalone VAEs, inspect, bad input."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from conftest import randomize
from safetensors.torch import load_file, save_file

from sdxl.formats import checkpoint as ck
from sdxl.cli import main
from sdxl.errors import CheckpointError
from sdxl.models.model import SDXL_BASE, SDXL_INPAINT, SDXL_REFINER, TINY_BASE, TINY_REFINER, SDXLModel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny base and refiner saved as fp16 single files."""
    d = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, cfg in (("base", TINY_BASE), ("refiner", TINY_REFINER)):
        torch.manual_seed(0)
        model = randomize(SDXLModel(cfg))
        out[name] = (model, ck.save_single_file(model, d / f"{name}.safetensors", dtype=torch.float16))
    return out


def states_equal(a: dict, b: dict, skip=()) -> bool:
    keys = [k for k in a if not k.endswith(skip)]
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_single_file_round_trip_is_bit_exact(tiny, tmp_path, dtype):
    model, _ = tiny["base"]
    first = ck.save_single_file(model, tmp_path / "a.safetensors", dtype=dtype)
    loaded = ck.load(first)
    assert loaded.cfg == TINY_BASE
    assert states_equal(loaded.state_dict(), load_file(first))
    second = ck.save_single_file(loaded, tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()


def mapped_from(address: int, path) -> bool:
    """Whether `address` lies in a memory mapping of `path` (Linux /proc/self/maps)."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def test_load_casts_and_is_memory_mapped(tiny):
    _, path = tiny["base"]
    as_stored = ck.load(path)
    t = as_stored.unet.input_blocks[0][0].weight
    assert t.dtype == torch.float16 and not t.requires_grad
    # Tensors loaded as stored are views of the file's memory map, not copies in RAM.
    f = ck.SafetensorsFile(path)
    assert all(mapped_from(p.data_ptr(), path) for p in as_stored.parameters())
    bf16 = ck.load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert torch.equal(bf16.unet.out[2].weight, f["model.diffusion_model.out.2.weight"].to(torch.bfloat16))


def test_load_components_subset(tiny):
    _, path = tiny["refiner"]
    m = ck.load(path, components=("unet",))
    assert list(m.components()) == ["unet"] and m.cfg.unet == TINY_REFINER.unet


def test_position_ids_tolerated(tiny, tmp_path):
    model, _ = tiny["base"]
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, tmp_path / "p.safetensors")
    assert states_equal(ck.load(tmp_path / "p.safetensors").state_dict(), model.state_dict())
    assert ck.inspect(tmp_path / "p.safetensors")["unexpected_keys"] == []


# --- diffusers folders ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_saved(tiny, tmp_path_factory):
    """Our tiny base written as a diffusers folder, read back by diffusers, and re-saved by diffusers
    itself: once sharded in fp32, once as an fp16 variant."""
    from diffusers import StableDiffusionXLPipeline

    model, _ = tiny["base"]
    d = tmp_path_factory.mktemp("diffusers")
    ours = ck.save_diffusers(model.float(), d / "ours")
    pipe = StableDiffusionXLPipeline.from_pretrained(ours)
    pipe.save_pretrained(d / "sharded", safe_serialization=True, max_shard_size="2MB")
    half = StableDiffusionXLPipeline.from_pretrained(ours, dtype=torch.float16)
    half.save_pretrained(d / "fp16", safe_serialization=True, variant="fp16")
    return model.float(), pipe, d


def test_diffusers_folder_both_directions(diffusers_saved):
    model, pipe, d = diffusers_saved
    # diffusers read our folder: its UNet gives our UNet's output
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0])
    ctx, pooled = torch.randn(1, 5, 256, generator=g), torch.randn(1, 96, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
    from sdxl.models.conditioning import FourierEmbedder

    with torch.no_grad():
        a = model.unet(x, t, ctx, torch.cat([pooled, FourierEmbedder(256)(ids)], 1))
        b = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert any(p.name.endswith(".index.json") for p in (d / "sharded" / "unet").iterdir())
    # ...and we read diffusers' own folders back: same tensors (bigG logit_scale has no diffusers source)
    for sub in ("ours", "sharded"):
        back = ck.load(d / sub)
        assert back.cfg == TINY_BASE
        assert states_equal(back.state_dict(), model.state_dict(), skip=("logit_scale",))
    half = ck.load(d / "fp16")
    assert half.unet.out[2].weight.dtype == torch.float16
    torch.testing.assert_close(half.unet.out[2].weight.float(), model.unet.out[2].weight, rtol=1e-3, atol=1e-3)


def test_diffusers_text_encoder_saved_by_transformers_5(diffusers_saved, tmp_path):
    """transformers 5 writes CLIPTextModel without the `text_model.` prefix; both forms load."""
    import shutil

    from transformers import CLIPTextModel

    model, _, d = diffusers_saved
    shutil.copytree(d / "ours", tmp_path / "f")
    shutil.rmtree(tmp_path / "f" / "text_encoder")
    CLIPTextModel.from_pretrained(d / "ours" / "text_encoder").save_pretrained(tmp_path / "f" / "text_encoder")
    assert states_equal(ck.load(tmp_path / "f").state_dict(), model.state_dict(), skip=("logit_scale",))


def test_diffusers_refiner_folder(tiny, tmp_path):
    model, _ = tiny["refiner"]
    ck.save_diffusers(model, tmp_path / "r")
    back = ck.load(tmp_path / "r")
    assert back.cfg == TINY_REFINER and back.cfg.is_refiner
    assert states_equal(back.state_dict(), model.state_dict(), skip=("logit_scale",))
    info = ck.inspect(tmp_path / "r")
    assert info["format"] == "diffusers" and list(info["components"]) == ["unet", "text_encoder_g", "vae"]


def test_standalone_vae_replaces_the_checkpoints(tiny, tmp_path):
    model, path = tiny["base"]
    torch.manual_seed(5)
    other = randomize(SDXLModel(TINY_BASE), seed=5).vae
    vsd = {k: v.contiguous() for k, v in other.state_dict().items()}
    save_file({"first_stage_model." + k: v for k, v in vsd.items()}, tmp_path / "prefixed.safetensors")
    save_file(vsd, tmp_path / "bare.safetensors")
    from sdxl.formats.convert import vae_table
    from sdxl.formats.convert import to_theirs

    save_file(to_theirs(vae_table(other.cfg), vsd), tmp_path / "diffusers_vae.safetensors")
    for name in ("prefixed", "bare", "diffusers_vae"):
        m = ck.load(path, vae_path=tmp_path / f"{name}.safetensors")
        assert states_equal(m.vae.state_dict(), other.state_dict()), name
        assert torch.equal(m.unet.out[2].weight, model.unet.out[2].weight.half())


# --- inspect ------------------------------------------------------------------------------------

def sparse_checkpoint(path, cfg, dtype="F16"):
    """A full-size checkpoint's header with a sparse (all-zero, no disk) data section: inspect reads headers only."""
    header, offset = {}, 0
    for k, shape in ck.expected_shapes(cfg).items():
        n = 2 * int(torch.Size(shape).numel())
        header[k] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)
    return path


@pytest.mark.parametrize("cfg,arch,unet_params", [(SDXL_BASE, "sdxl-base", 2_567_463_684),
                                                  (SDXL_REFINER, "sdxl-refiner", 2_259_526_660),
                                                  (SDXL_INPAINT, "sdxl-inpaint", 2_567_478_084)])
def test_inspect_full_size_headers(tmp_path, capsys, cfg, arch, unet_params):
    path = sparse_checkpoint(tmp_path / "big.safetensors", cfg)
    assert os.path.getsize(path) > 5e9  # a real 5-7 GB file, sparse on disk
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "single-file" and info["architecture"] == arch and info["dtype"] == "float16"
    assert info["components"]["unet"] == {"params": unet_params}
    assert info["components"]["vae"] == {"params": 83_653_863}
    assert info["components"]["text_encoder_g"] == {"params": 694_659_841}
    assert ("text_encoder_l" in info["components"]) == (cfg is not SDXL_REFINER)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []


def test_inspect_reports_missing_and_unexpected(tiny, tmp_path, capsys):
    model, _ = tiny["base"]
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    del sd["first_stage_model.decoder.conv_out.bias"]
    sd["model.diffusion_model.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "odd.safetensors")
    assert main(["inspect", str(tmp_path / "odd.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "sdxl-custom" in text and "missing keys:     1 (first_stage_model.decoder.conv_out.bias)" in text
    info = ck.inspect(tmp_path / "odd.safetensors")
    assert info["missing_keys"] == ["first_stage_model.decoder.conv_out.bias"]
    assert info["unexpected_keys"] == ["model.diffusion_model.extra.weight"]


# --- bad input ----------------------------------------------------------------------------------

class Boom:
    """Unpickling this would create a file: proof that nothing is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin", "renamed.safetensors", "zip.safetensors"])
def test_pickles_refused_never_unpickled(tmp_path, capsys, name):
    marker = tmp_path / "unpickled"
    path = tmp_path / name
    if name.startswith("zip"):
        torch.save({"w": torch.zeros(2), "boom": Boom(str(marker))}, path)  # torch's zip format
    else:
        path.write_bytes(pickle.dumps({"boom": Boom(str(marker))}, protocol=2 + len(name) % 4))
    with pytest.raises(CheckpointError, match="pickle"):
        ck.load(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pickle" in err and "Traceback" not in err
    assert not marker.exists()


def test_diffusers_folder_with_only_bin_weights_refused(diffusers_saved, tmp_path):
    import shutil

    _, _, d = diffusers_saved
    shutil.copytree(d / "ours", tmp_path / "f")
    (tmp_path / "f/unet/diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "f/unet/diffusion_pytorch_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(CheckpointError, match=r"unet: only pickle weights \(diffusion_pytorch_model.bin\)"):
        ck.load(tmp_path / "f")
    (tmp_path / "f/vae/config.json").unlink()
    (tmp_path / "f/unet/diffusion_pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors"):
        ck.load(tmp_path / "f")


def corrupt(tmp_path, tiny, how: str):
    data = bytearray(tiny["base"][1].read_bytes())
    path = tmp_path / f"{how}.safetensors"
    if how == "truncated":
        data = data[: len(data) - 1000]
    elif how == "header-json":
        data[20:30] = b"\x00{]}\x00garb"
    elif how == "header-length":
        data[:8] = (10**12).to_bytes(8, "little")
    elif how == "empty":
        data = b""
    elif how == "offsets":
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header["model.diffusion_model.out.2.bias"]["shape"] = [999]
        raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
        assert len(raw) == n
        data = data[:8] + raw + data[8 + n:]
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how,message", [
    ("truncated", "truncated: the header describes"),
    ("header-json", "corrupt safetensors header"),
    ("header-length", "header length"),
    ("empty", "too short"),
    ("offsets", r"malformed tensor entry \(model.diffusion_model.out.2.bias\)"),
])
def test_corrupt_files(tmp_path, tiny, capsys, how, message):
    path = corrupt(tmp_path, tiny, how)
    with pytest.raises(CheckpointError, match=message) as e:
        ck.load(path)
    assert str(path) in str(e.value)
    assert main(["inspect", str(path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_missing_and_wrong_shaped_tensors(tiny, tmp_path):
    model, _ = tiny["base"]
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    dropped = [k for k in sd if ".output_blocks.2." in k]
    for k in dropped:
        del sd[k]
    save_file(sd, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError) as e:
        ck.load(tmp_path / "missing.safetensors")
    msg = str(e.value)
    assert f"{len(dropped)} missing tensors ({', '.join(dropped[:3])}, ...)" in msg and "missing.safetensors" in msg
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd["first_stage_model.decoder.conv_out.bias"] = torch.zeros(5)
    save_file(sd, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"1 wrong shape tensor \(first_stage_model.decoder.conv_out.bias \(5,\) != \(3,\)\)"):
        ck.load(tmp_path / "shape.safetensors")


@pytest.mark.parametrize("keys,message", [
    ({"foo.weight": torch.zeros(2)}, "unknown architecture: no key starts with"),
    ({"cond_stage_model.transformer.x": torch.zeros(2), "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)},
     "Stable Diffusion 1.x/2.x"),
    ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, "unknown architecture: not an SDXL-family"),
    ({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2)}, "one component of a diffusers folder"),
])
def test_unknown_architectures(tmp_path, keys, message):
    save_file(keys, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=message):
        ck.load(tmp_path / "x.safetensors")


def test_missing_paths_and_never_overwrite(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ck.load(tmp_path / "nope.safetensors")
    model, path = tiny["base"]
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        ck.save_single_file(model, path)
    assert path.read_bytes() == before
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        ck.save_diffusers(model, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_cli_entry_point_exit_code_and_one_line(tmp_path):
    """The installed console script: exit code 2, one line on stderr, no traceback."""
    bad = tmp_path / "x.ckpt"
    bad.write_bytes(pickle.dumps([1, 2, 3]))
    r = subprocess.run([sys.executable, "-m", "sdxl.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("sdxl: error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_skip_init_only_skips_in_its_own_thread():
    """A server's worker loading a checkpoint (skip_init) while another thread builds a random model: that model is
    initialised (a process-wide patch left it torch.empty garbage, NaN in a clean CI run)."""
    import threading

    from torch import nn

    from sdxl.formats.checkpoint import skip_init

    inside, done = threading.Event(), threading.Event()

    def loader():
        with skip_init():
            inside.set()
            done.wait(10)

    t = threading.Thread(target=loader)
    t.start()
    inside.wait(10)
    torch.manual_seed(0)
    built = nn.Linear(64, 64)
    done.set()
    t.join()
    torch.manual_seed(0)
    assert torch.equal(built.weight, nn.Linear(64, 64).weight)
    with skip_init():
        t = torch.full((4,), 7.0)
        nn.init.normal_(t)
    assert torch.equal(t, torch.full((4,), 7.0))
