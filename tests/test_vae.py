"""VAE parity with diffusers' AutoencoderKL on tiny random weights, plus layout and dtype checks."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import reference_shapes
from torch import nn

from sdxl.formats.convert import vae_table
from sdxl.formats.convert import to_ours, to_theirs
from sdxl.errors import CheckpointError
from sdxl.models.vae import SDXL_VAE, TINY_VAE, AutoencoderKL, VAEConfig, config_from_shapes

diffusers = pytest.importorskip("diffusers")

THREE_LEVELS = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)  # levels 1, 2 equal width: catches index bugs
CONFIGS = {"tiny": TINY_VAE, "three_levels": THREE_LEVELS}
PREFIX = "first_stage_model."

# fp32 parity: the same ops in a different order; up to 6e-6 seen (decode), so 3e-5 leaves headroom.
FP32 = dict(atol=3e-5, rtol=1e-5)


def reference_vae(cfg: VAEConfig) -> nn.Module:
    """diffusers' AutoencoderKL with `cfg`, random weights incl. GroupNorm affine, seed 0."""
    assert cfg.z_channels == cfg.embed_dim  # diffusers has one `latent_channels` for both
    n = len(cfg.ch_mult)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        latent_channels=cfg.z_channels, norm_num_groups=32, scaling_factor=cfg.scaling_factor,
    )
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return ref.eval()


@functools.cache
def build_pair(name: str) -> tuple[VAEConfig, nn.Module, AutoencoderKL]:
    """(cfg, diffusers reference, ours loaded strictly from the converted reference weights)."""
    cfg = CONFIGS[name]
    ref = reference_vae(cfg)
    ours = AutoencoderKL(cfg)
    ours.load_state_dict(to_ours(vae_table(cfg), ref.state_dict(), "diffusers vae"), strict=True)
    return cfg, ref, ours.eval()


@pytest.fixture(params=list(CONFIGS))
def pair(request):
    return build_pair(request.param)


@pytest.fixture
def tiny_pair():
    return build_pair("tiny")


def inputs(cfg: VAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """An image batch (2, 3, 16, 24), non-square to catch H/W swaps, and a latent for it."""
    g = torch.Generator().manual_seed(1)
    f = 2 ** (len(cfg.ch_mult) - 1)
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g)
    z = torch.randn(2, cfg.z_channels, 16 // f, 24 // f, generator=g)
    return x, z


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    err = (a.float() - b.float()).abs().max().item()
    print(f"{name}: max abs err {err:.3g} (|ref| max {b.abs().max().item():.3g})")  # shown with pytest -s


def close_fp32(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    report(name, got, want)
    torch.testing.assert_close(got, want, **FP32)


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    cfg, ref, ours = pair
    x, _ = inputs(cfg)
    want = ref.encode(x).latent_dist
    got = ours.encode(x)
    for name in ("mean", "logvar", "std"):
        close_fp32(name, getattr(got, name), getattr(want, name))


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    cfg, ref, ours = pair
    close_fp32("decode", ours.decode(inputs(cfg)[1]), ref.decode(inputs(cfg)[1]).sample)


@torch.no_grad()
def test_sample_is_seeded_and_matches_diffusers(pair):
    cfg, ref, ours = pair
    x, _ = inputs(cfg)
    post = ours.encode(x)
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(8)))
    eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, post.mean + post.std * eps)
    want = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))  # same noise convention
    torch.testing.assert_close(a, want, **FP32)
    assert post.mode() is post.mean


def test_round_trip_is_bit_exact(pair):
    cfg, ref, _ = pair
    sd = ref.state_dict()
    table = vae_table(cfg)
    back = to_theirs(table, to_ours(table, sd))
    assert back.keys() == sd.keys()
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_config_from_shapes(pair):
    cfg, _, ours = pair
    assert config_from_shapes({k: tuple(v.shape) for k, v in ours.state_dict().items()}) == cfg


def test_config_from_shapes_rejects_foreign_keys():
    with pytest.raises(CheckpointError, match="encoder.conv_in.weight"):
        config_from_shapes({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})


def test_full_size_on_meta_matches_official_keys():
    """Against the official key list kept in tests/reference (it used to be read from outside the repository)."""
    ref = {k[len(PREFIX):]: v for k, v in reference_shapes("sdxl_base_1.0").items() if k.startswith(PREFIX)}
    vae = AutoencoderKL(SDXL_VAE, device="meta")
    assert all(p.is_meta for p in vae.parameters())
    assert {k: tuple(v.shape) for k, v in vae.state_dict().items()} == ref
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert config_from_shapes(ref) == SDXL_VAE
    table = vae_table(SDXL_VAE)
    assert [e.ours for e in table if e.ours not in ref] == [] and len(table) == len(ref)
    theirs = [k for e in table for k in e.theirs]
    assert len(theirs) == len(set(theirs))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_low_precision_and_channels_last(tiny_pair, dtype, channels_last):
    cfg, _, ours = tiny_pair
    x, z = inputs(cfg)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    want_mean, want_img = ours.encode(x).mean, ours.decode(z)
    low = AutoencoderKL(cfg).to(dtype=dtype, memory_format=fmt)
    low.load_state_dict(ours.state_dict())
    mean = low.encode(x.to(dtype=dtype, memory_format=fmt)).mean
    img = low.decode(z.to(dtype=dtype, memory_format=fmt))
    assert mean.dtype == img.dtype == dtype
    if channels_last:
        assert img.is_contiguous(memory_format=torch.channels_last)
    report(f"{dtype} cl={channels_last} mean", mean, want_mean)
    report(f"{dtype} cl={channels_last} decode", img, want_img)
    # bf16 keeps 8 bits of mantissa (~0.4% per op); through ~10 layers 5% of the output scale is loose but catches bugs
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(mean.float(), want_mean, atol=tol * want_mean.abs().max().item(), rtol=tol)
    torch.testing.assert_close(img.float(), want_img, atol=tol * want_img.abs().max().item(), rtol=tol)


@torch.no_grad()
def test_channels_last_fp32_matches(tiny_pair):
    cfg, _, ours = tiny_pair
    x, z = inputs(cfg)
    cl = AutoencoderKL(cfg).to(memory_format=torch.channels_last)
    cl.load_state_dict(ours.state_dict())
    got = cl.decode(z.to(memory_format=torch.channels_last))
    assert got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, ours.decode(z), **FP32)
    torch.testing.assert_close(cl.encode(x.to(memory_format=torch.channels_last)).mean, ours.encode(x).mean, **FP32)
