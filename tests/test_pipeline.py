"""Pipeline parity with diffusers' SDXL pipelines on small random weights, and determinism.

Both sides load the same weights (ours written as a diffusers folder, read by diffusers),
run fp32 on CPU with Euler and diffusers' default `leading` spacing, and draw their noise
from per-image generators seeded seed+i. Tolerances: latents and pixels within 1e-4.
"""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image

from sdxl.formats import checkpoint as ck
from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel
from sdxl.pipeline import Pipeline
from sdxl.request import Request
from sdxl.models.unet import TINY_BASE as TINY_UNET

TOL = dict(rtol=1e-4, atol=1e-4)
SIZE = 64  # pixels; the tiny VAE downsamples by 2, so latents are 32x32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    base = randomize(SDXLModel(TINY_BASE), 0, 0.05)
    refiner = randomize(SDXLModel(TINY_REFINER), 1, 0.05)
    d = tmp_path_factory.mktemp("pipe")
    ck.save_diffusers(base, d / "base")
    ck.save_diffusers(refiner, d / "refiner")
    return base, refiner, d


@pytest.fixture(scope="module")
def ours(models):
    base, refiner, _ = models
    return Pipeline(base, refiner, dtype=torch.float32, channels_last=False)


def generators(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def picture(seed=0) -> Image.Image:
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    a = np.stack([x, y, (x + y) / 2], -1) * 200 + g.normal(0, 20, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_txt2img_matches_diffusers(models, ours):
    from diffusers import StableDiffusionXLPipeline

    _, _, d = models
    theirs = StableDiffusionXLPipeline.from_pretrained(d / "base")
    req = Request("a red circle on a blue background", width=SIZE, height=48, steps=4, sampler="euler",
                  schedule="leading", cfg=5.0, seed=7, batch=2, crop=(8, 16), original_size=(512, 768))
    mine = ours.generate(req)
    lat = theirs(req.prompt, height=48, width=SIZE, num_inference_steps=4, guidance_scale=5.0,
                 generator=generators(7, 2), num_images_per_prompt=2, output_type="latent",
                 crops_coords_top_left=(8, 16), original_size=(512, 768)).images
    torch.testing.assert_close(mine.latents, lat, **TOL)
    img = theirs(req.prompt, height=48, width=SIZE, num_inference_steps=4, guidance_scale=5.0,
                 generator=generators(7, 2), num_images_per_prompt=2, output_type="pt",
                 crops_coords_top_left=(8, 16), original_size=(512, 768)).images
    torch.testing.assert_close(ours.decode(mine.latents), img, **TOL)


def test_negative_prompt_and_guidance_rescale_match_diffusers(models, ours):
    from diffusers import StableDiffusionXLPipeline

    _, _, d = models
    theirs = StableDiffusionXLPipeline.from_pretrained(d / "base")
    req = Request("a cat", negative_prompt="blurry, low quality", width=SIZE, height=SIZE, steps=3,
                  schedule="leading", cfg=7.0, guidance_rescale=0.7, seed=3)
    lat = theirs(req.prompt, negative_prompt=req.negative_prompt, height=SIZE, width=SIZE, num_inference_steps=3,
                 guidance_scale=7.0, guidance_rescale=0.7, generator=generators(3, 1), output_type="latent").images
    torch.testing.assert_close(ours.generate(req).latents, lat, **TOL)


def test_img2img_matches_diffusers(models, ours):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _, _, d = models
    theirs = StableDiffusionXLImg2ImgPipeline.from_pretrained(d / "base", requires_aesthetics_score=False)
    req = Request("a house", width=SIZE, height=SIZE, steps=6, schedule="leading", seed=11, init_image=picture(),
                  strength=0.5)
    lat = theirs(req.prompt, image=picture(), strength=0.5, num_inference_steps=6, guidance_scale=5.0,
                 generator=generators(11, 1), output_type="latent").images
    torch.testing.assert_close(ours.generate(req).latents, lat, **TOL)


def test_inpaint_matches_diffusers(models, ours):
    from diffusers import StableDiffusionXLInpaintPipeline

    _, _, d = models
    theirs = StableDiffusionXLInpaintPipeline.from_pretrained(d / "base", requires_aesthetics_score=False)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))
    req = Request("a tree", width=SIZE, height=SIZE, steps=4, schedule="leading", seed=5, init_image=picture(1),
                  mask=mask, strength=1.0)
    lat = theirs(req.prompt, image=picture(1), mask_image=mask, strength=1.0, height=SIZE, width=SIZE, num_inference_steps=4,
                 guidance_scale=5.0, generator=generators(5, 1), output_type="latent").images
    mine = ours.generate(req).latents
    torch.testing.assert_close(mine, lat, **TOL)
    # outside the mask the image's latent is kept exactly
    known = ours.encode_image(ours._image_tensor(picture(1), SIZE, SIZE)[None], __import__("sdxl.pipeline").pipeline.GeneratorNoise(5, 1))
    keep = torch.nn.functional.interpolate(ours._mask_tensor(mask, SIZE, SIZE), size=(32, 32)) < 0.5
    torch.testing.assert_close(mine[keep.expand_as(mine)], known[keep.expand_as(known)])


def test_nine_channel_inpaint_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionXLInpaintPipeline

    cfg = dataclasses.replace(TINY_BASE, unet=dataclasses.replace(TINY_UNET, in_channels=9))
    torch.manual_seed(2)
    model = randomize(SDXLModel(cfg), 2, 0.05)
    ck.save_diffusers(model, tmp_path / "inpaint")
    theirs = StableDiffusionXLInpaintPipeline.from_pretrained(tmp_path / "inpaint", requires_aesthetics_score=False)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, 40, 24))
    req = Request("a boat", width=SIZE, height=SIZE, steps=3, schedule="leading", seed=9, init_image=picture(2),
                  mask=mask, strength=1.0)
    lat = theirs(req.prompt, image=picture(2), mask_image=mask, strength=1.0, height=SIZE, width=SIZE, num_inference_steps=3,
                 guidance_scale=5.0, generator=generators(9, 1), output_type="latent").images
    mine = Pipeline(model, dtype=torch.float32, channels_last=False).generate(req).latents
    torch.testing.assert_close(mine, lat, **TOL)


def test_base_to_refiner_handoff_matches_diffusers(models, ours):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    _, _, d = models
    base = StableDiffusionXLPipeline.from_pretrained(d / "base")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(d / "refiner")
    req = Request("a lighthouse", width=SIZE, height=SIZE, steps=10, schedule="leading", seed=21, refiner_switch=0.8)
    g = generators(21, 1)
    lat = base(req.prompt, height=SIZE, width=SIZE, num_inference_steps=10, denoising_end=0.8, generator=g,
               output_type="latent").images
    lat = refiner(req.prompt, image=lat, num_inference_steps=10, denoising_start=0.8, generator=g,
                  output_type="latent").images
    # 10 steps through two models: fp32 rounding reaches ~2e-4 on a few of 4096 values of magnitude ~1
    torch.testing.assert_close(ours.generate(req).latents, lat, rtol=1e-4, atol=5e-4)


def test_batch_image_i_equals_single_image_with_seed_plus_i(ours):
    """Same seed and settings -> same image, across runs and batch sizes (stochastic sampler included)."""
    req = Request("a (red:1.2) circle, [blurry]", width=SIZE, height=SIZE, steps=3, sampler="euler_ancestral", seed=100,
                  batch=3)
    batch = ours.generate(req).latents
    again = ours.generate(req).latents
    assert torch.equal(batch, again)
    # Across batch sizes only fp32 GEMM blocking differs: ~1e-6 relative per UNet call (measured 6e-6 on outputs
    # of ~4; 3e-4 on latents of ~120 after 3 steps of this random model), so compare relative to the latent scale.
    for i in range(3):
        single = ours.generate(dataclasses.replace(req, batch=1, seed=100 + i)).latents
        torch.testing.assert_close(single[0], batch[i], rtol=0, atol=2e-5 * float(batch.abs().max()))


def test_initial_noise_convention(ours, monkeypatch):
    """Image i's initial latent is randn((1, 4, h, w), Generator('cpu').manual_seed(seed + i)) * sqrt(sigma_0^2 + 1),
    the scale of sgm's EDMSampler (ComfyUI and diffusers' `leading` agree; diffusers' `trailing` uses sigma_0)."""
    seen = {}

    def capture(model, x, sigmas, **kw):
        seen["x"], seen["sigma"] = x.clone(), float(sigmas[0])
        return x

    from sdxl.sampling import samplers

    monkeypatch.setitem(samplers.SAMPLERS, "euler", capture)
    ours.generate(Request("x", width=SIZE, height=SIZE, steps=5, seed=42, batch=2))
    for i in range(2):
        noise = torch.randn((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(42 + i))
        expected = noise * (seen["sigma"] ** 2 + 1) ** 0.5
        torch.testing.assert_close(seen["x"][i:i + 1], expected)


def test_long_prompts_and_guidance_interval(ours):
    long = ", ".join(["a very detailed painting of a lighthouse on a cliff"] * 16)  # 192 tokens: 3 windows
    cond, uncond = ours.conditioning(ours.base, Request(long, negative_prompt="blurry", width=SIZE, height=SIZE))
    assert cond.crossattn.shape[1] == 77 * 3 and uncond.crossattn.shape == cond.crossattn.shape
    out = ours.generate(Request(long, width=SIZE, height=SIZE, steps=4, seed=1, guidance_interval=(0.0, 0.5)))
    assert torch.isfinite(out.latents).all()
    # guidance only on an interval is a different image from guidance everywhere
    full = ours.generate(Request(long, width=SIZE, height=SIZE, steps=4, seed=1))
    assert not torch.allclose(out.latents, full.latents)


@pytest.mark.parametrize("strength", [0.01, 1.0])
def test_img2img_strength_edges(ours, strength):
    out = ours.generate(Request("x", width=SIZE, height=SIZE, steps=5, seed=0, init_image=picture(), strength=strength))
    assert torch.isfinite(out.latents).all() and out.images[0].size == (SIZE, SIZE)


def test_refiner_sdedit_and_hires_fix(ours):
    out = ours.generate(Request("x", width=SIZE, height=SIZE, steps=4, seed=0, refiner_strength=0.3, hires_scale=1.5))
    assert out.latents.shape == (1, 4, 48, 48) and out.images[0].size == (96, 96)
    pix = ours.generate(Request("x", width=SIZE, height=SIZE, steps=4, seed=0, hires_scale=1.25, hires_upscale="pixel"))
    assert pix.images[0].size == (80, 80)


def test_bad_requests(ours):
    from sdxl.errors import SDXLError

    for kw, msg in [({"width": 60}, "multiples of 8"), ({"sampler": "nope"}, "euler_ancestral"),
                    ({"schedule": "nope"}, "karras"), ({"strength": 1.5, "init_image": picture()}, r"strength must be in \[0, 1\]")]:
        with pytest.raises(SDXLError, match=msg):
            ours.generate(Request("x", width=kw.pop("width", SIZE), height=SIZE, steps=2, **kw))
    with pytest.raises(SDXLError, match="mask is 32x32 but the image is 64x64"):
        ours.generate(Request("x", width=SIZE, height=SIZE, steps=2, init_image=picture(), mask=Image.new("L", (32, 32))))


def test_tiled_vae_has_no_seams_and_matches_untiled_when_one_tile(ours):
    from sdxl.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    vae = randomize(AutoencoderKL(VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)), 0, 0.02).eval()
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 12, 16), size=(48, 64), mode="bicubic")  # smooth
    with torch.no_grad():
        full = vae.decode(z)
        torch.testing.assert_close(vae.decode_tiled(z, tile=64), full)  # one tile: the plain decode
        tiled = vae.decode_tiled(z, tile=24, overlap=8)
    assert tiled.shape == full.shape and torch.isfinite(tiled).all()

    def seam_ratio(img, seams):  # mean |horizontal gradient| on tile seams relative to everywhere
        g = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))
        return float(g[seams].mean() / g.mean())

    # tiles start at latent columns 0, 16, 32, 40 (x8 pixels); overlaps end at 24*8, 40*8, 48*8 pixels
    seams = [c * 8 - 1 for c in (16, 24, 32, 40, 48)]
    assert seam_ratio(tiled, seams) < 1.25 * seam_ratio(full, seams)


def test_non_finite_vae_output_retried_in_fp32(ours, monkeypatch):
    """fp16 VAE overflow -> the decode is retried in fp32 with a warning."""
    calls = []
    real = ours.vae.decode

    def flaky(z):
        calls.append(z.dtype)
        out = real(z)
        return out * float("nan") if z.dtype == torch.bfloat16 else out

    monkeypatch.setattr(ours.vae, "decode", flaky)
    monkeypatch.setattr(ours, "vae_dtype", torch.bfloat16)
    ours.vae.to(torch.bfloat16)
    try:
        with pytest.warns(UserWarning, match="retrying in float32"):
            pix = ours.decode(torch.randn(1, 4, 8, 8))
    finally:
        ours.vae.float()
    assert calls == [torch.bfloat16, torch.float32] and torch.isfinite(pix).all()


def test_outpainting_by_padding(ours):
    from sdxl.pipeline import outpaint_request

    req = Request("a field", width=SIZE, height=SIZE, steps=3, seed=4, init_image=picture(), outpaint=(8, 0, 5, 16))
    padded = outpaint_request(req)
    assert (padded.width, padded.height) == (SIZE + 16, SIZE + 16) and padded.mask.size == (80, 80)
    m = np.asarray(padded.mask)
    assert m[:, :8].all() and m[-16:].all() and m[:, -8:].all()  # new border painted (right pad 5 -> 8)
    assert not m[8:SIZE - 8, 16:SIZE].any()  # the old image kept, but for an 8-px seam band
    assert np.array_equal(np.asarray(padded.init_image)[0:SIZE, 8:8 + SIZE], np.asarray(picture()))
    out = ours.generate(req)
    assert out.images[0].size == (80, 80) and torch.isfinite(out.latents).all()


def test_off_bucket_size_warns_for_official_models(ours, monkeypatch):
    from sdxl.models.model import ModelConfig

    req = Request("x", width=SIZE, height=48, steps=1, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.generate(req)  # a custom-size model: no bucket warning
    monkeypatch.setattr(ModelConfig, "architecture", property(lambda self: "sdxl-base"))
    with pytest.warns(UserWarning, match=r"64x48 is not one of SDXL's trained sizes.*nearest aspect ratio it was "
                                         r"trained on: 1152x896"):
        ours.generate(req)


def test_unet_only_refiner_shares_the_base_text_encoder(models, tmp_path):
    """A refiner file with only `model.diffusion_model.*` gets the base's bigG: the same images as a full refiner
    file holding that encoder; a UNet that does not fit it is a one-line error."""
    from safetensors.torch import save_file

    from sdxl.errors import SDXLError

    base, refiner, _ = models
    full = SDXLModel(TINY_REFINER)
    full.load_state_dict(refiner.state_dict())
    full.conditioner.bigg.load_state_dict(base.conditioner.bigg.state_dict())
    ck.save_single_file(base, tmp_path / "base.safetensors")
    ck.save_single_file(full, tmp_path / "refiner_full.safetensors")
    unet_only = {k: v.contiguous() for k, v in full.state_dict().items() if k.startswith("model.diffusion_model.")}
    save_file(unet_only, str(tmp_path / "refiner_unet.safetensors"))
    req = Request("a lighthouse", width=SIZE, height=SIZE, steps=6, seed=3, refiner_switch=0.6)
    kw = dict(dtype=torch.float32, channels_last=False)
    a = Pipeline.load(tmp_path / "base.safetensors", tmp_path / "refiner_full.safetensors", **kw)
    b = Pipeline.load(tmp_path / "base.safetensors", tmp_path / "refiner_unet.safetensors", **kw)
    assert b.refiner.cfg.is_refiner and b.refiner.conditioner.bigg is b.base.conditioner.bigg
    torch.testing.assert_close(b.generate(req).latents, a.generate(req).latents, rtol=0, atol=0)
    wrong = SDXLModel(dataclasses.replace(TINY_REFINER, conditioner=None, vae=None,
                                          unet=dataclasses.replace(TINY_REFINER.unet, context_dim=64)))
    save_file({k: v.contiguous() for k, v in wrong.state_dict().items()}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(SDXLError, match="does not fit the base's bigG"):
        Pipeline.load(tmp_path / "base.safetensors", tmp_path / "wrong.safetensors", **kw)
