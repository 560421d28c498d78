"""Noise schedules: functions that return the descending sigmas a sampler walks, ending in 0.

SDXL was trained as a discrete DDPM (1000 steps, scaled-linear betas, eps prediction); in sigma form (k-diffusion/EDM,
docs/samplers.md §1) timestep t has noise level `sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`. A schedule picks
`steps` of those levels (or levels in between) and appends 0. Names: `sgm` is the reference code's, `leading` and
`trailing` diffusers' spacings, `karras`, `exponential`, `sgm_uniform`, `simple`, `ddim_uniform` k-diffusion's and
ComfyUI's (docs/samplers.md compares them). Schedules are float64 CPU tensors; samplers read them as Python floats.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

SCHEDULES = ("sgm", "leading", "trailing", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform")


# alphabar at the last timestep of a zero-terminal-SNR schedule, where it is 0 (sigma infinite): diffusers'
# EulerDiscreteScheduler puts 2^-24 there (sigma 4096); ComfyUI's `rescale_zero_terminal_snr_sigmas` 4.9e-8
ZERO_SNR_ALPHABAR = 2.0**-24


def discrete_sigmas(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                    zero_terminal_snr: bool = False) -> Tensor:
    """Ascending sigmas (num_train_timesteps,) of the scaled-linear DDPM (sgm `LegacyDDPMDiscretization`), float64.

    `zero_terminal_snr`: sqrt(alphabar) shifted to 0 at the last timestep and scaled to keep the first (Lin et al.
    2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1); the last sigma, infinite,
    is `ZERO_SNR_ALPHABAR`'s, as diffusers' `EulerDiscreteScheduler(rescale_betas_zero_snr=True)`.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        root = alphas_cumprod.sqrt()
        root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
        alphas_cumprod = torch.cat([root[:-1] ** 2, root.new_full((1,), ZERO_SNR_ALPHABAR)])
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_t(sigma: Tensor, sigmas_train: Tensor) -> Tensor:
    """Index of the nearest training sigma, as sgm's `DiscreteDenoiser.sigma_to_idx` (distance in sigma)."""
    table = sigmas_train.to(sigma.device, sigma.dtype)
    return (sigma.reshape(-1, 1) - table).abs().argmin(dim=1).reshape(sigma.shape).to(sigma.dtype)


def sigma_to_t_interp(sigma: Tensor, sigmas_train: Tensor) -> Tensor:
    """Fractional timestep by linear interpolation in log sigma (k-diffusion `sigma_to_t`, diffusers `_sigma_to_t`)."""
    log_table = sigmas_train.to(sigma.device, sigma.dtype).log()
    log_sigma = sigma.clamp_min(1e-10).log()
    low = (torch.searchsorted(log_table, log_sigma.reshape(-1), right=True) - 1).clamp(0, len(log_table) - 2)
    w = ((log_sigma.reshape(-1) - log_table[low]) / (log_table[low + 1] - log_table[low])).clamp(0, 1)
    return (low + w).reshape(sigma.shape)


def t_to_sigma(t: Tensor, sigmas_train: Tensor) -> Tensor:
    """Sigma at a fractional timestep, interpolating log sigma (k-diffusion `t_to_sigma`, ComfyUI `sigma`)."""
    log_table = sigmas_train.to(torch.float64).log()
    t = t.to(torch.float64).clamp(0, len(log_table) - 1)
    low, high = t.floor().long(), t.ceil().long()
    w = t - low
    return ((1 - w) * log_table[low] + w * log_table[high]).exp()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) eq. 5: sigmas evenly spaced in sigma^(1/rho), then 0 (k-diffusion `get_sigmas_karras`)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    inv_max, inv_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero((inv_max + ramp * (inv_min - inv_max)) ** rho)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sigmas evenly spaced in log sigma, then 0 (k-diffusion `get_sigmas_exponential`)."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


# Schedules that pick `steps` of the n training timesteps: name -> (n, steps) -> timesteps, highest first
_PICKS = {
    # sgm LegacyDDPMDiscretization: linspace(n-1, 0, steps, endpoint=False) floored, starts at n-1
    "sgm": lambda n, steps: np.linspace(n - 1, 0, steps, endpoint=False).astype(np.int64),
    # diffusers: arange(steps) * (n // steps), reversed, + steps_offset (1 in SDXL's scheduler config)
    "leading": lambda n, steps: (np.arange(steps) * (n // steps))[::-1] + 1,
    # diffusers: arange(n, 0, -n / steps).round() - 1; numpy's arange can yield steps + 1 values, we keep steps
    "trailing": lambda n, steps: np.arange(n, 0, -n / steps)[:steps].round().astype(np.int64) - 1,
    # ComfyUI simple_scheduler: every (n / steps)-th training sigma from the top
    "simple": lambda n, steps: np.array([n - 1 - int(i * (n / steps)) for i in range(steps)]),
    # ComfyUI ddim_scheduler / ldm make_ddim_timesteps: 1, 1 + c, 1 + 2c, ... with c = n // steps; those
    # produce more than `steps` levels when steps does not divide n, we keep the lowest `steps` (= `leading`)
    "ddim_uniform": lambda n, steps: (1 + np.arange(steps) * (n // steps))[::-1],
}


def get_sigmas(name: str, steps: int, sigmas_train: Tensor | None = None) -> Tensor:
    """Descending sigmas (steps + 1,) of the named schedule, last element 0; see the module docstring."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid schedules: {', '.join(SCHEDULES)}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sigmas_train = discrete_sigmas() if sigmas_train is None else sigmas_train.to(torch.float64).cpu()
    n = len(sigmas_train)  # 1000 training timesteps
    if name in _PICKS:
        most = n - 1 if name in ("leading", "ddim_uniform") else n
        if steps > most:
            raise ValueError(f"schedule {name!r} picks distinct training timesteps, so at most {most} steps; "
                             "use karras, exponential or sgm_uniform for more")
        return _append_zero(sigmas_train[torch.tensor(_PICKS[name](n, steps).tolist(), dtype=torch.long)])
    if name == "sgm_uniform":
        # ComfyUI normal_scheduler(sgm=True): fractional timesteps linspace(n-1, 0, steps + 1)[:-1]
        return _append_zero(t_to_sigma(torch.linspace(n - 1, 0, steps + 1, dtype=torch.float64)[:-1], sigmas_train))
    spaced = karras_sigmas if name == "karras" else exponential_sigmas
    return spaced(steps, sigmas_train[0].item(), sigmas_train[-1].item())


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """Tail of a schedule for img2img/SDEdit: the last int(steps * strength) steps, at least 1 if strength > 0 (where
    diffusers' SDXL img2img `get_timesteps` raises), strength 0: `[0]`. The caller noises the latent to `tail[0]`."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    steps = len(sigmas) - 1
    if strength == 0.0:
        return sigmas[-1:]
    keep = max(min(int(steps * strength), steps), 1)
    return sigmas[steps - keep :]


def _append_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])
