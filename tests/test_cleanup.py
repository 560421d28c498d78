"""Loose ends of issues 10 and 11: models built by constructors, file I/O through `sdxl.formats.files`,
precomputed embeddings, the inpainting mask blur. Tiny random models, fp32, CPU."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image

from sdxl.errors import SDXLError
from sdxl.formats import checkpoint as ck
from sdxl.models.conditioning import Conditioner, conditioner_config
from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel
from sdxl.models.vae import TINY_VAE, AutoencoderKL
from sdxl.pipeline import Pipeline
from sdxl.request import Request

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return randomize(SDXLModel(TINY_BASE), 0, 0.05)


@pytest.fixture(scope="module")
def pipe(base):
    return Pipeline(base, dtype=torch.float32, channels_last=False)


# --- models put together by constructors ----------------------------------------------------------

def test_load_with_a_standalone_vae_of_another_shape(base, tmp_path):
    """--vae with a VAE of another shape: the model's config is the VAE's, its weights the file's, in eval mode."""
    ck.save_single_file(base, tmp_path / "base.safetensors")
    torch.manual_seed(1)
    other = randomize(AutoencoderKL(dataclasses.replace(TINY_VAE, ch_mult=(1, 1))), 1)
    ck.write_tensors(tmp_path / "vae.safetensors", other.state_dict())
    model = ck.load(tmp_path / "base.safetensors", vae_path=tmp_path / "vae.safetensors")
    assert model.cfg == dataclasses.replace(base.cfg, vae=other.cfg)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.vae.state_dict().items())
    assert all(torch.equal(v, base.unet.state_dict()[k]) for k, v in model.unet.state_dict().items())
    assert not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


def test_conditioner_from_parts_shares_the_encoder(base):
    bigg = base.conditioner.bigg
    cfg = conditioner_config(None, bigg.cfg, TINY_REFINER.unet.adm_in_channels)
    c = Conditioner.from_parts(cfg, bigg)
    assert c.cfg == cfg == TINY_REFINER.conditioner and c.bigg is bigg and c.clip_l is None
    assert list(c.state_dict()) == list(SDXLModel(TINY_REFINER).conditioner.state_dict())
    with pytest.raises(ValueError, match="do not match"):
        Conditioner.from_parts(TINY_BASE.conditioner, bigg)  # the base's config wants a CLIP-L too
    full = Conditioner.from_parts(TINY_BASE.conditioner, bigg, base.conditioner.clip_l)
    assert full.clip_l is base.conditioner.clip_l and full.embedders[1] is bigg


def test_write_samples_leaves_training_state_alone(tmp_path):
    """Sample images mid-run: the trained parameters still require gradients and the model stays in training mode."""
    from sdxl.models.tokenizer import Tokenizer
    from sdxl.train import config, loop

    cfg = config.build(dict(dataset="synthetic:4", resolution=32, bucket_step=16, batch_size=2, steps=2,
                            sample_prompts=("a red circle",), sample_steps=1, unet={"model_channels": 32},
                            clip_l={"layers": 2}, bigg={"layers": 2}))
    d = loop.Dist()
    model = loop.build_model(cfg, d.device)
    run = loop.Run(cfg, model, loop.trainable_parameters(model, cfg, d), d)
    model.train()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(grads.values())
    loop.write_samples(run, Tokenizer.default(), tmp_path, 1)
    assert (tmp_path / "samples" / "step-000001-0.png").is_file()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(m.training for m in model.modules())


# --- file I/O through sdxl.formats.files ------------------------------------------------------------

def test_a_pickled_optimizer_file_is_refused_in_one_line(tmp_path):
    """checkpointing.load reads through SafetensorsFile: a pickle is refused unread, a corrupt file named."""
    import pickle

    from sdxl.errors import CheckpointError
    from sdxl.train import checkpointing

    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "optimizer.safetensors").write_bytes(pickle.dumps({"state": {}}, protocol=4))
    with pytest.raises(CheckpointError) as e:
        checkpointing.load(tmp_path, 0)
    assert str(e.value).startswith(f"{tmp_path / 'optimizer.safetensors'}: is a Python pickle")
    (tmp_path / "optimizer.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError) as e:
        checkpointing.load(tmp_path, 0)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'optimizer.safetensors'}: corrupt safetensors header")
    assert "\n" not in message and "re-download" not in message


def test_latest_pointer_is_written_through_write_file(tmp_path, monkeypatch):
    """The `latest` pointer is replaced atomically by files.write_file, naming the new folder."""
    from sdxl.formats import files
    from sdxl.train import checkpointing

    written = []
    real = files.write_file
    monkeypatch.setattr(files, "write_file", lambda path, *a, **k: written.append(path) or real(path, *a, **k))
    for step in (1, 2):
        checkpointing.save(tmp_path, step, {"w": torch.ones(2)}, {"state": {}, "param_groups": []}, None,
                           {"step": step}, keep=2)
    assert (tmp_path / "latest").read_text() == "step-000002\n"
    assert written.count(tmp_path / "latest") == 2
    assert torch.equal(checkpointing.load(tmp_path / "step-000002", 0)["trained"]["w"], torch.ones(2))


def test_a_corrupt_cache_file_is_skipped_and_named(tmp_path):
    """A damaged latent cache file: that image is skipped, and the reason names the cache file and the fix."""
    from sdxl.formats.files import write_tensors
    from sdxl.train import data

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    good = tmp_path / "good.safetensors"
    write_tensors(good, {"mean": torch.zeros(4, 16, 16), "std": torch.ones(4, 16, 16)},
                  {"crop_coords_top_left": "[0, 0]"})
    text = tmp_path / "text.safetensors"
    write_tensors(text, {"crossattn": torch.zeros(77, 8), "pooled": torch.zeros(8)})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-3])
    items = [data.Item(str(image), "a", (32, 32)), data.Item(str(image), "b", (32, 32))]
    ds = data.CachedDataset(items, [(32, 32)], [0, 0], 0, False, 6.0, [bad, good], [text, text])
    sample = ds[(0, 0, 0)]
    assert sample["caption"] == "b" and torch.equal(sample["std"], torch.ones(4, 16, 16))
    assert sample["failed"] == [f"{bad}: truncated: the header describes 8192 bytes of tensor data but the file "
                                "holds 8189; delete it: it is rebuilt"]


def test_recipe_unet_only_writes_the_unet_in_fp16(base, tmp_path):
    from sdxl.formats.files import SafetensorsFile
    from sdxl.lab import recipe

    ck.save_single_file(base, tmp_path / "full.safetensors")
    (tmp_path / "unet.safetensors").write_bytes(b"an older export")
    recipe.unet_only(tmp_path / "full.safetensors", tmp_path / "unet.safetensors", {"sdxl.lab.recipe": "test"})
    f = SafetensorsFile(tmp_path / "unet.safetensors")
    want = {"model.diffusion_model." + k: v for k, v in base.unet.state_dict().items()}
    assert f.metadata == {"sdxl.lab.recipe": "test"} and set(f) == set(want)
    assert all(f[k].dtype == torch.float16 and torch.equal(f[k], v.half()) for k, v in want.items())
