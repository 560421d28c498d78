"""UNet parity with diffusers' UNet2DConditionModel on small random configs, and full-size structure."""

import dataclasses

import pytest
import torch
from conftest import randomize, reference_shapes

from sdxl.models import unet as U
from sdxl.formats.checkpoint import _unet_diffusers_config
from sdxl.models.conditioning import BASE_MICRO, REFINER_MICRO, FourierEmbedder
from sdxl.formats.convert import to_ours, to_theirs, unet_table
from sdxl.models.model import SDXL_BASE, SDXL_REFINER, SDXLModel

# fp32 on CPU: same math in a different order; errors seen ~2e-6 absolute on outputs of magnitude ~1.
TOL = dict(rtol=1e-5, atol=2e-5)
CASES = {
    "base": (U.TINY_BASE, BASE_MICRO),
    "refiner": (U.TINY_REFINER, REFINER_MICRO),  # 3 levels, last without attention, middle depth 2
    "inpaint": (dataclasses.replace(U.TINY_BASE, in_channels=9), BASE_MICRO),
}


def diffusers_pair(cfg: U.UNetConfig, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    theirs = randomize(UNet2DConditionModel.from_config(_unet_diffusers_config(cfg)), seed).eval()
    ours = U.UNet(cfg).eval()
    ours.load_state_dict(to_ours(unet_table(cfg), theirs.state_dict()), strict=True)
    return ours, theirs


def micro_ids(micro: tuple[str, ...], batch: int) -> torch.Tensor:
    """Distinct micro-conditioning values per sample (diffusers' time_ids layout)."""
    rows = {"original_size": [[1024, 768], [512, 2048]], "crop_coords_top_left": [[0, 0], [64, 128]],
            "target_size": [[1024, 1024], [896, 1152]], "aesthetic_score": [[6.0], [2.5]]}
    return torch.cat([torch.tensor(rows[m][:batch], dtype=torch.float32) for m in micro], dim=1)


@pytest.mark.parametrize("case", CASES)
def test_unet_matches_diffusers(case):
    cfg, micro = CASES[case]
    ours, theirs = diffusers_pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g)  # non-square latent
    t = torch.tensor([999.0, 17.0])
    ctx = torch.randn(2, 11, cfg.context_dim, generator=g)
    ids = micro_ids(micro, 2)
    pooled = torch.randn(2, cfg.adm_in_channels - 256 * ids.shape[1], generator=g)
    # The vector input through our Fourier embedder (the conditioner's) vs diffusers' add_time_proj.
    y = torch.cat([pooled, FourierEmbedder(256)(ids)], dim=1)
    with torch.no_grad():
        a = ours(x, t, ctx, y)
        b = theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert a.shape == (2, cfg.out_channels, 16, 24)
    torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("case,size", [("refiner", (15, 21)), ("base", (17, 9))])
def test_odd_latent_sizes_match_diffusers(case, size):
    """Latents not a multiple of the UNet's 2^downsamples (SDXL at 1000x1000: 125x125): a downsample rounds up and
    the upsample returns to the skip's size, as diffusers' `forward_upsample_size`."""
    cfg, micro = CASES[case]
    ours, theirs = diffusers_pair(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, cfg.in_channels, *size, generator=g)
    ctx = torch.randn(1, 5, cfg.context_dim, generator=g)
    ids = micro_ids(micro, 1)
    pooled = torch.randn(1, cfg.adm_in_channels - 256 * ids.shape[1], generator=g)
    with torch.no_grad():
        a = ours(x, torch.tensor([400.0]), ctx, torch.cat([pooled, FourierEmbedder(256)(ids)], dim=1))
        b = theirs(x, torch.tensor([400.0]), ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert a.shape == (1, cfg.out_channels, *size)
    torch.testing.assert_close(a, b, **TOL)


def test_unet_table_round_trip_is_bit_exact():
    _, theirs = diffusers_pair(U.TINY_REFINER)
    sd = theirs.state_dict()
    back = to_theirs(unet_table(U.TINY_REFINER), to_ours(unet_table(U.TINY_REFINER), sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_unet_low_precision_and_channels_last(dtype):
    ours, _ = diffusers_pair(U.TINY_BASE)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0])
    ctx, y = torch.randn(1, 7, 256, generator=g), torch.randn(1, U.TINY_BASE.adm_in_channels, generator=g)
    with torch.no_grad():
        ref = ours(x, t, ctx, y)
        cl = ours.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t, ctx, y)
        low = ours.to(dtype)(x, t, ctx, y)
    torch.testing.assert_close(cl, ref, **TOL)  # channels-last: same math, another layout
    assert low.dtype == dtype
    # bf16 has 8 bits of mantissa: ~1e-2 relative through the whole network
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def test_config_from_shapes_recovers_configs():
    for cfg in (U.SDXL_BASE, U.SDXL_REFINER, U.SDXL_INPAINT, U.TINY_BASE, U.TINY_REFINER):
        shapes = {k: tuple(v.shape) for k, v in U.UNet(cfg, device="meta").state_dict().items()}
        assert U.config_from_shapes(shapes) == cfg


@pytest.mark.parametrize("name,cfg,counts", [
    ("sdxl_base_1.0", SDXL_BASE, {"model.diffusion_model.": 2_567_463_684, "conditioner.embedders.0.": 123_060_480,
                                  "conditioner.embedders.1.": 694_659_841, "first_stage_model.": 83_653_863}),
    ("sdxl_refiner_1.0", SDXL_REFINER, {"model.diffusion_model.": 2_259_526_660, "conditioner.embedders.0.": 694_659_841,
                                        "first_stage_model.": 83_653_863}),
])
def test_full_size_structure_on_meta(name, cfg, counts):
    """Every official tensor name and shape, nothing more; parameter counts of docs/architecture.md §5."""
    model = SDXLModel(cfg, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference_shapes(name)
    for prefix, n in counts.items():
        assert sum(v.numel() for k, v in model.state_dict().items() if k.startswith(prefix)) == n, prefix
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.slow
def test_full_size_base_unet_matches_diffusers():
    """The real 2.6B base UNet, random weights, fp32, 32x32 latent (weights shared, ~11 GB RAM)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    theirs = UNet2DConditionModel.from_config(_unet_diffusers_config(U.SDXL_BASE)).eval()
    ours = U.UNet(U.SDXL_BASE, device="meta")
    ours.load_state_dict(to_ours(unet_table(U.SDXL_BASE), theirs.state_dict()), strict=True, assign=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([700.0])
    ctx, pooled = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
    ids = micro_ids(BASE_MICRO, 1)
    with torch.no_grad():
        a = ours(x, t, ctx, torch.cat([pooled, FourierEmbedder(256)(ids)], 1))
        b = theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
