"""Generation: txt2img, img2img, inpainting, base -> refiner, hires fix. One `Pipeline`, components loaded once.

The sampling path of docs/samplers.md §1: per-image seeded CPU noise, sigmas from a named schedule, a sampler over a
denoiser D(x, sigma) wrapping the UNet with the eps parameterisation and classifier-free guidance. Latents stay float32
between steps; the UNet runs in the pipeline's dtype. `Pipeline.plan` lists the sampler runs (stages) of a request;
`generate` makes the initial latent, runs the stages, pastes the known region and decodes.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import platform
import re
import timeit
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sdxl.sampling import names, schedules
from sdxl.sampling.samplers import DENOISERS, SAMPLERS, GeneratorNoise
from sdxl.models.conditioning import Conditioner, Conditioning, conditioner_config, micro_values, prompt_rows
from sdxl.errors import SDXLError
from sdxl.formats.files import write_json
from sdxl.request import Request
from sdxl.models.model import BUCKETS, SDXLModel
from sdxl.models.tokenizer import Tokenizer
from sdxl.models.unet import DeepCache


def cpu_has_fast_bf16() -> bool:
    """Whether bf16 matmuls beat float32 on this CPU (with AVX512-BF16 or AMX about 2-4x faster; without, hundreds
    of times slower), measured by `bf16_probe` once per CPU model and torch version, cached in ~/.cache/sdxl."""
    key = f"{_cpu_model()} | torch {torch.__version__}"
    path = cache_dir() / "cpu_bf16.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    if not isinstance(known.get(key), bool):
        known[key] = bf16_probe()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, known, mode="replace", indent=1)
        except (OSError, SDXLError):
            pass  # a read-only home: probe again next time
    return known[key]


def cache_dir() -> Path:
    """sdxl's per-user cache: $XDG_CACHE_HOME/sdxl or ~/.cache/sdxl."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdxl"


def _cpu_model() -> str:
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found[1].strip() if found else platform.processor() or platform.machine()


def bf16_probe(n: int = 256, reps: int = 3) -> bool:
    """A (n, n) @ (n, n) matmul timed in float32 and bf16 (best of `reps`, ~10 ms where bf16 is fast, ~0.4 s where it
    is emulated): bf16 wins when it takes under 0.8x the float32 time."""
    a = torch.randn(n, n)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = a.to(dtype)
        x @ x  # first call: kernel selection
        best[dtype] = min(timeit.repeat(lambda: x @ x, number=1, repeat=reps))
    return best[torch.bfloat16] < 0.8 * best[torch.float32]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def default_dtype(device: str | torch.device) -> torch.dtype:
    """fp16 on GPUs (bf16 where supported), bf16 on CPUs where the probe finds it faster than fp32, else fp32."""
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


@dataclass(frozen=True)
class Stage:
    """One sampler run of a generation: which model walks which sigmas, starting from what.

    `start`: "noise" (txt2img), "image" or "latent" (the init image's or a saved latent, noised to sigmas[0]), or
    "previous" (the stage before: continued by a hand-off, re-noised by SDEdit and hires). A stage of 0 steps still
    starts (hires then only upscales).
    """

    name: str  # "base", "refiner" (hand-off), "refiner-sdedit", "hires"
    model: str  # "base" | "refiner"
    sigmas: torch.Tensor  # (steps + 1,) descending, float64
    start: str  # "noise" | "image" | "latent" | "previous"

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


@dataclass(frozen=True)
class Plan:
    """The stages of a request, in the order `generate` runs them."""

    stages: tuple[Stage, ...]

    @property
    def total_steps(self) -> int:
        """What a progress bar counts: one callback per sampler step, all stages."""
        return sum(stage.steps for stage in self.stages)


@dataclass
class Result:
    latents: torch.Tensor  # (N, 4, H/8, W/8) float32, scaled (what the UNet sees, diffusers' output_type="latent")
    images: list[Image.Image]  # decoded; inpainting: the original pixels pasted outside the mask


@dataclass
class _Start:
    """The first stage's input, and what inpainting adds to the base's stages."""

    x: torch.Tensor  # (N, 4, h, w) float32
    extra: torch.Tensor | None = None  # 9-channel UNet: mask ++ masked-image latent
    blend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (keep, known latent, noise)
    skip_first_blend: bool = False


def outpaint_request(req: Request) -> Request:
    """Outpainting by padding: the init image on a larger canvas (edges extended), a mask over the new border. Pads
    are rounded up to multiples of 8; the mask reaches 8 pixels into the old image so the seam is repainted."""
    if req.init_image is None:
        raise SDXLError("outpainting needs an init image (--init-image)")
    if any(p < 0 for p in req.outpaint):
        raise SDXLError(f"outpaint pads must be >= 0, got {req.outpaint}")
    left, top, right, bottom = (-(-p // 8) * 8 for p in req.outpaint)
    image = req.init_image.convert("RGB")
    w8, h8 = image.width // 8 * 8, image.height // 8 * 8
    a = np.pad(np.asarray(image.crop((0, 0, w8, h8))), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(a.shape[:2], 255, np.uint8)
    inner = (slice(top + 8 if top else 0, top + h8 - (8 if bottom else 0)),
             slice(left + 8 if left else 0, left + w8 - (8 if right else 0)))
    mask[inner] = 0
    return replace(req, init_image=Image.fromarray(a), mask=Image.fromarray(mask), width=a.shape[1],
                   height=a.shape[0], outpaint=None, strength=1.0)


class GuidedDenoiser:
    """D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t), classifier-free guided in eps space; a v-prediction
    UNet (`prediction="v"`) through `VDenoiser`, guided in v space as diffusers does (D is affine in either).

    Guidance rescale: Lin et al. 2023, eq. 15-16 (diffusers `rescale_noise_cfg`). Guidance applies only while
    low < sigma <= high of `sigma_range` (Kynkäänniemi et al. 2024); elsewhere the conditional branch runs alone.
    Inpainting: `blend` re-noises the known region to the current sigma before each model call but the first (equal
    to diffusers' per-step blending for first-order samplers); a 9-channel UNet gets mask and masked-image latent
    as `extra` input channels instead.
    """

    def __init__(self, unet, cond: Conditioning, uncond: Conditioning | None, scale: float, rescale: float = 0.0,
                 sigma_range: tuple[float, float] = (-1.0, math.inf), extra: torch.Tensor | None = None,
                 blend: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, skip_first_blend: bool = False,
                 prediction: str = "epsilon", sigmas_train: torch.Tensor | None = None, cache=None):
        self.unet, self.cond, self.uncond = unet, cond, uncond
        # one (uncond, cond) tensor for every step: the UNet keeps the text's K/V while it sees the same tensor
        self.both = Conditioning.cat([uncond, cond]) if uncond is not None else None
        self.kw = {} if cache is None else {"cache": cache}  # DeepCache (`unet.DeepCache`): Pipeline(fast=N)
        self.scale, self.rescale, self.sigma_range = scale, rescale, sigma_range
        self.extra, self.blend, self.skip_blend = extra, blend, skip_first_blend
        self.dtype = next(unet.parameters()).dtype
        self.denoise = DENOISERS[prediction](self.eps, sigmas_train)
        self.sigmas_train = self.denoise.sigmas_train  # the timesteps of samplers that need them (tcd)

    def eps(self, x_in: torch.Tensor, t: torch.Tensor, guided: bool) -> torch.Tensor:
        """The UNet's output (eps or v) for a scaled input; with guidance, one batched call for (uncond, cond)."""
        if self.extra is not None:
            x_in = torch.cat([x_in, self.extra], dim=1)
        x_in = x_in.to(self.dtype)
        if not guided:
            return self.unet(x_in, t, self.cond.crossattn, self.cond.vector, **self.kw).float()
        both = self.both
        out = self.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), both.crossattn, both.vector, **self.kw).float()
        eps_u, eps_c = out.chunk(2)
        eps = eps_u + self.scale * (eps_c - eps_u)
        if self.rescale > 0:
            dims = list(range(1, eps.ndim))
            rescaled = eps * (eps_c.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
            eps = self.rescale * rescaled + (1 - self.rescale) * eps
        return eps

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.blend is not None and not self.skip_blend:
            keep, known, noise = self.blend  # keep = 1 where the image is kept
            x = x * (1 - keep) + (known + noise * sigma.view(-1, 1, 1, 1)) * keep
        self.skip_blend = False
        guided = (self.uncond is not None and self.scale != 1.0
                  and self.sigma_range[0] < float(sigma.max()) <= self.sigma_range[1] * (1 + 1e-6))
        return self.denoise(x, sigma.float(), guided=guided)


def with_base_text_encoder(refiner: SDXLModel, base: SDXLModel, name: str = "refiner") -> SDXLModel:
    """A UNet-only refiner file gets the base's bigG encoder (shared, not copied), with the refiner's
    micro-conditioning. The official refiner's bigG equals the base's; diffusers' docs share it the same way."""
    bigg, unet = base.conditioner.bigg, refiner.unet.cfg
    cfg = conditioner_config(None, bigg.cfg, unet.adm_in_channels)
    if unet.context_dim != bigg.cfg.width or cfg.vector_dim != unet.adm_in_channels:
        raise SDXLError(f"{name}: a UNet-only refiner (context {unet.context_dim}, vector {unet.adm_in_channels}) "
                        f"does not fit the base's bigG encoder (width {bigg.cfg.width}, pooled {bigg.cfg.proj_dim}) "
                        "with the refiner's micro-conditioning; pass a refiner file with its own text encoder")
    return SDXLModel.from_parts(unet=refiner.unet, conditioner=Conditioner.from_parts(cfg, bigg), like=refiner.cfg)


def own_copy(module: nn.Module, device, dtype: torch.dtype, memo: dict | None = None) -> nn.Module:
    """`module` on device/dtype, in eval mode, without gradients, leaving the given module as it was. Tensors already
    on that device and dtype are shared, not copied; one `memo` across calls keeps shared modules shared (a refiner
    with the base's bigG)."""
    memo = {} if memo is None else memo
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in memo:
            v = t.detach().to(device, dtype if t.is_floating_point() else t.dtype)
            memo[id(t)] = nn.Parameter(v, requires_grad=False) if isinstance(t, nn.Parameter) else v
    return copy.deepcopy(module, memo).eval()


def _for_inference(model: SDXLModel, channels_last: bool) -> SDXLModel:
    """In place: the UNet's q/k/v fused (`UNet.fuse_qkv`); if asked, the UNet's and VAE's 4-d weights channels-last,
    but for weights not loaded yet (`checkpoint.placeholder`)."""
    parts = model.components()
    cl = torch.channels_last
    for name in ("unet", "vae") if channels_last else ():
        if name in parts:
            parts[name]._apply(lambda t: t if t.ndim != 4 or not any(t.stride()) else t.contiguous(memory_format=cl))
    if "unet" in parts:
        parts["unet"].fuse_qkv()
    return model


def _pixels(image: Image.Image, mode: str, width: int, height: int) -> torch.Tensor:
    """An init image or its mask in `mode` ("RGB", "L") at the output size, both resized alike (Lanczos): (H, W[, 3])
    in [0, 1]."""
    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _finite(out) -> bool:
    """A VAE output (pixels, or a posterior's mean and log-variance) holds no NaN/Inf."""
    tensors = (out.mean, out.logvar) if hasattr(out, "logvar") else (out,)
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def blur_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A1111's `mask_blur` (modules/processing.py): a Gaussian of standard deviation `radius` pixels over a kernel
    2 * int(2.5 * radius + 0.5) + 1 wide, as its cv2.GaussianBlur, edges replicated; (1, 1, H, W). Pixels farther
    than the kernel's half width outside the mask stay exactly 0."""
    if radius == 0:
        return mask
    half = int(2.5 * radius + 0.5)
    x = torch.arange(-half, half + 1, dtype=torch.float64)
    k = torch.exp(-x * x / (2 * radius * radius))
    k = (k / k.sum()).to(mask.dtype)
    mask = F.conv2d(F.pad(mask, (half, half, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))  # rows
    return F.conv2d(F.pad(mask, (0, 0, half, half), mode="replicate"), k.view(1, 1, -1, 1))  # columns


def non_finite_error(what: str, dtype: torch.dtype) -> SDXLError:
    """One line for NaN/Inf: in fp16/bf16 an overflow (advise float32), in float32 broken weights or inputs."""
    if dtype == torch.float32:
        return SDXLError(f"{what} gave non-finite values (NaN/Inf) even in float32: the model's weights or the "
                         "input (init image, saved latent) hold NaN/Inf; check the checkpoint files")
    return SDXLError(f"{what} gave non-finite values (NaN/Inf) in {dtype} (overflow?); retry with --dtype fp32")


class Pipeline:
    """Base (and optional refiner) SDXL models, loaded once, with their tokenizers; see `generate`.

    The pipeline works on its own copies of the given modules (tensors shared where device and dtype already match):
    the caller's models keep their dtype, mode, requires_grad and memory format. Speed: `fast` N > 1 reuses the
    UNet's deep features N-1 calls in N (DeepCache; `unet.DeepCache`, quality cost in bench/RESULTS.md); `compile`
    compiles each UNet with torch.compile (the first call compiles; inductor's cache in ~/.cache/sdxl/inductor makes
    later processes faster), `compile_seconds` sums the time spent compiling.
    """

    def __init__(self, base: SDXLModel, refiner: SDXLModel | None = None, device="cpu", dtype=torch.bfloat16,
                 vae_dtype: torch.dtype | None = None, tokenizer: Tokenizer | None = None, channels_last: bool = True,
                 vae_tiling: bool | None = None, vae_band: int = 64 << 20, fast: int = 0, compile: bool = False):
        self.device, self.dtype, self.vae_tiling, self.vae_band = torch.device(device), dtype, vae_tiling, vae_band
        self.fast, self.compiled = fast, compile
        self.vae_dtype = vae_dtype or dtype
        self.tokenizer = tokenizer or Tokenizer.default()
        memo = {}
        self.base = self._own(base, memo, channels_last)
        self.refiner = self._own(refiner, memo, channels_last, ("unet", "conditioner")) if refiner is not None else None
        self.vae = self.base.vae
        self.scaling_factor = self.vae.cfg.scaling_factor
        self.latent_factor = self.vae.factor  # 8 for SDXL
        if compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
            for m in (self.base, self.refiner):
                if m is not None:
                    m.unet.compile()

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling in this process so far (torch.compile's own count; 0 without `compile`)."""
        if not self.compiled:
            return 0.0
        from torch._dynamo.utils import compilation_time_metrics

        return sum(compilation_time_metrics.get("_compile.compile_inner", []))

    def _own(self, m: SDXLModel, memo: dict, channels_last: bool, names=("unet", "conditioner", "vae")) -> SDXLModel:
        """The pipeline's copy of a model: UNet and text encoders in `dtype`, the VAE in `vae_dtype`."""
        parts = {name: own_copy(part, self.device, self.vae_dtype if name == "vae" else self.dtype, memo)
                 for name, part in m.components().items() if name in names}
        return _for_inference(SDXLModel.from_parts(**parts, like=m.cfg), channels_last)

    @classmethod
    def load(cls, model, refiner=None, vae=None, device="cpu", dtype=torch.bfloat16, channels_last: bool = True,
             unet=None, memory=None, **kw) -> "Pipeline":
        """`unet`: a UNet-only file for the base's UNet; `memory`: an `sdxl.memory.Plan` (what is loaded when);
        None: everything, once."""
        from sdxl.formats.checkpoint import load

        lazy = memory.lazy if memory is not None else lambda path: ()
        base = load(model, device, dtype, vae_path=vae, require=("unet", "conditioner", "vae"), unet_path=unet,
                    channels_last=channels_last, lazy=lazy(model))
        ref = load(refiner, device, dtype, components=("unet", "conditioner"), channels_last=channels_last,
                   lazy=lazy(refiner)) if refiner else None
        if ref is not None and "conditioner" not in ref.components():
            ref = with_base_text_encoder(ref, base, str(refiner))
        for m in (base, ref):  # ours: prepared in place, so that the Pipeline shares them instead of copying
            if m is not None:
                _for_inference(m, channels_last)
        if memory is not None and kw.get("vae_tiling") is None:
            kw["vae_tiling"] = memory.vae_tiling
        pipe = cls(base, ref, device, dtype, channels_last=channels_last, **kw)
        if memory is not None:
            from sdxl.memory import attach

            pipe.memory = attach(pipe, memory, model, refiner)
        return pipe

    # --- conditioning ------------------------------------------------------------------------

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
        from sdxl.adapters.tags import lora_free  # A1111's <lora:...> tags are for `use_loras`, not the encoders

        prompts = prompt_rows(lora_free(req.prompt), req.prompt_2, req.batch)
        negatives = prompt_rows(req.negative_prompt, req.negative_prompt_2, req.batch) if req.cfg != 1.0 else None
        return model.conditioner.guided(self.tokenizer, prompts, self.micro(req, False), negatives,
                                        self.micro(req, True))

    # --- images <-> latents ------------------------------------------------------------------

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, noise: GeneratorNoise) -> torch.Tensor:
        """Pixels (N, 3, H, W) in [-1, 1] -> scaled latents, sampled from the posterior with each image's generator."""
        dist = self._vae("encode", images.to(self.device, self.vae_dtype))
        eps = noise.randn(tuple(dist.mean.shape[1:]), self.device)
        return (dist.mean.float() + dist.std.float() * eps) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [0, 1]."""
        z = (latents / self.scaling_factor).to(self.device, self.vae_dtype)
        if self.vae_dtype != torch.float32:
            z = z.contiguous(memory_format=torch.channels_last)
        pixels = (self._vae("decode", z).float() / 2 + 0.5).clamp(0, 1)
        flat = [i for i, im in enumerate(pixels) if float(im.amax() - im.amin()) < 1 / 255]
        if flat:  # e.g. a VAE whose weights saturate every pixel: finite, yet no image
            warnings.warn(f"image(s) {', '.join(map(str, flat))} of the batch decoded to one flat colour; the VAE "
                          "weights or the latents are likely broken (check --vae / the checkpoint)")
        return pixels

    AUTO_TILING_PIXELS = 1024 * 1024  # pixels of the batch from which vae_tiling=None bands

    def _vae(self, method: str, x: torch.Tensor):
        """The VAE's `encode` or `decode`; in row bands of `vae_band` bytes (`AutoencoderKL.decode`: the same image
        at a lower peak, bench/RESULTS.md) when tiling is on, or None and the batch has AUTO_TILING_PIXELS or more.
        Non-finite output (fp16/bf16 overflow) is retried on a float32 copy of the VAE: NaN never reaches an image."""
        pixels = x[:, 0].numel() * (self.latent_factor ** 2 if method == "decode" else 1)
        tiled = self.vae_tiling or self.vae_tiling is None and pixels >= self.AUTO_TILING_PIXELS
        band = self.vae_band if tiled else None
        out = getattr(self.vae, method)(x, band)
        if not _finite(out) and self.vae_dtype != torch.float32:
            warnings.warn(f"VAE {method} in {self.vae_dtype} gave non-finite values; retrying in float32")
            out = getattr(own_copy(self.vae, self.device, torch.float32), method)(x.float(), band)
        if not _finite(out):
            raise non_finite_error(f"the VAE ({method})", torch.float32)
        return out

    @staticmethod
    def _mask_tensor(req: Request, width: int, height: int) -> torch.Tensor:
        """(1, 1, H, W) in [0, 1], 1 = repaint: the mask through its image's resize, grey levels (its blur) kept."""
        return _pixels(req.mask, "L", width, height)[None, None]

    def _overlay(self, req: Request, pixels: torch.Tensor) -> torch.Tensor:
        """Inpainting: the original pixels outside the mask, blended by the mask's grey levels, over the decoded
        image (A1111's `apply_overlay`, diffusers' `VaeImageProcessor.apply_overlay`): the VAE round trip does
        not shift what was kept."""
        if req.mask is None:
            return pixels
        h, w = pixels.shape[-2:]
        image = _pixels(req.init_image, "RGB", w, h).permute(2, 0, 1)[None]
        m = blur_mask(self._mask_tensor(req, w, h), req.mask_blur).to(pixels)
        return pixels * m + image.to(pixels) * (1 - m)

    # --- the plan ----------------------------------------------------------------------------

    def plan(self, req: Request) -> Plan:
        """The stages `generate` runs for a request: base (split at a refiner hand-off), refiner SDEdit, hires."""
        if req.outpaint is not None:
            req = outpaint_request(req)
        first = "latent" if req.init_latent is not None else "image" if req.init_image is not None else "noise"
        prediction, ztsnr = self._sampling(req)
        stages, table = [], schedules.discrete_sigmas(zero_terminal_snr=ztsnr)
        if (prediction, ztsnr) == ("epsilon", True):  # eps at the last noise level is no image (Lin et al. 2024 §3.1)
            warnings.warn("zero terminal SNR with an epsilon-prediction UNet gives noise: it needs v-prediction (Lin "
                          "et al. 2024); use --prediction v for a v-prediction model, else --no-zero-terminal-snr")

        def tail(steps: int, strength: float) -> torch.Tensor:  # the schedule's last `strength` (img2img, SDEdit)
            return schedules.img2img_sigmas(schedules.get_sigmas(req.schedule, steps, table), strength)

        if req.init_latent is None or req.refiner_strength is None:  # a saved latent with a refiner strength: no base
            sigmas = tail(req.steps, req.strength if first != "noise" else 1.0)
            if req.refiner_switch is None:
                stages.append(Stage("base", "base", sigmas, first))
            else:
                k = self._switch_index(sigmas, req.refiner_switch, table)
                stages += [Stage("base", "base", sigmas[:k + 1], first),
                           Stage("refiner", "refiner", sigmas[k:], "previous")]
        if req.refiner_strength is not None:
            stages.append(Stage("refiner-sdedit", "refiner", tail(req.refiner_steps or req.steps, req.refiner_strength),
                                "previous" if stages else first))
        if req.hires_scale:
            stages.append(Stage("hires", "base", tail(req.hires_steps or req.steps, req.hires_strength), "previous"))
        return Plan(tuple(stages))

    def _sampling(self, req: Request, model: SDXLModel | None = None) -> tuple[str, bool]:
        """(prediction, zero terminal SNR) of `model` (default: the base): the request's flags where set (they describe
        the base only), else its checkpoint's."""
        model = model or self.base
        own = model is self.base
        prediction = (req.prediction if own else None) or model.cfg.prediction
        ztsnr = req.zero_terminal_snr if own and req.zero_terminal_snr is not None else model.cfg.zero_terminal_snr
        return prediction, bool(ztsnr)

    @staticmethod
    def _switch_index(sigmas: torch.Tensor, frac: float, table: torch.Tensor) -> int:
        """Steps whose timestep is >= round(1000 * (1 - frac)) go to the base (diffusers' denoising_end)."""
        cutoff = int(round(len(table) * (1 - frac)))
        t = schedules.sigma_to_t(sigmas[:-1].float(), table)
        return int((t >= cutoff).sum())

    # --- generation --------------------------------------------------------------------------

    def generate(self, req: Request, callback=None, embeddings: dict | None = None) -> Result:
        """Run a request: txt2img, img2img (init_image + strength), inpainting (+ mask), outpainting, refiner, hires.

        `callback` gets k-diffusion's step dict once per sampler step, `plan(req).total_steps` times in all.
        `embeddings`: {"base" and/or "refiner": the (cond, uncond) pair `conditioning(model, req)` returns}, used
        instead of encoding the prompt (encode once, generate many); hires gets its own size's micro-conditioning.
        """
        req = self._checked(req)
        embeddings = self._checked_embeddings(req, embeddings or {})
        plan = self.plan(req)
        noise = GeneratorNoise(range(req.seed, req.seed + req.batch))
        start = self._initial(req, plan.stages[0], noise)
        x = start.x
        denoising = [s for s in plan.stages if s.name != "hires"]
        for stage in denoising:
            x = self._run_stage(req, stage, x, start, noise, callback, embeddings)
        if start.blend is not None:  # paste the known region exactly (diffusers' last blend)
            keep, known, _ = start.blend
            x = x * (1 - keep) + known * keep
        for stage in plan.stages[len(denoising):]:
            x = self._run_stage(req, stage, x, start, noise, callback, embeddings)
        return Result(x, self.to_pil(self._overlay(req, self.decode(x))))

    def _checked(self, req: Request) -> Request:
        """The request as run: outpainting turned into inpainting, validated, an off-bucket size warned about."""
        if req.outpaint is not None:
            req = outpaint_request(req)
        req.validate(self.refiner is not None)
        if self.base.cfg.architecture in ("sdxl-base", "sdxl-inpaint") and (req.width, req.height) not in BUCKETS:
            w, h = min(BUCKETS, key=lambda b: abs(math.log(b[0] / b[1] * req.height / req.width)))
            warnings.warn(f"{req.width}x{req.height} is not one of SDXL's trained sizes; results may degrade "
                          f"(the nearest aspect ratio it was trained on: {w}x{h})")
        return req

    def _checked_embeddings(self, req: Request, embeddings: dict) -> dict:
        """`generate`'s (cond, uncond) pairs, checked against the request and each model's shapes (one-line
        SDXLErrors) and moved to the pipeline's device and the UNet's dtype."""
        models = {"base": self.base, "refiner": self.refiner}
        out = {}
        for name, pair in embeddings.items():
            if models.get(name) is None:
                known = " or ".join(repr(k) for k, m in models.items() if m is not None)
                raise SDXLError(f"embeddings: {name!r} is not a model of this pipeline; give {known}")
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], Conditioning)
                    and (pair[1] is None or isinstance(pair[1], Conditioning))):
                raise SDXLError(f"embeddings[{name!r}]: expected the (cond, uncond) pair that Pipeline.conditioning "
                                "returns")
            unet = models[name].unet
            tokens = pair[0].crossattn.shape[1] if pair[0].crossattn.ndim == 3 else 0
            want = ((req.batch, tokens, unet.cfg.context_dim), (req.batch, unet.cfg.adm_in_channels))
            for what, c in zip(("cond", "uncond"), pair):
                if c is None and req.cfg == 1.0:  # no guidance: no uncond needed
                    continue
                got = None if c is None else (tuple(c.crossattn.shape), tuple(c.vector.shape))
                if got != want or tokens == 0 or tokens % 77:
                    raise SDXLError(f"embeddings[{name!r}]: {what} crossattn and vector are {got}, expected {want} "
                                    f"with 77 * windows tokens for batch {req.batch} (cfg {req.cfg}); pass "
                                    "Pipeline.conditioning(model, request) of this request")
                if not (torch.isfinite(c.crossattn).all() and torch.isfinite(c.vector).all()):
                    raise SDXLError(f"embeddings[{name!r}]: {what} holds non-finite values (NaN/Inf)")
            dtype = next(unet.parameters()).dtype
            out[name] = tuple(None if c is None else Conditioning(c.crossattn.to(self.device, dtype),
                                                                  c.vector.to(self.device, dtype)) for c in pair)
        return out

    def _conditioning(self, model: SDXLModel, req: Request, embeddings: dict,
                      resized: bool = False) -> tuple[Conditioning, Conditioning | None]:
        """The given embeddings of this model, else the prompt encoded; `resized` (hires): the given pooled text
        embedding with the micro-conditioning of `req`'s size."""
        pair = embeddings.get("base" if model is self.base else "refiner")
        if pair is None:
            return self.conditioning(model, req)
        if not resized:
            return pair
        pooled = model.conditioner.cfg.bigg.proj_dim  # vector = pooled ++ Fourier(micro) (`Conditioner.forward`)
        return tuple(None if c is None else model.conditioner(c.crossattn, c.vector[:, :pooled], self.micro(req, neg))
                     for c, neg in zip(pair, (False, True)))

    def _initial(self, req: Request, first: Stage, noise: GeneratorNoise) -> _Start:
        """The first stage's input: scaled noise, or a saved latent or the init image noised to its first sigma."""
        shape = (self.vae.cfg.embed_dim, req.height // self.latent_factor, req.width // self.latent_factor)
        if req.init_latent is not None:
            known = req.init_latent.float().to(self.device)
            if known.shape[1:] != shape:
                raise SDXLError(f"the saved latent is {tuple(known.shape)}, expected (N, {', '.join(map(str, shape))})")
            known = known.expand(req.batch, -1, -1, -1) if known.shape[0] == 1 else known
            return _Start(self._noised(known, first.sigmas[0], noise))
        if req.init_image is not None:
            return self._from_image(req, first, noise, shape)
        return _Start(noise.randn(shape, self.device) * self._init_scale(req, first.sigmas))

    def _from_image(self, req: Request, first: Stage, noise: GeneratorNoise, shape: tuple[int, int, int]) -> _Start:
        """img2img and inpainting from latents of `shape`. Draws per image generator, as diffusers: image posterior,
        initial noise, masked-image posterior."""
        image = _pixels(req.init_image, "RGB", req.width, req.height).permute(2, 0, 1) * 2 - 1  # (3, H, W) in [-1, 1]
        mask = None if req.mask is None else (self._mask_tensor(req, req.width, req.height) >= 0.5).float()
        nine = mask is not None and self.base.cfg.unet.in_channels == 9
        full_strength = req.strength >= 1.0
        images = image[None].expand(req.batch, -1, -1, -1)
        known = self.encode_image(images, noise) if not (nine and full_strength) else None
        first_noise = noise.randn(shape, self.device)
        x = (first_noise * self._init_scale(req, first.sigmas) if full_strength
             else known + first_noise * first.sigmas[0])
        if mask is None:
            return _Start(x)
        m = F.interpolate(mask, size=shape[1:]).to(self.device)  # nearest, (1, 1, h, w)
        if nine:  # the inpainting UNet sees mask and masked-image latent as input channels
            masked = self.encode_image(images * (mask < 0.5), noise)
            return _Start(x, extra=torch.cat([m.expand(req.batch, -1, -1, -1), masked], dim=1))
        return _Start(x, blend=(1 - m, known, first_noise), skip_first_blend=full_strength)  # latent blending

    def _noised(self, x: torch.Tensor, sigma: torch.Tensor, noise: GeneratorNoise) -> torch.Tensor:
        """x plus each image's next noise draw at `sigma` (img2img, SDEdit, hires)."""
        return x + noise.randn(tuple(x.shape[1:]), self.device) * sigma

    def _init_scale(self, req: Request, sigmas: torch.Tensor) -> float:
        """Initial noise scale sqrt(sigma_0^2 + 1): sgm's EDMSampler, ComfyUI (max_denoise) and diffusers' `leading`
        init_noise_sigma; diffusers' `trailing` uses sigma_0."""
        s = float(sigmas[0])
        return s if req.schedule == "trailing" else math.sqrt(s * s + 1)

    def _run_stage(self, req: Request, stage: Stage, x: torch.Tensor, start: _Start, noise: GeneratorNoise,
                   callback, embeddings: dict) -> torch.Tensor:
        """One stage from the previous result `x`; hires first upscales it, hires and a refiner SDEdit re-noise it to
        their first sigma. Inpainting's blend applies to base and refiner, its extra channels to the base."""
        hires, on_base = stage.name == "hires", stage.name == "base"
        if hires:
            req, x = self._upscaled(req, x, noise)
        if hires or stage.name == "refiner-sdedit" and stage.start == "previous":
            x = self._noised(x, stage.sigmas[0], noise)
        if stage.steps == 0:
            return x
        model = self.base if stage.model == "base" else self.refiner
        cond, uncond = self._conditioning(model, req, embeddings, resized=hires)
        prediction, ztsnr = self._sampling(req, model)
        table = schedules.discrete_sigmas(zero_terminal_snr=ztsnr)
        denoiser = GuidedDenoiser(model.unet, cond, uncond, req.cfg, req.guidance_rescale,
                                  self._guidance_sigmas(req, table), extra=start.extra if on_base else None,
                                  blend=None if hires else start.blend,
                                  skip_first_blend=on_base and start.skip_first_blend, prediction=prediction,
                                  sigmas_train=table, cache=DeepCache(self.fast) if self.fast > 1 else None)
        eta = {names.noise_parameter(req.sampler): req.eta} if req.eta is not None else {}
        with torch.no_grad():
            x = SAMPLERS[req.sampler](denoiser, x, stage.sigmas.to(x.device), callback=callback,
                                      noise_sampler=noise.sampler(x), **eta)
        if not torch.isfinite(x).all():  # before a later stage or the VAE runs on it
            raise self._sampling_error(model)
        return x

    def _upscaled(self, req: Request, x: torch.Tensor, noise: GeneratorNoise) -> tuple[Request, torch.Tensor]:
        """A1111's hires fix: the request at the larger size (img2img at hires_strength), x upscaled to it."""
        w, h = req.hires_size
        big = replace(req, width=w, height=h, strength=req.hires_strength, hires_scale=None, init_image=None,
                      mask=None, init_latent=None, refiner_switch=None, refiner_strength=None,
                      steps=req.hires_steps or req.steps)
        if req.hires_upscale == "pixel":
            up = F.interpolate(self.decode(x), size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
            return big, self.encode_image(up * 2 - 1, noise)
        f = self.latent_factor
        return big, F.interpolate(x, size=(h // f, w // f), mode="bicubic", align_corners=False)

    def _sampling_error(self, model: SDXLModel) -> SDXLError:
        """Why sampling gave NaN/Inf: a damaged UNet weight, the LoRAs on it, else the dtype (`non_finite_error`)."""
        from sdxl.adapters.apply import non_finite_cause

        if self.dtype != torch.float32 and (bad := next(  # not an overflow of the dtype: the file's fault
                (n for n, p in model.unet.named_parameters() if not bool(torch.isfinite(p).all())), None)):
            return SDXLError(f"sampling gave non-finite values (NaN/Inf): the UNet's weight {bad} holds NaN/Inf; "
                             "the checkpoint (or --unet) file is damaged: re-download or re-save it")
        return non_finite_cause(model, "sampling") or non_finite_error("sampling", self.dtype)

    @staticmethod
    def _guidance_sigmas(req: Request, table: torch.Tensor) -> tuple[float, float]:
        """Guidance interval (lo, hi) as fractions of the steps -> (exclusive low, inclusive high) sigma bounds."""
        full = schedules.get_sigmas(req.schedule, req.steps, table).double()
        lo, hi = (float(full[min(req.steps, math.ceil(f * req.steps))]) for f in req.guidance_interval)
        return hi, lo  # sigmas fall as steps pass

    @staticmethod
    def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
        """(N, 3, H, W) in [0, 1] -> PIL images, rounded as diffusers' `numpy_to_pil`."""
        a = (pixels.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        return [Image.fromarray(im) for im in a]
