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
