"""Generation: txt2img, img2img, inpainting, base -> refiner, hires fix. One `Pipeline`, components loaded once.

The sampling path of docs/samplers.md §1: per-image seeded CPU noise, sigmas from a named schedule,
a sampler over a denoiser D(x, sigma) that wraps the UNet with the eps parameterisation
and classifier-free guidance. Latents stay float32 between steps; the UNet runs in the
pipeline's dtype.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl.sampling import samplers as samplers_
from sdxl.sampling import schedules
from sdxl.models.conditioning import Conditioning, micro_values, prompt_rows
from sdxl.errors import SDXLError
from sdxl.request import Request
from sdxl.models.model import SDXLModel
from sdxl.models.tokenizer import Tokenizer

# The report's multi-aspect buckets (SDXL report, Appendix I), pixel sizes (width, height).
BUCKETS = [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
           (1536, 640), (640, 1536), (1088, 960), (960, 1088), (1280, 768), (768, 1280), (1408, 704), (704, 1408),
           (1472, 704), (704, 1472), (1600, 640), (640, 1600), (1664, 576), (576, 1664), (1728, 576), (576, 1728),
           (1792, 576), (576, 1792), (1856, 512), (512, 1856), (1920, 512), (512, 1920), (1984, 512), (512, 1984),
           (2048, 512), (512, 2048), (1024, 960), (960, 1024)]


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: there bf16 matmul/conv run several times faster than fp32; elsewhere far slower."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on GPUs (bf16 where supported), bf16 on CPUs with AMX/AVX512-BF16, else fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@dataclass
class Result:
    latents: torch.Tensor  # (N, 4, H/8, W/8) float32, scaled (what the UNet sees, diffusers' output_type="latent")
    images: list[Image.Image]


def outpaint_request(req: Request) -> Request:
    """Outpainting by padding: the init image on a larger canvas (edges extended), a mask over the new border.

    Pads are rounded up to multiples of 8; the mask reaches 8 pixels into the old image so the seam is repainted.
    """
    if req.init_image is None:
        raise SDXLError("outpainting needs an init image (--init-image)")
    if any(p < 0 for p in req.outpaint):
        raise SDXLError(f"outpaint pads must be >= 0, got {req.outpaint}")
    left, top, right, bottom = (-(-p // 8) * 8 for p in req.outpaint)
    image = req.init_image.convert("RGB")
    w, h = image.size
    w8, h8 = w // 8 * 8, h // 8 * 8
    image = image.crop((0, 0, w8, h8))
    a = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(a.shape[:2], 255, np.uint8)
    inner = (slice(top + 8 if top else 0, top + h8 - (8 if bottom else 0)),
             slice(left + 8 if left else 0, left + w8 - (8 if right else 0)))
    mask[inner] = 0
    return replace(req, init_image=Image.fromarray(a), mask=Image.fromarray(mask), width=a.shape[1],
                   height=a.shape[0], outpaint=None, strength=1.0)


class GeneratorNoise:
    """Per-image CPU generators seeded seed+i: the initial noise, then every stochastic sampler's noise."""

    def __init__(self, seed: int, batch: int):
        self.generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(batch)]

    def randn(self, shape: tuple[int, ...], device=None) -> torch.Tensor:
        """(N, *shape) float32: row i drawn from generator i (docs/samplers.md §1; diffusers' generator lists)."""
        return torch.cat([torch.randn((1, *shape), generator=g) for g in self.generators]).to(device)

    def sampler(self, like: torch.Tensor):
        return lambda sigma, sigma_next: self.randn(tuple(like.shape[1:]), like.device)


class GuidedDenoiser:
    """D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t) with classifier-free guidance in eps space.

    Guidance rescale: Lin et al. 2023, eq. 15-16 (diffusers `rescale_noise_cfg`). Guidance applies
    only while low < sigma <= high of `sigma_range` (Kynkäänniemi et al. 2024); elsewhere the conditional
    branch runs alone. Inpainting: `blend` re-noises the known region to the current sigma before
    each model call but the first (equal to diffusers' per-step blending for first-order samplers);
    a 9-channel UNet instead receives the mask and masked-image latent as extra input channels.
    """

    def __init__(self, unet, cond: Conditioning, uncond: Conditioning | None, scale: float, rescale: float = 0.0,
                 sigma_range: tuple[float, float] = (-1.0, math.inf), extra: torch.Tensor | None = None,
                 blend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, skip_first_blend: bool = False):
        self.unet, self.cond, self.uncond = unet, cond, uncond
        self.scale, self.rescale, self.sigma_range = scale, rescale, sigma_range
        self.extra, self.blend, self.skip_blend = extra, blend, skip_first_blend
        self.dtype = next(unet.parameters()).dtype
        self.denoise = samplers_.EpsDenoiser(self.eps)

    def eps(self, x_in: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
        """The UNet's eps for a scaled input; with guidance, one batched call for (uncond, cond)."""
        if self.extra is not None:
            x_in = torch.cat([x_in, self.extra], dim=1)
        x_in = x_in.to(self.dtype)
        if not guided:
            return self.unet(x_in, t, self.cond.crossattn, self.cond.vector).float()
        both = Conditioning.cat([self.uncond, self.cond])
        out = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), both.crossattn, both.vector).float()
        eps_u, eps_c = out.chunk(2)
        eps = eps_u + self.scale * (eps_c - eps_u)
        if self.rescale > 0:
            dims = list(range(1, eps.ndim))
            rescaled = eps * (eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
            eps = self.rescale * rescaled + (1 - self.rescale) * eps
        return eps

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.blend is not None:
            if self.skip_blend:
                self.skip_blend = False
            else:
                keep, known, noise = self.blend  # keep = 1 where the image is kept
                x = x * (1 - keep) + (known + noise * sigma.view(-1, 1, 1, 1)) * keep
        guided = (self.uncond is not None and self.scale != 1.0
                  and self.sigma_range[0] < float(sigma.max()) <= self.sigma_range[1] * (1 + 1e-6))
        return self.denoise(x, sigma.float(), guided=guided)


def with_base_text_encoder(refiner: SDXLModel, base: SDXLModel, name: str = "refiner") -> SDXLModel:
    """A UNet-only refiner file gets the base's bigG encoder (shared, not copied), with the refiner's
    micro-conditioning. The official refiner's bigG equals the base's; diffusers' docs share it the same way."""
    from sdxl.models.conditioning import Conditioner, conditioner_config
    from sdxl.models.model import ModelConfig

    bigg, unet = base.conditioner.bigg, refiner.unet.cfg
    cfg = conditioner_config(None, bigg.cfg, unet.adm_in_channels)
    if unet.context_dim != bigg.cfg.width or cfg.vector_dim != unet.adm_in_channels:
        raise SDXLError(f"{name}: a UNet-only refiner (context {unet.context_dim}, vector {unet.adm_in_channels}) "
                        f"does not fit the base's bigG encoder (width {bigg.cfg.width}, pooled {bigg.cfg.proj_dim}) "
                        "with the refiner's micro-conditioning; pass a refiner file with its own text encoder")
    conditioner = Conditioner(cfg, device="meta")
    conditioner.embedders[0] = bigg
    refiner.conditioner, refiner.cfg = conditioner, ModelConfig(unet, cfg, None)
    return refiner


class Pipeline:
    """Base (and optional refiner) SDXL models, loaded once, with their tokenizers; see `generate`."""

    def __init__(self, base: SDXLModel, refiner: SDXLModel | None = None, device="cpu", dtype=torch.bfloat16,
                 vae_dtype: torch.dtype | None = None, tokenizer: Tokenizer | None = None, channels_last: bool = True,
                 vae_tiling: bool | None = None):
        self.device, self.dtype, self.vae_tiling = torch.device(device), dtype, vae_tiling
        self.tokenizer = tokenizer or Tokenizer.default()
        self.base = self._prepare(base, dtype, channels_last)
        self.refiner = self._prepare(refiner, dtype, channels_last) if refiner is not None else None
        self.vae = base.vae.to(self.device, vae_dtype or dtype).eval()
        if channels_last:
            self.vae.to(memory_format=torch.channels_last)
        self.vae_dtype = vae_dtype or dtype
        self.scaling_factor = self.vae.cfg.scaling_factor
        self.latent_factor = 2 ** (len(self.vae.cfg.ch_mult) - 1)  # 8 for SDXL
        self.sigmas_train = schedules.discrete_sigmas()

    def _prepare(self, m: SDXLModel, dtype, channels_last: bool) -> SDXLModel:
        m = m.to(self.device).eval().requires_grad_(False)
        m.unet.to(dtype)
        m.conditioner.to(dtype)
        if channels_last:
            m.unet.to(memory_format=torch.channels_last)
        return m

    @classmethod
    def load(cls, model, refiner=None, vae=None, device="cpu", dtype=torch.bfloat16, **kw) -> "Pipeline":
        from sdxl.formats.checkpoint import load

        base = load(model, device, dtype, vae_path=vae)
        ref = load(refiner, device, dtype, components=("unet", "conditioner")) if refiner else None
        if ref is not None and "conditioner" not in ref.components():
            ref = with_base_text_encoder(ref, base, str(refiner))
        return cls(base, ref, device, dtype, **kw)

    # --- conditioning ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_text(self, model: SDXLModel, prompt: str, prompt_2: str | None,
                    min_windows: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A (weighted, long) prompt -> crossattn (1, 77 * windows, C), pooled (1, P), windows (`Conditioner`)."""
        crossattn, pooled = model.conditioner.encode_prompt(prompt, prompt_2, self.tokenizer, min_windows)
        return crossattn, pooled, crossattn.shape[1] // 77

    @staticmethod
    def micro(req: Request, negative: bool) -> dict:
        """Micro-conditioning values of a request (docs/conditioning.md §2: sizes = output size, crop (0, 0))."""
        if negative:
            return micro_values(req.height, req.width, req.negative_original_size or req.original_size,
                                req.negative_crop or req.crop, req.negative_target_size or req.target_size,
                                req.negative_aesthetic_score)
        return micro_values(req.height, req.width, req.original_size, req.crop, req.target_size, req.aesthetic_score)

    @torch.no_grad()
    def conditioning(self, model: SDXLModel, req: Request) -> tuple[Conditioning, Conditioning | None]:
        """(cond, uncond) for a batch, one prompt per image or one for all; no uncond at cfg 1 (`Conditioner.guided`,
        docs/conditioning.md §3)."""
        prompts = prompt_rows(req.prompt, req.prompt_2, req.batch)
        negatives = prompt_rows(req.negative_prompt, req.negative_prompt_2, req.batch) if req.cfg != 1.0 else None
        return model.conditioner.guided(self.tokenizer, prompts, self.micro(req, False), negatives,
                                        self.micro(req, True))

    # --- images <-> latents ------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, noise: GeneratorNoise) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> scaled latents, sampled from the posterior with each image's generator."""
        images = images.to(self.device, self.vae_dtype)
        f = self.latent_factor
        dist = (self.vae.encode_tiled if self._tiled(images[:, :, ::f, ::f]) else self.vae.encode)(images)
        eps = noise.randn(tuple(dist.mean.shape[1:]), self.device)
        return (dist.mean.float() + dist.std.float() * eps) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [0, 1]; non-finite output (fp16 overflow) is retried in fp32."""
        z = (latents / self.scaling_factor).to(self.device, self.vae_dtype)
        if self.vae_dtype != torch.float32:
            z = z.contiguous(memory_format=torch.channels_last)
        decode = self.vae.decode_tiled if self._tiled(z) else self.vae.decode
        x = decode(z).float()
        if not torch.isfinite(x).all():
            if self.vae_dtype == torch.float32:
                raise SDXLError("the VAE produced non-finite values even in float32; the latents or weights are broken")
            warnings.warn(f"VAE decode in {self.vae_dtype} gave non-finite values; retrying in float32")
            self.vae.float()
            try:
                x = (self.vae.decode_tiled if self._tiled(z) else self.vae.decode)(z.float()).float()
            finally:
                self.vae.to(self.vae_dtype)
        return (x / 2 + 0.5).clamp(0, 1)

    def _tiled(self, latents: torch.Tensor) -> bool:
        """Tile the VAE when asked, or automatically for latents over 128x128 (1024x1024 pixels)."""
        if self.vae_tiling is not None:
            return self.vae_tiling
        return latents.shape[-2] * latents.shape[-1] > 128 * 128

    # --- sampling ----------------------------------------------------------------------------

    def _sample(self, model: SDXLModel, req: Request, x: torch.Tensor, sigmas: torch.Tensor, noise: GeneratorNoise,
                callback=None, extra=None, blend=None, skip_first_blend=False) -> torch.Tensor:
        cond, uncond = self.conditioning(model, req)
        sigma_range = self._guidance_sigmas(req)
        denoiser = GuidedDenoiser(model.unet, cond, uncond, req.cfg, req.guidance_rescale, sigma_range, extra,
                                  blend, skip_first_blend)
        fn = samplers_.SAMPLERS[req.sampler]
        with torch.no_grad():
            return fn(denoiser, x, sigmas.to(x.device), callback=callback, noise_sampler=noise.sampler(x))

    @staticmethod
    def _guidance_sigmas(req: Request) -> tuple[float, float]:
        """Guidance interval (lo, hi) as fractions of the steps -> (exclusive low, inclusive high) sigma bounds."""
        full = schedules.get_sigmas(req.schedule, req.steps).double()
        lo, hi = req.guidance_interval
        return float(full[min(req.steps, math.ceil(hi * req.steps))]), float(full[min(req.steps, math.ceil(lo * req.steps))])

    def _image_tensor(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        a = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return a * 2 - 1  # (3, H, W) in [-1, 1]

    def _mask_tensor(self, mask: Image.Image, width: int, height: int) -> torch.Tensor:
        if mask.size != (width, height):
            raise SDXLError(f"mask is {mask.size[0]}x{mask.size[1]} but the image is {width}x{height}; they must match")
        m = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
        return (m >= 0.5).float()[None, None]  # (1, 1, H, W), 1 = repaint

    def generate(self, req: Request, callback=None) -> Result:
        """Run a request: txt2img, img2img (init_image + strength), inpainting (+ mask), outpainting, refiner, hires fix."""
        if req.outpaint is not None:
            req = outpaint_request(req)
        req.validate(self.refiner is not None)
        if self.base.cfg.architecture in ("sdxl-base", "sdxl-inpaint") and (req.width, req.height) not in BUCKETS:
            w, h = min(BUCKETS, key=lambda b: abs(math.log(b[0] / b[1] * req.height / req.width)))
            warnings.warn(f"{req.width}x{req.height} is not one of SDXL's trained sizes; results may degrade "
                          f"(the nearest aspect ratio it was trained on: {w}x{h})")
        noise = GeneratorNoise(req.seed, req.batch)
        f = self.latent_factor
        shape = (self.vae.cfg.embed_dim, req.height // f, req.width // f)
        sigmas = schedules.get_sigmas(req.schedule, req.steps)
        extra = blend = None
        skip_first, run_base = False, True
        if req.init_latent is not None:  # refine a saved latent (draft, then refine)
            known = req.init_latent.float().to(self.device)
            if known.shape[1:] != shape:
                raise SDXLError(f"the saved latent is {tuple(known.shape)}, expected (N, {', '.join(map(str, shape))})")
            x = known = known.expand(req.batch, -1, -1, -1) if known.shape[0] == 1 else known
            if req.refiner_strength is not None:  # draft, then refine: the refiner alone (SDEdit)
                run_base = False
            else:
                sigmas = schedules.img2img_sigmas(sigmas, req.strength)
                x = known + noise.randn(shape, self.device) * sigmas[0]
        elif req.init_image is not None:
            # Draw order per image generator, as diffusers: image posterior, initial noise, masked-image posterior.
            image = self._image_tensor(req.init_image, req.width, req.height)
            mask = self._mask_tensor(req.mask, req.width, req.height) if req.mask is not None else None
            nine = mask is not None and self.base.cfg.unet.in_channels == 9
            full_strength = req.strength >= 1.0
            batch_of = lambda im: im[None].expand(req.batch, -1, -1, -1)  # noqa: E731
            known = self.encode_image(batch_of(image), noise) if not (nine and full_strength) else None
            first = noise.randn(shape, self.device)
            sigmas = schedules.img2img_sigmas(sigmas, req.strength)
            if mask is not None:
                m = F.interpolate(mask, size=shape[1:]).to(self.device)  # nearest, (1, 1, h, w)
                if nine:  # the inpainting UNet sees mask and masked-image latent as input channels
                    masked = self.encode_image(batch_of(image * (mask[0] < 0.5)), noise)
                    extra = torch.cat([m.expand(req.batch, -1, -1, -1), masked], dim=1)
                else:  # latent blending of the known region
                    blend = (1 - m, known, first)
                    skip_first = full_strength
            x = first * self._init_scale(req, sigmas) if full_strength else known + first * sigmas[0]
        else:
            x = noise.randn(shape, self.device) * self._init_scale(req, sigmas)

        steps_base = sigmas
        refine_sigmas = None
        if req.refiner_switch is not None and self.refiner is not None:
            k = self._switch_index(sigmas, req.refiner_switch)
            steps_base, refine_sigmas = sigmas[:k + 1], sigmas[k:]
        if run_base and len(steps_base) > 1:
            x = self._sample(self.base, req, x, steps_base, noise, callback, extra, blend, skip_first)
        if refine_sigmas is not None and len(refine_sigmas) > 1:
            x = self._sample(self.refiner, req, x, refine_sigmas, noise, callback, None, blend)
        if req.refiner_strength is not None and self.refiner is not None:
            rs = schedules.img2img_sigmas(schedules.get_sigmas(req.schedule, req.refiner_steps or req.steps),
                                          req.refiner_strength)
            x = self._sample(self.refiner, req, x + noise.randn(shape, self.device) * rs[0], rs, noise, callback,
                             None, blend)
        if blend is not None:  # paste the known region exactly (diffusers' last blend)
            x = x * (1 - blend[0]) + blend[1] * blend[0]
        if req.hires_scale:
            x = self._hires(req, x, noise, callback)
        if not torch.isfinite(x).all():
            raise SDXLError(f"sampling produced non-finite latents in {self.dtype} (overflow?); "
                            "retry with --dtype fp32 (or bf16)")
        return Result(x, self.to_pil(self.decode(x)))

    def _init_scale(self, req: Request, sigmas: torch.Tensor) -> float:
        """Initial noise scale sqrt(sigma_0^2 + 1): sgm's EDMSampler, ComfyUI (max_denoise) and diffusers' `leading`
        init_noise_sigma; diffusers' `trailing` uses sigma_0."""
        s = float(sigmas[0])
        return s if req.schedule == "trailing" else math.sqrt(s * s + 1)

    def _switch_index(self, sigmas: torch.Tensor, frac: float) -> int:
        """Steps whose timestep is >= round(1000 * (1 - frac)) go to the base (diffusers' denoising_end)."""
        cutoff = int(round(len(self.sigmas_train) * (1 - frac)))
        t = schedules.sigma_to_t(sigmas[:-1].float(), self.sigmas_train)
        return int((t >= cutoff).sum())

    def _hires(self, req: Request, x: torch.Tensor, noise: GeneratorNoise, callback) -> torch.Tensor:
        """A1111's hires fix: upscale (latent or pixels) then img2img at the larger size."""
        w, h = (int(round(v * req.hires_scale / 8)) * 8 for v in (req.width, req.height))
        big = replace(req, width=w, height=h, strength=req.hires_strength, hires_scale=None, init_image=None,
                      mask=None, init_latent=None, refiner_switch=None, refiner_strength=None,
                      steps=req.hires_steps or req.steps)
        if req.hires_upscale == "pixel":
            pixels = self.decode(x)
            up = F.interpolate(pixels, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
            known = self.encode_image(up * 2 - 1, noise)
        else:
            known = F.interpolate(x, size=(h // self.latent_factor, w // self.latent_factor), mode="bicubic",
                                  align_corners=False)
        sigmas = schedules.img2img_sigmas(schedules.get_sigmas(big.schedule, big.steps), big.strength)
        start = known + noise.randn(tuple(known.shape[1:]), self.device) * sigmas[0]
        return self._sample(self.base, big, start, sigmas, noise, callback)

    @staticmethod
    def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
        """(N, 3, H, W) in [0, 1] -> PIL images, rounded as diffusers' `numpy_to_pil`."""
        a = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(im) for im in a]
