"""The live preview: a running job's latent as a small RGB image, right for the loaded model's VAE.

For the SDXL VAE's configuration, a linear map with the published factors (ComfyUI's latent previews). Any other
VAE (the embedded default model's own): decoded by the VAE itself while the latent is small (a 16x16 latent costs
the default model's VAE ~30 ms on one CPU thread), else a linear map fitted once per VAE by least squares (smooth
random colour fields encoded, decoded, each latent pixel matched to the mean colour it decodes to). A linear map
is a poor fit for the default model's VAE: the best one, fitted on its own finished latents, still errs by 0.20
(mean absolute, colours in [0, 1]), so small latents are decoded.
"""

from __future__ import annotations

import io
import weakref

import torch
import torch.nn.functional as F

from sdxl.models.vae import SDXL_VAE

# SDXL latent -> RGB in [-1, 1], a linear fit (ComfyUI comfy/latent_formats.py, SDXL.latent_rgb_factors and bias)
SDXL_LATENT_RGB = ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362),
                   (-0.3165, -0.2492, -0.2188))
SDXL_LATENT_RGB_BIAS = (0.1084, -0.0175, -0.0011)
FIT_IMAGES, FIT_SIDE = 16, 64  # colour fields the fit decodes (pixels a side)
DECODE_MAX = 32 * 32  # latent pixels a preview is decoded up to (a VAE other than SDXL's)
_fitted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # VAE -> (weight (C, 3), bias (3,))


def sdxl_projection() -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's published factors as a map to [0, 1]: (x @ W + b + 1) / 2."""
    return torch.tensor(SDXL_LATENT_RGB) / 2, (torch.tensor(SDXL_LATENT_RGB_BIAS) + 1) / 2


def projection(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (C, 3), bias (3,)) taking a pipeline's scaled latents to RGB in [0, 1], on the CPU in float32;
    fitted once per VAE."""
    if pipe.vae.cfg == SDXL_VAE:
        return sdxl_projection()
    if pipe.vae not in _fitted:
        _fitted[pipe.vae] = fit(pipe)
    return _fitted[pipe.vae]


@torch.no_grad()
def fit(pipe, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares [latent, 1] -> mean decoded colour per latent pixel, over smooth random colour fields."""
    g = torch.Generator().manual_seed(seed)
    f = pipe.latent_factor
    fields = torch.rand(FIT_IMAGES, 3, 4, 4, generator=g) * 2 - 1
    images = F.interpolate(fields, size=(FIT_SIDE, FIT_SIDE), mode="bicubic", align_corners=False).clamp(-1, 1)
    z = pipe.vae.encode(images.to(pipe.device, pipe.vae_dtype)).mean.float() * pipe.scaling_factor
    target = F.avg_pool2d(pipe.decode(z).float().cpu(), f)  # (N, 3, h, w) in [0, 1]
    x = z.cpu().permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N*h*w, C)
    a = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    solution = torch.linalg.lstsq(a, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution  # (C + 1, 3)
    return solution[:-1].contiguous(), solution[-1].contiguous()


def preview_rgb(latent: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One scaled latent (C, h, w) -> RGB (h, w, 3) in [0, 1]."""
    return (torch.einsum("chw,cr->hwr", latent.float().cpu(), weight) + bias).clamp(0, 1)


def renderer(pipe):
    """latent (C, h, w) -> preview PNG bytes for a pipeline's latents, called by the worker (a fit runs at the
    first latent too large to decode)."""
    decode = pipe.vae.cfg != SDXL_VAE

    def render(latent: torch.Tensor) -> bytes:
        if decode and latent.shape[-2] * latent.shape[-1] <= DECODE_MAX:
            with torch.no_grad():
                rgb = pipe.decode(latent[None])[0].permute(1, 2, 0).float().cpu()
        else:
            rgb = preview_rgb(latent, *projection(pipe))
        return png_bytes(rgb)

    return render


def png_bytes(rgb: torch.Tensor) -> bytes:
    """RGB (h, w, 3) in [0, 1] as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb.mul(255).round().byte().numpy()).save(buf, format="PNG")
    return buf.getvalue()
