"""Samplers as pure functions over a denoiser, in k-diffusion's style.

Every sampler is `sample_<name>(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, **opts) -> x`:
`model(x, sigma_batch, **extra_args)` returns the denoised x0 (D in Karras et al. 2022), `x` starts at noise level
`sigmas[0]` (pure noise: `noise * sigmas[0]`), `sigmas` is a descending schedule from `sdxl.sampling.schedules`,
usually ending in 0. Stochastic samplers draw from `noise_sampler(sigma, sigma_next)`; deterministic ones ignore it.
`callback` gets k-diffusion's dict `{x, i, sigma, sigma_hat, denoised}` after the main model call of each step.
Schedule arithmetic runs on Python floats (float64), tensors stay in x's dtype. `EpsDenoiser` / `VDenoiser` turn an
eps- / v-predicting UNet into D. docs/samplers.md maps each sampler to its diffusers scheduler and their differences.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sdxl.sampling.schedules import discrete_sigmas, sigma_to_t, sigma_to_t_interp

NoiseSampler = Callable[[float, float], Tensor]


class EpsDenoiser:
    """D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma)): c_out = -sigma, c_in = 1/sqrt(sigma^2 + 1).
    `t_mode` maps sigma to the UNet's timestep: "nearest" training timestep (sgm's DiscreteDenoiser, ComfyUI),
    "interp" (fractional, log-sigma interpolation, as diffusers for Karras/exponential sigmas), or a callable."""

    def __init__(self, eps_fn: Callable[..., Tensor], sigmas_train: Tensor | None = None, t_mode="nearest"):
        if t_mode not in ("nearest", "interp") and not callable(t_mode):
            raise ValueError(f"t_mode must be 'nearest', 'interp' or a callable, got {t_mode!r}")
        self.eps_fn = eps_fn
        self.sigmas_train = discrete_sigmas() if sigmas_train is None else sigmas_train
        self.t_mode = t_mode

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        if callable(self.t_mode):
            return self.t_mode(sigma)
        return (sigma_to_t if self.t_mode == "nearest" else sigma_to_t_interp)(sigma, self.sigmas_train)

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        c_in = (s**2 + 1) ** -0.5
        return self.combine(x, s, c_in, self.eps_fn((x * c_in).to(x.dtype), self.sigma_to_t(sigma), **extra))

    @staticmethod
    def combine(x: Tensor, s: Tensor, c_in: Tensor, eps: Tensor) -> Tensor:
        """D from the UNet's output at sigma s."""
        return x - (s * eps).to(x.dtype)


class VDenoiser(EpsDenoiser):
    """D(x, sigma) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(x / sqrt(sigma^2 + 1), t(sigma)): a
    v-predicting UNet (Salimans & Ho 2022, v = alpha eps - sigma_vp x0); k-diffusion `DiscreteVDDPMDenoiser`
    with sigma_data 1, diffusers' `prediction_type="v_prediction"`. Same `t_mode` as `EpsDenoiser`."""

    @staticmethod
    def combine(x: Tensor, s: Tensor, c_in: Tensor, v: Tensor) -> Tensor:
        return (x * c_in**2 - s * c_in * v).to(x.dtype)


# Prediction type -> the wrapper that turns the UNet into D (the names of `ModelConfig.prediction`)
DENOISERS = {"epsilon": EpsDenoiser, "v": VDenoiser}


class GeneratorNoise:
    """One CPU `torch.Generator(seed)` stream per image, drawn in float32: the only source of per-image noise. Row b
    comes from `seeds[b]` alone, so an image depends neither on the device nor on its batch (docs/samplers.md §1;
    diffusers' generator lists). The pipeline draws the VAE posterior sample, the initial noise, then sampler steps."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]

    def randn(self, shape: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
        """(N, *shape): row i drawn as `randn((1, *shape), generator=generators[i])` in float32."""
        rows = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.cat(rows).to(device, dtype)

    def sampler(self, like: Tensor) -> NoiseSampler:
        """A `noise_sampler(sigma, sigma_next)` giving noise of `like`'s shape, device and dtype."""
        return lambda sigma, sigma_next: self.randn(like.shape[1:], like.device, like.dtype)


def default_noise_sampler(x: Tensor, seeds: Sequence[int], skip: int = 1) -> NoiseSampler:
    """`GeneratorNoise(seeds).sampler(x)` after discarding the first `skip` draws of x's shape: the draws the caller
    took (skip=1: the initial latent, as one diffusers generator per image in text-to-image; its img2img takes two,
    the VAE posterior sample and the noise)."""
    if len(seeds) != x.shape[0]:
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for a batch of {x.shape[0]}")
    noise = GeneratorNoise(seeds)
    for _ in range(skip):
        noise.randn(x.shape[1:])
    return noise.sampler(x)


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step: deterministic step to sigma_down, then noise sigma_up."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def sample_euler(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Algorithm 2 (Euler steps) from Karras et al. (2022); the sgm reference's EulerEDMSampler."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        x, sigma_hat, d = _churned_derivative(model, x, s, i, extra_args, callback, noise_sampler,
                                              (s_churn, s_tmin, s_tmax, s_noise))
        x = x + d * (s[i + 1] - sigma_hat)
    return x


def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler method steps (k-diffusion `sample_euler_ancestral`)."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        x = x + (x - denoised) / s[i] * (sigma_down - s[i])
        if sigma_up > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def sample_heun(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Algorithm 2 (Heun steps) from Karras et al. (2022); an Euler step into sigma = 0."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        x, sigma_hat, d = _churned_derivative(model, x, s, i, extra_args, callback, noise_sampler,
                                              (s_churn, s_tmin, s_tmax, s_noise))
        dt = s[i + 1] - sigma_hat
        if s[i + 1] != 0:  # the mean of the slopes at both ends
            x_2 = x + d * dt
            d = (d + (x_2 - _denoise(model, x_2, s[i + 1], extra_args)) / s[i + 1]) / 2
        x = x + d * dt
    return x


def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                 s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """DPM-Solver-2 steps (Lu et al., 2022) with Algorithm 2 of Karras et al. (2022): midpoint in log sigma."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        x, sigma_hat, d = _churned_derivative(model, x, s, i, extra_args, callback, noise_sampler,
                                              (s_churn, s_tmin, s_tmax, s_noise))
        x = _dpm_2_step(model, x, d, sigma_hat, s[i + 1], extra_args)
    return x


def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                           eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion `sample_dpm_2_ancestral`)."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        x = _dpm_2_step(model, x, (x - denoised) / s[i], s[i], sigma_down, extra_args)
        if sigma_down != 0:  # k-diffusion adds no noise after the Euler step into 0
            x = x + noise_sampler(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def _dpm_2_step(model, x, d, sigma, sigma_next, extra_args):
    """DPM-Solver-2 from sigma to sigma_next along d, through the midpoint in log sigma (Euler into sigma = 0)."""
    if sigma_next == 0:
        return x + d * (sigma_next - sigma)
    sigma_mid = math.exp((math.log(sigma) + math.log(sigma_next)) / 2)
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = (x_2 - _denoise(model, x_2, sigma_mid, extra_args)) / sigma_mid
    return x + d_2 * (sigma_next - sigma)


def sample_lms(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *, order=4):
    """Linear multistep method in sigma (k-diffusion `sample_lms`; Karras et al. 2022 §3)."""
    s, extra_args, _ = _setup(x, sigmas, extra_args, noise_sampler)
    ds = []  # derivatives at s[i], s[i-1], ... (newest last)
    for i in range(len(s) - 1):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        ds = (ds + [(x - denoised) / s[i]])[-order:]
        coeffs = [_lms_coefficient(s, i, j, len(ds)) for j in range(len(ds))]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                    lower_order_final=False):
    """DPM-Solver++(2M), the multistep second-order solver of Lu et al. (2022b); k-diffusion `sample_dpmpp_2m`, which
    is `sample_dpmpp_2m_sde` at eta 0. `lower_order_final=True` is diffusers' rule (`DPMSolverMultistepScheduler`'s
    default): below 15 steps the last step is first order. Into sigma = 0 it is first order anyway (x = D)."""
    return sample_dpmpp_2m_sde(model, x, sigmas, extra_args, callback, noise_sampler, eta=0.0,
                               lower_order_final=lower_order_final)


def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                        eta=1.0, s_noise=1.0, solver_type="midpoint", lower_order_final=False):
    """DPM-Solver++(2M) SDE (Lu et al., 2022b; k-diffusion `sample_dpmpp_2m_sde`), noise per step.
    `lower_order_final`: diffusers' rule, as in `sample_dpmpp_2m`."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    return _dpmpp_multistep(model, x, sigmas, extra_args, callback, noise_sampler, 2, eta, s_noise, solver_type,
                            lower_order_final)


def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                        eta=1.0, s_noise=1.0, lower_order_final=False):
    """DPM-Solver++(3M) SDE (k-diffusion `sample_dpmpp_3m_sde`), noise per step. `lower_order_final=True` is
    diffusers' rule: below 15 steps the last step is first order and the one before it at most second order."""
    return _dpmpp_multistep(model, x, sigmas, extra_args, callback, noise_sampler, 3, eta, s_noise, "heun",
                            lower_order_final)


def _dpmpp_multistep(model, x, sigmas, extra_args, callback, noise_sampler, order, eta, s_noise, solver_type,
                     lower_order_final):
    """DPM-Solver++ multistep of up to `order` (2 or 3), stochastic for eta > 0; the second-order correction
    k-diffusion's "midpoint" or "heun" (the 3M SDE's)."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(s) - 1):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        h = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])  # step in lambda = -log(sigma)
            h_eta = h * (eta + 1)
            phi_1 = -math.expm1(-h_eta)
            x = math.exp(-h_eta) * x + phi_1 * denoised
            cap = min(order, _order_cap(i, len(s) - 1, lower_order_final))
            if h_2 is not None and cap >= 3:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2  # phi_3 = phi_2 / h_eta - 1/2
            elif h_1 is not None and cap >= 2:
                c = 0.5 * phi_1 if solver_type == "midpoint" else math.expm1(-h_eta) / h_eta + 1  # heun: phi_2
                x = x + (c / (h_1 / h)) * (denoised - denoised_1)
            if eta:
                x = x + noise_sampler(s[i], s[i + 1]) * (s[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise)
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
    return x


def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                     eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic), k-diffusion `sample_dpmpp_sde`: singlestep second order with an SDE substep. Its
    Brownian tree's increments over [sigma_i, sigma_s] and [sigma_i, sigma_next] come from two `noise_sampler` draws
    here, with the same joint law (Brownian motion in sigma)."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        if s[i + 1] == 0:
            x = denoised  # an Euler step into sigma = 0
            continue
        sigma_s = s[i] * math.exp(-r * math.log(s[i] / s[i + 1]))  # lambda_s = lambda_i + r * h
        z_1, z_2 = noise_sampler(s[i], sigma_s), noise_sampler(sigma_s, s[i + 1])
        z_full = ((s[i] - sigma_s) ** 0.5 * z_1 + (sigma_s - s[i + 1]) ** 0.5 * z_2) / (s[i] - s[i + 1]) ** 0.5
        # Step 1: first-order (DDIM) step to sigma_s
        sd, su = get_ancestral_step(s[i], sigma_s, eta)
        x_2 = denoised + (sd / s[i]) * (x - denoised) + z_1 * (s_noise * su)
        denoised_2 = _denoise(model, x_2, sigma_s, extra_args)
        # Step 2: to sigma_next with the combined data prediction
        sd, su = get_ancestral_step(s[i], s[i + 1], eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = denoised_d + (sd / s[i]) * (x - denoised_d) + z_full * (s_noise * su)
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *,
                              eta=1.0, s_noise=1.0):
    """Ancestral sampling with DPM-Solver++(2S) second-order steps (k-diffusion `sample_dpmpp_2s_ancestral`)."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        sigma_down, sigma_up = get_ancestral_step(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = denoised  # an Euler step into sigma = 0
        else:
            sigma_mid = math.sqrt(s[i] * sigma_down)  # r = 1/2: the midpoint in lambda
            x_2 = denoised + (sigma_mid / s[i]) * (x - denoised)
            denoised_2 = _denoise(model, x_2, sigma_mid, extra_args)
            x = denoised_2 + (sigma_down / s[i]) * (x - denoised_2)
        if sigma_up > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * (s_noise * sigma_up)
    return x


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *, eta=0.0, s_noise=1.0):
    """DDIM (Song et al., 2021): in sigma form the Euler step for eta=0, the ancestral Euler step for eta > 0."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, noise_sampler, eta=eta, s_noise=s_noise)


def sample_uni_pc(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *, order=2, variant="bh2"):
    """UniPC multistep predictor-corrector (Zhao et al., 2023), data prediction, as diffusers' UniPCMultistep."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    s, extra_args, _ = _setup(x, sigmas, extra_args, noise_sampler)
    n = len(s) - 1
    history = []  # (sigma, denoised), newest last
    x_last, last_order = None, None
    for i in range(n):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        if i > 0:  # UniC: correct the predicted x with the model output at it (no extra evaluation)
            x = _unipc_update(x_last, history, s[i], last_order, variant, model_t=denoised)
        history = (history + [(s[i], denoised)])[-order:]
        last_order = min(order, n - i, i + 1)  # lower order for the first and the final steps
        x_last = x
        x = _unipc_update(x, history, s[i + 1], last_order, variant)  # UniP
    return x


def _unipc_update(x, history, sigma_t, order, variant, model_t=None):
    """One UniP (model_t None) or UniC step from history[-1]'s sigma to sigma_t, in sigma form."""
    sigma_0, m0 = history[-1]
    if sigma_t == 0:
        return m0  # the first-order step into sigma = 0 lands on the data prediction
    h = math.log(sigma_0 / sigma_t)
    rks, d1s = [], []
    for k in range(1, order):
        sigma_k, m_k = history[-1 - k]
        rk = math.log(sigma_0 / sigma_k) / h  # (lambda_k - lambda_0) / h, negative
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    R, b, factorial = [], [], 1
    for k in range(1, order + 1):
        R.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = np.array(R), np.array(b)
    x_t = (sigma_t / sigma_0) * x - h_phi_1 * m0
    if model_t is None:  # predictor
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()  # corrector
    res = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x)) + rhos[-1] * (model_t - m0)
    return x_t - b_h * res


def sample_lcm(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None):
    """Latent Consistency Model sampling (Luo et al. 2023, Algorithm 1): jump to D(x), re-noise to the next sigma.
    ComfyUI `sample_lcm` (comfy/k_diffusion/sampling.py at 02159d814dee); diffusers' `LCMScheduler.step`
    (scheduling_lcm.py at 58eb52c0803e) also mixes in the input by c_skip = 0.25 / ((10 t)^2 + 0.25), below 2e-7
    for t >= 100, which ComfyUI and we leave out."""
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    for i in range(len(s) - 1):
        x = _main_step_denoised(model, x, s, i, extra_args, callback)
        if s[i + 1] > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * s[i + 1]
    return x


def sample_tcd(model, x, sigmas, extra_args=None, callback=None, noise_sampler=None, *, gamma=0.3):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024, §4.3), in sigma form.
    Each step goes to x_s = D + sigma_s * eps at timestep s = floor((1 - gamma) * t_next), then adds noise back up to
    sigma_next; gamma = 0 is DDIM. Into sigma = 0, s = 0 and the result is x_s at the smallest training sigma in VP
    scaling (x_s / sqrt(sigma_s^2 + 1)), as diffusers' `TCDScheduler.step` (scheduling_tcd.py at 58eb52c0803e; gamma
    is its `eta`) and JettHu/ComfyUI-TCD's `sample_tcd`. Timesteps: the denoiser's `sigmas_train` (nearest), else
    SDXL's `discrete_sigmas()`."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    s, extra_args, noise_sampler = _setup(x, sigmas, extra_args, noise_sampler)
    table = getattr(model, "sigmas_train", None)
    table = (discrete_sigmas() if table is None else table).to(torch.float64).cpu()
    for i in range(len(s) - 1):
        denoised = _main_step_denoised(model, x, s, i, extra_args, callback)
        t_next = int(sigma_to_t(torch.tensor([s[i + 1]], dtype=torch.float64), table))
        sigma_s = float(table[math.floor((1 - gamma) * t_next)])
        x = denoised + (x - denoised) * (sigma_s / s[i])
        if s[i + 1] == 0:
            x = x / (sigma_s**2 + 1) ** 0.5
        elif gamma > 0:
            x = x + noise_sampler(s[i], s[i + 1]) * max(s[i + 1] ** 2 - sigma_s**2, 0.0) ** 0.5
    return x


class _Samplers(dict):
    """Name -> sampler function; an unknown name raises ValueError listing the valid ones."""

    def __missing__(self, name):
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(self)}")


SAMPLERS = _Samplers((f.__name__.removeprefix("sample_"), f) for f in (
    sample_euler, sample_euler_ancestral, sample_heun, sample_dpm_2, sample_dpm_2_ancestral, sample_lms,
    sample_dpmpp_2m, sample_dpmpp_2m_sde, sample_dpmpp_3m_sde, sample_dpmpp_sde, sample_dpmpp_2s_ancestral,
    sample_ddim, sample_uni_pc, sample_lcm, sample_tcd))


def _setup(x, sigmas, extra_args, noise_sampler):
    """Sigmas as Python floats, extra_args as a dict, and torch's global RNG if no noise sampler is given."""
    global_rng = lambda sigma, sigma_next: torch.randn_like(x)  # noqa: E731
    return [float(v) for v in sigmas.tolist()], extra_args or {}, noise_sampler or global_rng


def _denoise(model, x: Tensor, sigma: float, extra_args: dict) -> Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return model(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device), **extra_args)


def _main_step_denoised(model, x: Tensor, s: list[float], i: int, extra_args: dict, callback,
                        sigma_hat: float | None = None) -> Tensor:
    """D(x) at sigma_hat (default s[i]), the main model call of step i, reported to the callback."""
    sigma_hat = s[i] if sigma_hat is None else sigma_hat
    denoised = _denoise(model, x, sigma_hat, extra_args)
    if callback is not None:
        callback({"x": x, "i": i, "sigma": s[i], "sigma_hat": sigma_hat, "denoised": denoised})
    return denoised


def _churned_derivative(model, x, s, i, extra_args, callback, noise_sampler, churn):
    """Karras et al. (2022) Algorithm 2 lines 4-7: raise sigma by gamma and add the matching noise, denoise there;
    returns (x, sigma_hat, d = (x - D(x)) / sigma_hat). `churn`: (s_churn, s_tmin, s_tmax, s_noise)."""
    s_churn, s_tmin, s_tmax, s_noise = churn
    gamma = min(s_churn / (len(s) - 1), 2**0.5 - 1) if s_tmin <= s[i] <= s_tmax else 0.0
    sigma_hat = s[i] * (gamma + 1)
    if gamma > 0:
        x = x + noise_sampler(s[i], s[i + 1]) * (s_noise * (sigma_hat**2 - s[i] ** 2) ** 0.5)
    denoised = _main_step_denoised(model, x, s, i, extra_args, callback, sigma_hat)
    return x, sigma_hat, (x - denoised) / sigma_hat


def _order_cap(i: int, steps: int, lower_order_final: bool) -> int:
    """Highest order allowed at step i: diffusers' `lower_order_final` lowers the last steps below 15 steps."""
    return steps - i if lower_order_final and steps < 15 else 3


def _lms_coefficient(s: list[float], i: int, j: int, order: int) -> float:
    """Integral over [s[i], s[i+1]] of the Lagrange basis polynomial that is 1 at s[i-j] (nodes s[i-order+1..i])."""
    p = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            p = p * np.poly1d([1.0, -s[i - k]]) / (s[i - j] - s[i - k])
    antiderivative = p.integ()
    return float(antiderivative(s[i + 1]) - antiderivative(s[i]))
