"""The VAE in row bands (`band`) equals the whole-tensor VAE: decode and encode, odd sizes, batches, layouts.

Tolerance: fp32 bands differ from whole tensors only in float rounding (convs on other shapes, GroupNorm sums
taken in another order): up to 2.5e-6 of the output's largest magnitude was seen, so 1e-5 of it is asserted
(plus rtol 1e-5). bf16: bands and whole tensors round differently (the banded GroupNorm is one multiply-add in
bf16); each was seen within 2.4% of the fp32 output's scale, and both are held to 5%, the bf16 bound of
tests/test_vae.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize

from sdxl.models.model import TINY_BASE, SDXLModel
from sdxl.models.vae import TINY_VAE, AutoencoderKL, VAEConfig
from sdxl.pipeline import Pipeline
from sdxl.sampling.samplers import GeneratorNoise

THREE_LEVELS = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)
# (batch, latent height, latent width): not multiples of any band, odd sides, tall and wide
SHAPES = [(1, 13, 7), (2, 10, 21), (3, 5, 9)]
BANDS = [1, 6000]  # bytes: one row per band (every halo and border case), and a few rows per band


def vae(cfg: VAEConfig, channels_last: bool = False) -> AutoencoderKL:
    torch.manual_seed(0)
    m = randomize(AutoencoderKL(cfg), 0, 0.05).eval()
    return m.to(memory_format=torch.channels_last) if channels_last else m


def close(got: torch.Tensor, want: torch.Tensor, scale: float = 1e-5) -> None:
    """Equal within `scale` of want's largest magnitude (and rtol `scale`)."""
    torch.testing.assert_close(got, want, atol=scale * want.abs().max().item(), rtol=scale)


def inputs(m: AutoencoderKL, shape: tuple[int, int, int], fmt=torch.contiguous_format):
    b, h, w = shape
    g = torch.Generator().manual_seed(1)
    z = torch.randn(b, 4, h, w, generator=g).contiguous(memory_format=fmt)
    x = torch.randn(b, 3, h * m.factor, w * m.factor, generator=g).contiguous(memory_format=fmt)
    return z, x


class ConvRows:
    """Records the input height of every 3x3 conv2d call (each band's, with its halo; 1x1 convs run whole)."""

    def __init__(self, monkeypatch):
        self.heights, real = [], F.conv2d

        def conv2d(x, weight, *args, **kw):
            if weight.shape[-1] == 3:
                self.heights.append(x.shape[-2])
            return real(x, weight, *args, **kw)

        monkeypatch.setattr(F, "conv2d", conv2d)


@torch.no_grad()
@pytest.mark.parametrize("cfg", [TINY_VAE, THREE_LEVELS], ids=["tiny", "three_levels"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("band", BANDS)
def test_banded_equals_whole(cfg, shape, band):
    m = vae(cfg)
    z, x = inputs(m, shape)
    close(m.decode(z, band), m.decode(z))
    got, want = m.encode(x, band), m.encode(x)
    close(got.mean, want.mean)
    close(got.logvar, want.logvar)


@torch.no_grad()
def test_banded_channels_last_keeps_layout_and_values():
    m = vae(THREE_LEVELS, channels_last=True)
    z, x = inputs(m, SHAPES[1], torch.channels_last)
    img = m.decode(z, 6000)
    assert img.is_contiguous(memory_format=torch.channels_last)
    close(img, vae(THREE_LEVELS).decode(z.contiguous()))
    close(m.encode(x, 6000).mean, m.encode(x).mean)


@torch.no_grad()
def test_bands_bound_every_conv_input(monkeypatch):
    """With a band of one row's worth, no conv sees more than its band plus the halo (3 rows; 4 after
    an upsampling); without a band, the convs see whole tensors."""
    m = vae(THREE_LEVELS)
    z, _ = inputs(m, (1, 10, 21))
    rows = ConvRows(monkeypatch)
    m.decode(z, 1)
    assert max(rows.heights) <= 4
    rows.heights.clear()
    m.decode(z)
    assert max(rows.heights) == 40  # 10 latent rows x 4


@torch.no_grad()
def test_bf16_banded_matches_fp32():
    m = vae(THREE_LEVELS)
    z, x = inputs(m, (2, 10, 21))
    low = vae(THREE_LEVELS).to(torch.bfloat16)
    want_img, want_mean = m.decode(z), m.encode(x).mean
    for band in (None, 6000):
        img, mean = low.decode(z.bfloat16(), band), low.encode(x.bfloat16(), band).mean
        assert img.dtype == mean.dtype == torch.bfloat16
        close(img.float(), want_img, 5e-2)
        close(mean.float(), want_mean, 5e-2)


@torch.no_grad()
def test_pipeline_tiling_choice(monkeypatch):
    """`vae_tiling` True/None bands with `vae_band` (None: only images over the pixel threshold), False never;
    decode and encode_image give the same latents and pixels either way."""
    torch.manual_seed(0)
    base = randomize(SDXLModel(TINY_BASE), 0, 0.05)
    pipes = {t: Pipeline(base, dtype=torch.float32, channels_last=False, vae_tiling=t, vae_band=6000)
             for t in (True, False, None)}
    latents = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(2))
    rows = ConvRows(monkeypatch)
    heights = {}
    for t, pipe in pipes.items():
        rows.heights.clear()
        heights[t] = pipe.decode(latents), max(rows.heights)
    assert heights[True][1] < 24 and heights[False][1] == heights[None][1] == 24  # 12 latent rows x 2
    close(heights[True][0], heights[False][0])
    images = heights[False][0] * 2 - 1
    noise = lambda: GeneratorNoise([0, 1])  # noqa: E731
    close(pipes[True].encode_image(images, noise()), pipes[False].encode_image(images, noise()))
    monkeypatch.setattr(Pipeline, "AUTO_TILING_PIXELS", 20 * 20)
    rows.heights.clear()
    close(pipes[None].decode(latents), heights[False][0])
    assert max(rows.heights) < 24
