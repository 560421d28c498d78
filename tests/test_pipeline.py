"""Pipeline parity with diffusers' SDXL pipelines on small random weights, and determinism.

Both sides load the same weights (ours written as a diffusers folder, read by diffusers),
run fp32 on CPU with Euler and diffusers' default `leading` spacing, and draw their noise
from per-image generators seeded seed+i. Tolerances: latents and pixels within 1e-4.
"""

import contextlib
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image

from sdxl.errors import SDXLError
from sdxl.formats import checkpoint as ck
from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel
from sdxl.models.unet import TINY_BASE as TINY_UNET
from sdxl.models.vae import AutoencoderKL, VAEConfig
from sdxl.pipeline import Pipeline
from sdxl.request import Request
from sdxl.sampling.samplers import GeneratorNoise

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


def pixels(image: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) in [-1, 1], as the pipeline reads an image."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2 - 1


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


def inpaint_both(folder, ours: Pipeline, prompt: str, box, image_seed: int, seed: int, steps: int):
    """(our latents, diffusers' latents, mask): inpainting picture(image_seed) inside `box` at strength 1, leading."""
    from diffusers import StableDiffusionXLInpaintPipeline

    theirs = StableDiffusionXLInpaintPipeline.from_pretrained(folder, requires_aesthetics_score=False)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, box)
    req = Request(prompt, width=SIZE, height=SIZE, steps=steps, schedule="leading", seed=seed,
                  init_image=picture(image_seed), mask=mask, strength=1.0)
    lat = theirs(prompt, image=picture(image_seed), mask_image=mask, strength=1.0, height=SIZE, width=SIZE,
                 num_inference_steps=steps, guidance_scale=5.0, generator=generators(seed, 1), output_type="latent").images
    return ours.generate(req).latents, lat, mask


def test_inpaint_matches_diffusers(models, ours):
    mine, lat, mask = inpaint_both(models[2] / "base", ours, "a tree", (16, 8, 48, 40), 1, 5, 4)
    torch.testing.assert_close(mine, lat, **TOL)
    # outside the mask the image's latent is kept exactly: the posterior sample drawn first from seed 5
    known = ours.encode_image(pixels(picture(1)), GeneratorNoise([5]))
    repaint = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    keep = torch.nn.functional.interpolate(repaint, size=(32, 32)) < 0.5
    torch.testing.assert_close(mine[keep.expand_as(mine)], known[keep.expand_as(known)])


def test_nine_channel_inpaint_matches_diffusers(tmp_path):
    cfg = dataclasses.replace(TINY_BASE, unet=dataclasses.replace(TINY_UNET, in_channels=9))
    torch.manual_seed(2)
    model = randomize(SDXLModel(cfg), 2, 0.05)
    ck.save_diffusers(model, tmp_path / "inpaint")
    ours = Pipeline(model, dtype=torch.float32, channels_last=False)
    mine, lat, _ = inpaint_both(tmp_path / "inpaint", ours, "a boat", (0, 0, 40, 24), 2, 9, 3)
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


def test_refiner_sdedit_matches_diffusers_img2img(models, ours):
    """Base, then the refiner as SDEdit at strength 0.3: diffusers' txt2img, then its img2img on the refiner with the
    base latent and the same generator (second draw: the SDEdit noise)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    _, _, d = models
    base = StableDiffusionXLPipeline.from_pretrained(d / "base")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(d / "refiner")
    req = Request("a lighthouse", width=SIZE, height=SIZE, steps=10, schedule="leading", seed=13, refiner_strength=0.3)
    g = generators(13, 1)
    lat = base(req.prompt, height=SIZE, width=SIZE, num_inference_steps=10, generator=g, output_type="latent").images
    lat = refiner(req.prompt, image=lat, strength=0.3, num_inference_steps=10, generator=g, output_type="latent").images
    torch.testing.assert_close(ours.generate(req).latents, lat, rtol=1e-4, atol=5e-4)  # two models, as the hand-off


@pytest.mark.parametrize("upscale", ["latent", "pixel"])
def test_hires_fix_matches_diffusers_img2img(models, ours, upscale):
    """Hires fix = our txt2img, a bicubic upscale (of the latent, or of the decoded pixels), then diffusers' img2img
    at the larger size with the generator that drew the initial noise (pixel: posterior sample, then noise)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _, _, d = models
    theirs = StableDiffusionXLImg2ImgPipeline.from_pretrained(d / "base", requires_aesthetics_score=False)
    req = Request("a house", width=SIZE, height=SIZE, steps=6, schedule="leading", seed=17, hires_scale=1.5,
                  hires_upscale=upscale, hires_strength=0.5)
    low = ours.generate(dataclasses.replace(req, hires_scale=None)).latents
    if upscale == "latent":
        image = torch.nn.functional.interpolate(low, size=(48, 48), mode="bicubic", align_corners=False)
    else:
        image = torch.nn.functional.interpolate(ours.decode(low), size=(96, 96), mode="bicubic").clamp(0, 1)
    g = generators(17, 1)
    torch.randn((1, 4, 32, 32), generator=g[0])  # the draw of the initial noise at 64x64
    lat = theirs(req.prompt, image=image, strength=0.5, num_inference_steps=6, generator=g, output_type="latent",
                 original_size=(96, 96), target_size=(96, 96)).images
    mine = ours.generate(req).latents
    assert mine.shape == (1, 4, 48, 48)
    torch.testing.assert_close(mine, lat, **TOL)


def test_bad_requests(ours):
    from sdxl.errors import SDXLError

    for kw, msg in [({"width": 60}, "multiples of 8"), ({"sampler": "nope"}, "euler_ancestral"),
                    ({"schedule": "nope"}, "karras"), ({"strength": 1.5, "init_image": picture()}, r"strength must be in \[0, 1\]")]:
        with pytest.raises(SDXLError, match=msg):
            ours.generate(Request("x", width=kw.pop("width", SIZE), height=SIZE, steps=2, **kw))
    with pytest.raises(SDXLError, match="mask is 32x32 but the image is 64x64"):
        ours.generate(Request("x", width=SIZE, height=SIZE, steps=2, init_image=picture(), mask=Image.new("L", (32, 32))))


def nan_in_low_precision(monkeypatch, method: str) -> list:
    """Make `AutoencoderKL.<method>` give NaN whenever it runs in bf16 (an fp16 overflow, as seen on real VAEs)."""
    calls, real = [], getattr(AutoencoderKL, method)

    def flaky(self, x, band=None):
        calls.append(x.dtype)
        out = real(self, x, band)
        if x.dtype != torch.bfloat16:
            return out
        return out * float("nan") if method == "decode" else type(out)(out.mean * float("nan"), out.logvar)

    monkeypatch.setattr(AutoencoderKL, method, flaky)
    return calls


def test_vae_decode_overflow_is_retried_in_fp32(models, monkeypatch):
    base, _, _ = models
    pipe = Pipeline(base, dtype=torch.float32, vae_dtype=torch.bfloat16, channels_last=False)
    calls = nan_in_low_precision(monkeypatch, "decode")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="VAE decode in torch.bfloat16 gave non-finite values; retrying in float32"):
        pix = pipe.decode(z)
    assert calls == [torch.bfloat16, torch.float32]
    # the float32 retry runs the bf16 weights in float32: within bf16 rounding of the fp32 pipeline's decode
    torch.testing.assert_close(pix, Pipeline(base, dtype=torch.float32).decode(z), rtol=0, atol=0.03)


def test_vae_encode_overflow_is_retried_in_fp32(models, monkeypatch):
    base, _, _ = models
    pipe = Pipeline(base, dtype=torch.float32, vae_dtype=torch.bfloat16, channels_last=False)
    calls = nan_in_low_precision(monkeypatch, "encode")
    with pytest.warns(UserWarning, match="VAE encode in torch.bfloat16 gave non-finite values; retrying in float32"):
        out = pipe.generate(Request("x", width=SIZE, height=SIZE, steps=2, seed=0, init_image=picture(),
                                    strength=0.5))
    assert calls == [torch.bfloat16, torch.float32] and torch.isfinite(out.latents).all()


@pytest.mark.parametrize("vae_dtype", [torch.float32, torch.bfloat16])
def test_nan_in_the_vae_decoder_is_an_error_not_a_black_image(models, vae_dtype):
    """A VAE decoder holding NaN: after the float32 retry the output is checked again; no advice to use fp32."""
    base, _, _ = models
    broken = SDXLModel.from_parts(unet=base.unet, conditioner=base.conditioner, vae=AutoencoderKL(base.vae.cfg))
    broken.vae.load_state_dict(base.vae.state_dict())
    with torch.no_grad():
        broken.vae.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
    pipe = Pipeline(broken, dtype=torch.float32, vae_dtype=vae_dtype, channels_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bf16 retry warning
        with pytest.raises(SDXLError, match=r"VAE \(decode\) gave non-finite values \(NaN/Inf\) even in float32") as e:
            pipe.generate(Request("x", width=SIZE, height=SIZE, steps=1, seed=0))
    assert "--dtype fp32" not in str(e.value)


def test_a_vae_that_decodes_one_flat_colour_warns(models):
    """Finite but saturated (a decoder bias of 1e4): every pixel white. Not an error, but never silent."""
    base, _, _ = models
    broken = SDXLModel.from_parts(unet=base.unet, conditioner=base.conditioner, vae=AutoencoderKL(base.vae.cfg))
    broken.vae.load_state_dict(base.vae.state_dict())
    with torch.no_grad():
        broken.vae.decoder.conv_out.bias.fill_(1e4)
    pipe = Pipeline(broken, dtype=torch.float32, channels_last=False)
    with pytest.warns(UserWarning, match=r"image\(s\) 0, 1 of the batch decoded to one flat colour"):
        result = pipe.generate(Request("x", width=SIZE, height=SIZE, steps=1, seed=0, batch=2))
    assert all(np.asarray(im).min() == 255 for im in result.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the working VAE: no warning
        Pipeline(base, dtype=torch.float32, channels_last=False).generate(
            Request("x", width=SIZE, height=SIZE, steps=1, seed=0))


def test_non_finite_sampling_in_fp32_does_not_advise_fp32(models):
    base, _, _ = models
    unet = copy.deepcopy(base.unet)
    with torch.no_grad():
        unet.out[2].bias.fill_(float("inf"))
    pipe = Pipeline(SDXLModel.from_parts(unet=unet, conditioner=base.conditioner, vae=base.vae), dtype=torch.float32)
    with pytest.raises(SDXLError, match=r"sampling gave non-finite values \(NaN/Inf\) even in float32") as e:
        pipe.generate(Request("x", width=SIZE, height=SIZE, steps=2, seed=0))
    assert "--dtype fp32" not in str(e.value)


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


def test_pipeline_leaves_the_callers_models_as_they_were(models):
    """dtype, training mode, requires_grad, memory format and values of the given modules are unchanged after
    building a bf16, channels-last Pipeline and generating (refiner and VAE included)."""
    base, refiner = (copy.deepcopy(m).train() for m in models[:2])

    def state(m):
        return [(k, v.dtype, v.requires_grad, v.is_contiguous(), v.clone()) for k, v in m.named_parameters()]

    before = [state(base), state(refiner)]
    pipe = Pipeline(base, refiner, dtype=torch.bfloat16, vae_dtype=torch.float16, channels_last=True)
    pipe.generate(Request("x", width=SIZE, height=SIZE, steps=2, seed=0, refiner_strength=0.5))
    with contextlib.suppress(SDXLError), pytest.warns(UserWarning, match="retrying in float32"):
        pipe.decode(torch.full((1, 4, 8, 8), 1e4))  # fp16 overflow: the float32 retry runs on a copy
    for b, a in zip(before, [state(base), state(refiner)]):
        assert [x[:4] for x in a] == [x[:4] for x in b]
        assert all(torch.equal(x[4], y[4]) for x, y in zip(a, b))
    assert all(m.training for m in [*base.modules(), *refiner.modules()])
    # the pipeline's own copies are what it was asked for
    assert next(pipe.base.unet.parameters()).dtype == torch.bfloat16 and not pipe.base.unet.training
    assert next(pipe.vae.parameters()).dtype == torch.float16
    assert pipe.base.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_inpainting_keeps_the_pixels_outside_the_mask(ours):
    """The original pixels are pasted back outside the mask after decoding (A1111's and diffusers' overlay); with
    mask blur 0 every one of them (blur 4: tests/test_cleanup.py)."""
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 8, 48, 40))
    out = ours.generate(Request("a tree", width=SIZE, height=SIZE, steps=3, seed=5, init_image=picture(1), mask=mask,
                                strength=0.8, mask_blur=0)).images[0]
    got, want, m = np.asarray(out), np.asarray(picture(1)), np.asarray(mask) > 0
    assert np.array_equal(got[~m], want[~m])
    assert np.abs(got[m].astype(int) - want[m]).mean() > 5  # the masked region was repainted


def test_mask_goes_through_its_images_resize(ours):
    """A 100x100 image and mask at 96x96: the mask is resized as its image, not refused."""
    image, mask = picture(3).resize((100, 100)), Image.new("L", (100, 100), 0)
    mask.paste(255, (0, 0, 50, 100))
    out = ours.generate(Request("x", width=96, height=96, steps=2, seed=0, init_image=image, mask=mask, mask_blur=0))
    got, want = np.asarray(out.images[0]), np.asarray(image.resize((96, 96), Image.LANCZOS))
    assert out.images[0].size == (96, 96)
    assert np.array_equal(got[:, 49:], want[:, 49:])  # the kept half is the resized original


@pytest.fixture(scope="module")
def eight_x():
    """A tiny base with an 8x VAE and a UNet with two downsamples: pixel sizes must be multiples of 32 for the
    latent to halve twice evenly, as SDXL's."""
    cfg = dataclasses.replace(TINY_BASE, unet=dataclasses.replace(TINY_UNET, channel_mult=(1, 2, 2),
                                                                  transformer_depth=(0, 1, 0)),
                              vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1))
    torch.manual_seed(3)
    return Pipeline(randomize(SDXLModel(cfg), 3, 0.05), dtype=torch.float32, channels_last=False)


@pytest.mark.parametrize("width,height", [(136, 128), (296, 200)])
def test_sizes_multiple_of_8_not_of_the_unets(eight_x, width, height):
    """136x128 (latent 17x16) and 296x200 (an init image of 300x200 at multiples of 8) give images of that size."""
    out = eight_x.generate(Request("x", width=width, height=height, steps=2, seed=0))
    assert out.images[0].size == (width, height) and torch.isfinite(out.latents).all()


def test_load_shares_the_loaded_weights(tmp_path, monkeypatch):
    """Pipeline.load owns what it loads: channels-last in place, so the pipeline holds no second copy."""
    from conftest import tiny_checkpoints

    base_file, refiner_file = tiny_checkpoints(tmp_path)
    loaded, real = [], ck.load
    monkeypatch.setattr(ck, "load", lambda *a, **k: loaded.append(real(*a, **k)) or loaded[-1])
    pipe = Pipeline.load(base_file, refiner_file, dtype=torch.float32)
    for mine, theirs in ((pipe.base, loaded[0]), (pipe.refiner, loaded[1])):
        assert [p.data_ptr() for p in mine.parameters()] == [p.data_ptr() for p in theirs.parameters()]
    assert pipe.base.unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
