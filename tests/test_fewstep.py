"""Few-step and other SDXL-family models: the LCM and TCD samplers, v-prediction and zero-terminal-SNR schedules.

Sampler parity: diffusers' `LCMScheduler`/`TCDScheduler` drive the toy eps model of test_samplers from per-image seeded
noise on their own timesteps; ours walk the same training sigmas from the same noise and noise streams, and the whole
final latent is compared (float32 rounding: PARITY, atol = rtol = 1e-5; LCM's boundary-condition c_skip, left out by
ours and ComfyUI, is below 2e-7 at these timesteps).
"""

from __future__ import annotations

import pytest
import torch

from sdxl.sampling.names import from_a1111, to_a1111
from sdxl.sampling.samplers import SAMPLERS, EpsDenoiser, default_noise_sampler
from sdxl.sampling.schedules import discrete_sigmas
from test_samplers import CONFIG, PARITY, SEEDS, needs_diffusers, run_diffusers, toy_eps

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning")]


def run_ours(sampler: str, scheduler, noise: torch.Tensor, **opts) -> torch.Tensor:
    """Our sampler over the scheduler's training sigmas (then 0), from its initial noise in sigma form."""
    sigmas = torch.cat([discrete_sigmas()[scheduler.timesteps.long()], torch.zeros(1, dtype=torch.float64)])
    x = noise.double() * (1 + sigmas[0] ** 2) ** 0.5  # VP init_noise_sigma 1 in sigma form
    return SAMPLERS[sampler](EpsDenoiser(toy_eps), x, sigmas, noise_sampler=default_noise_sampler(x, SEEDS), **opts)


@needs_diffusers
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_lcm_equals_diffusers_lcm_scheduler(steps):
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**CONFIG)
    ref, noise, _ = run_diffusers(scheduler, steps, {})
    torch.testing.assert_close(run_ours("lcm", scheduler, noise), ref.double(), **PARITY)


@needs_diffusers
@pytest.mark.parametrize("steps, gamma", [(4, 0.3), (8, 0.3), (4, 0.0), (4, 1.0), (1, 0.3), (6, 0.7)])
def test_tcd_equals_diffusers_tcd_scheduler(steps, gamma):
    from diffusers import TCDScheduler

    scheduler = TCDScheduler(**CONFIG)
    ref, noise, _ = run_diffusers(scheduler, steps, {"eta": gamma})
    torch.testing.assert_close(run_ours("tcd", scheduler, noise, gamma=gamma), ref.double(), **PARITY)


def test_tcd_refuses_gamma_outside_0_1():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="gamma must be in"):
        SAMPLERS["tcd"](EpsDenoiser(toy_eps), x, torch.tensor([1.0, 0.0]), gamma=1.5)


@pytest.mark.parametrize("ours, a1111", [("lcm", "LCM"), ("tcd", "TCD")])
def test_lcm_and_tcd_have_a1111_names(ours, a1111):
    assert to_a1111(ours, "sgm_uniform") == (a1111, "SGM Uniform")
    assert from_a1111(a1111, "SGM Uniform") == (ours, "sgm_uniform") and from_a1111(ours) == (ours, "sgm")


def test_lcm_with_the_exact_consistency_function_returns_the_data_law():
    """Data N(mu, s^2): the consistency function (the probability-flow ODE's map to sigma = 0) is
    mu + s / sqrt(s^2 + sigma^2) (x - mu); LCM's jump-and-renoise keeps the law at every step."""
    mu, s = 0.3, 0.5
    model = lambda x, sigma: mu + s / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5 * (x - mu)  # noqa: E731
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = mu + torch.randn(4096, 1, 4, 4, generator=g, dtype=torch.float64) * (sigmas[0] ** 2 + s**2) ** 0.5
    out = SAMPLERS["lcm"](model, x, sigmas, noise_sampler=lambda a, b: torch.randn(x.shape, generator=g,
                                                                                    dtype=x.dtype))
    assert abs(out.mean().item() - mu) < 0.01 and abs(out.std().item() / s - 1) < 0.01
