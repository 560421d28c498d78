"""Schedules and samplers: edge cases, a Gaussian-data check, and parity with diffusers' schedulers.

Parity: diffusers' scheduler drives a toy eps model (smooth, nonlinear in both the scaled input
and t) from per-image seeded noise; our sampler runs the same model through `EpsDenoiser` on
the scheduler's own sigmas, from the same initial latent and (ancestral/SDE) the same per-image
noise streams, and the whole final latent is compared.
Tolerance: diffusers steps in float32 (float32 sigmas; most schedulers cast the sample to
float32), ours in float64, so they agree to float32 rounding: final |x| ~ 4, worst error seen
3e-6 -> PARITY = atol 1e-5, rtol 1e-5. End-to-end cases that also use our own float64
schedule and training sigmas (diffusers' are float32, off by up to 1.3e-5 relative) use 1e-4.
"""

from __future__ import annotations

import inspect
import math
import types

import numpy as np
import pytest
import torch

from sdxl.sampling.samplers import SAMPLERS, EpsDenoiser, default_noise_sampler
from sdxl.sampling.schedules import (
    SCHEDULES, discrete_sigmas, exponential_sigmas, get_sigmas, img2img_sigmas, karras_sigmas, sigma_to_t,
    sigma_to_t_interp, t_to_sigma,
)

try:
    import diffusers
    from diffusers.utils.torch_utils import randn_tensor
except ImportError:  # the parity tests skip, the rest runs
    diffusers = None

needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers not installed")
pytestmark = [
    pytest.mark.usefixtures("one_thread"),  # the tensors are tiny: one thread avoids oversubscribing 2 cores
    # diffusers' schedulers under numpy 2
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
]

PARITY = dict(atol=1e-5, rtol=1e-5)
END_TO_END = dict(atol=1e-4, rtol=1e-4)
CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SEEDS = [11, 22]
SHAPE = (2, 4, 8, 8)
W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / 2


def toy_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for the UNet: depends on x (mixing channels and pixels) and on t."""
    c = t.to(x.dtype).reshape(-1, 1, 1, 1) / 1000
    mix = torch.tanh(torch.einsum("bchw,dc->bdhw", x, W.to(x.dtype)))
    return x * c.sqrt() + 0.3 * (1 - c) * mix + 0.1 * torch.sin(3 * c + x.roll(1, -1))


# ---------------------------------------------------------------- schedules


def test_discrete_sigmas():
    s = discrete_sigmas()
    assert s.shape == (1000,) and s.dtype == torch.float64 and (s[1:] > s[:-1]).all()
    assert s[0].item() == pytest.approx(0.0291672, rel=1e-5) and s[-1].item() == pytest.approx(14.614642, rel=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 3, 150])
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_shape(name, steps):
    s = get_sigmas(name, steps)
    assert s.shape == (steps + 1,) and s[-1].item() == 0.0
    assert (s[:-1] > s[1:]).all() and (s[:-1] > 0).all()  # strictly descending: no repeated timestep


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_step_limits(name):
    if name in ("karras", "exponential", "sgm_uniform"):
        s = get_sigmas(name, 2000)
        assert s.shape == (2001,) and (s[:-1] > s[1:]).all()
        return
    most = 999 if name in ("leading", "ddim_uniform") else 1000
    s = get_sigmas(name, most)
    assert (s[:-1] > s[1:]).all()
    with pytest.raises(ValueError, match="at most"):
        get_sigmas(name, most + 1)


@pytest.mark.parametrize("name, steps, message", [("normal", 10, "karras, exponential"), ("karras", 0, "at least 1")])
def test_schedule_refuses_bad_arguments(name, steps, message):
    with pytest.raises(ValueError, match=message):
        get_sigmas(name, steps)


@pytest.mark.parametrize("steps, timesteps", [(1, [999]), (3, [999, 666, 333]), (1000, list(range(999, -1, -1)))])
def test_sgm_schedule_floors_linspace_from_999(steps, timesteps):
    """sgm LegacyDDPMDiscretization: timesteps linspace(999, 0, n, endpoint=False) floored, starting at 999."""
    torch.testing.assert_close(get_sigmas("sgm", steps)[:-1], discrete_sigmas()[timesteps])


def test_sgm_schedule_ends_above_the_lowest_training_sigma():
    assert get_sigmas("sgm", 40)[-2] == discrete_sigmas()[24]  # floor(999 / 40)


@pytest.mark.parametrize("steps, timesteps", [(3, [999, 666, 333]), (10, list(range(999, 0, -100)))])
def test_simple_schedule_takes_every_nth_training_sigma(steps, timesteps):
    """ComfyUI simple_scheduler: every (1000 / steps)-th sigma from the top."""
    torch.testing.assert_close(get_sigmas("simple", steps)[:-1], discrete_sigmas()[timesteps])


def test_sgm_uniform_interpolates_log_sigma_at_fractional_timesteps():
    """ComfyUI normal_scheduler(sgm=True): t = linspace(999, 0, steps + 1)[:-1], log-sigma interpolation."""
    st = discrete_sigmas()
    t = torch.linspace(999, 0, 31, dtype=torch.float64)[:-1]
    torch.testing.assert_close(get_sigmas("sgm_uniform", 30)[:-1], t_to_sigma(t, st))
    torch.testing.assert_close(get_sigmas("sgm_uniform", 4)[2], st[499:501].log().mean().exp())  # t = 499.5


@pytest.mark.parametrize("steps", [1, 10, 25, 40])
def test_ddim_uniform_equals_comfyui_where_steps_divide_1000(steps):
    """ComfyUI/ldm's timesteps 1, 1 + c, 1 + 2c, ... (c = 1000 // steps)."""
    st = discrete_sigmas()
    torch.testing.assert_close(get_sigmas("ddim_uniform", steps)[:-1], st[list(range(1, 1000, 1000 // steps))].flip(0))


def test_ddim_uniform_keeps_the_steps_asked_for():
    torch.testing.assert_close(get_sigmas("ddim_uniform", 30), get_sigmas("leading", 30))  # ComfyUI: 31 steps


def test_karras_schedule_spans_the_training_range_evenly_in_sigma_to_the_1_over_rho():
    st, k = discrete_sigmas(), get_sigmas("karras", 30)
    assert k[0].item() == pytest.approx(st[-1].item()) and k[-2].item() == pytest.approx(st[0].item())
    ramp = (k[:-1] ** (1 / 7)).diff()
    torch.testing.assert_close(ramp, ramp[:1].expand_as(ramp))


def test_exponential_schedule_is_evenly_spaced_in_log_sigma():
    e = get_sigmas("exponential", 30)
    torch.testing.assert_close(e[:-1].log().diff(), e[:2].log().diff().expand(29))


@pytest.mark.parametrize("fn, steps, expected", [(karras_sigmas, 1, [10.0, 0.0]),
                                                  (exponential_sigmas, 2, [10.0, 0.1, 0.0])])
def test_karras_and_exponential_sigmas_from_an_explicit_range(fn, steps, expected):
    torch.testing.assert_close(fn(steps, 0.1, 10.0), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("to_t", [sigma_to_t, sigma_to_t_interp])
def test_training_sigmas_map_to_their_timesteps(to_t):
    st = discrete_sigmas()
    torch.testing.assert_close(to_t(st, st), torch.arange(1000, dtype=torch.float64))


def test_sigma_to_t_interp_inverts_t_to_sigma():
    st = discrete_sigmas()
    t = torch.tensor([0.0, 0.25, 10.5, 500.7, 998.99, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sigma_to_t_interp(t_to_sigma(t, st), st), t)


def test_sigma_to_t_takes_the_nearest_in_sigma_distance():
    """sgm's DiscreteDenoiser.sigma_to_idx; out-of-range sigmas clamp to the ends."""
    st = discrete_sigmas()
    mid = (st[10] + st[11]) / 2
    assert sigma_to_t(torch.stack([mid - 1e-9, mid + 1e-9, st[0] / 2, st[-1] * 2]), st).tolist() == [10, 11, 0, 999]


def test_sigma_to_t_interp_clamps_out_of_range_sigmas():
    st = discrete_sigmas()
    assert sigma_to_t_interp(torch.stack([st[0] / 2, st[-1] * 2]), st).tolist() == [0, 999]


@pytest.mark.parametrize("strength", [0.15, 0.3, 0.5, 0.77, 1.0])
def test_img2img_sigmas_keep_diffusers_steps(strength):
    s = get_sigmas("karras", 30)
    keep = min(int(30 * strength), 30)  # diffusers' get_timesteps: init_timestep
    torch.testing.assert_close(img2img_sigmas(s, strength), s[30 - keep:])


@pytest.mark.parametrize("strength, tail", [(0.01, 2), (0.0, 1)])
def test_img2img_sigmas_small_strength_one_step_zero_none(strength, tail):
    s = get_sigmas("karras", 30)  # 0.01: one step where diffusers raises; 0: no step
    torch.testing.assert_close(img2img_sigmas(s, strength), s[-tail:])


def test_img2img_sigmas_refuse_strength_above_1():
    with pytest.raises(ValueError, match="strength"):
        img2img_sigmas(get_sigmas("karras", 30), 1.5)


# ---------------------------------------------------------------- samplers, our side only


def test_sampler_registry_names():
    assert set(SAMPLERS) == {
        "euler", "euler_ancestral", "heun", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2m", "dpmpp_2m_sde",
        "dpmpp_3m_sde", "dpmpp_sde", "dpmpp_2s_ancestral", "ddim", "uni_pc", "lcm", "tcd",
    }


def test_unknown_sampler_lists_the_valid_ones():
    with pytest.raises(ValueError, match="euler_ancestral, heun"):
        SAMPLERS["k_euler"]


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
@pytest.mark.parametrize("name", SCHEDULES)
def test_every_sampler_every_schedule_ends_finite(name, sampler):
    """1, 2, 3 and 150 steps."""
    model = EpsDenoiser(toy_eps)
    for steps in (1, 2, 3, 150):
        sigmas = get_sigmas(name, steps)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps), dtype=torch.float64) * sigmas[0]
        out = SAMPLERS[sampler](model, x, sigmas, noise_sampler=default_noise_sampler(x, SEEDS))
        assert out.shape == x.shape and torch.isfinite(out).all(), steps


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_a_schedule_of_one_sigma_leaves_x_as_it_is(sampler):
    """Strength 0: img2img_sigmas gives [0]."""
    x = torch.randn(SHAPE, dtype=torch.float64)
    assert SAMPLERS[sampler](EpsDenoiser(toy_eps), x, get_sigmas("karras", 3)[-1:]) is x


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_partial_schedule_reports_every_step(sampler):
    """A schedule that stops above 0 (a base -> refiner hand-off) runs every step and calls back after each."""
    model, sigmas = EpsDenoiser(toy_eps), get_sigmas("karras", 12)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    seen = []
    head = SAMPLERS[sampler](model, x, sigmas[:9], callback=seen.append, noise_sampler=default_noise_sampler(x, SEEDS))
    assert torch.isfinite(head).all() and [c["i"] for c in seen] == list(range(8))
    assert seen[0]["sigma"] == sigmas[0].item() and set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_lower_order_final_changes_nothing_into_sigma_0_for_2m(sampler):
    """diffusers' rule lowers the last step to first order, which a step into sigma = 0 is already; for 3M it
    also lowers the step before (below 15 steps), so 3M changes and 2M does not."""
    sigmas = get_sigmas("trailing", 10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    a, b = (SAMPLERS[sampler](EpsDenoiser(toy_eps), x, sigmas, noise_sampler=default_noise_sampler(x, SEEDS),
                              lower_order_final=lof) for lof in (False, True))
    assert torch.equal(a, b) == (sampler != "dpmpp_3m_sde")


@pytest.mark.parametrize("steps, same", [(10, False), (15, True)])
def test_lower_order_final_applies_below_15_steps_above_sigma_0(steps, same):
    sigmas = get_sigmas("trailing", steps + 1)[:-1]  # `steps` steps ending at the lowest training sigma, not 0
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    a, b = (SAMPLERS["dpmpp_2m"](EpsDenoiser(toy_eps), x, sigmas, lower_order_final=lof) for lof in (False, True))
    assert torch.equal(a, b) == same


@pytest.mark.parametrize("sampler", sorted(set(SAMPLERS) - {"lcm", "tcd"}))  # those need a consistency model
def test_gaussian_data(sampler):
    """With data N(mu, s^2) the exact denoiser is known; every sampler must return samples of that law."""
    mu, s = 0.3, 0.5
    model = lambda x, sigma: mu + s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mu)  # noqa: E731
    sigmas = get_sigmas("karras", 100)
    g = torch.Generator().manual_seed(0)
    x = mu + torch.randn(4096, 1, 4, 4, generator=g, dtype=torch.float64) * (sigmas[0] ** 2 + s**2) ** 0.5
    noise = lambda a, b: torch.randn(x.shape, generator=g, dtype=x.dtype)  # noqa: E731
    out = SAMPLERS[sampler](model, x, sigmas, noise_sampler=noise)
    assert abs(out.mean().item() - mu) < 0.01  # 5 standard errors
    first_order = sampler in ("euler", "euler_ancestral", "ddim")  # 100 steps: std 0.985 (ODE), 0.965 (ancestral)
    assert abs(out.std().item() / s - 1) < (0.05 if first_order else 0.01)


def recording(seen, out=None):
    """An eps function that records what it is given and returns ones (or its input)."""
    return lambda x, t: (seen.append((x, t)), torch.ones_like(x) if out is None else x)[1]


X3 = torch.full((2, 1, 2, 2), 3.0, dtype=torch.float64)


def test_eps_denoiser_returns_x_minus_sigma_eps():
    st = discrete_sigmas()
    sigma = torch.tensor([st[500].item(), 1.0], dtype=torch.float64)
    torch.testing.assert_close(EpsDenoiser(recording([]), st)(X3, sigma)[:, 0, 0, 0], 3.0 - sigma)


def test_eps_denoiser_scales_the_input_by_c_in():
    seen, st = [], discrete_sigmas()
    sigma = torch.tensor([st[500].item(), 1.0], dtype=torch.float64)
    EpsDenoiser(recording(seen), st)(X3, sigma)
    torch.testing.assert_close(seen[0][0][:, 0, 0, 0], 3.0 / (sigma**2 + 1).sqrt())


@pytest.mark.parametrize("t_mode, expected", [
    ("nearest", lambda s, st: sigma_to_t(s, st)),
    ("interp", lambda s, st: sigma_to_t_interp(s, st)),
    (lambda s: s * 0 + 7, lambda s, st: torch.full_like(s, 7)),
], ids=["nearest", "interp", "callable"])
def test_eps_denoiser_t_mode(t_mode, expected):
    seen, st = [], discrete_sigmas()
    sigma = torch.tensor([st[500].item(), 1.0], dtype=torch.float64)
    EpsDenoiser(recording(seen, "x"), st, t_mode)(X3, sigma)
    torch.testing.assert_close(seen[0][1], expected(sigma, st))


def test_eps_denoiser_nearest_by_default():
    seen, st = [], discrete_sigmas()
    EpsDenoiser(recording(seen), st)(X3, torch.tensor([st[500].item(), st[7].item()], dtype=torch.float64))
    assert seen[0][1].tolist() == [500, 7]


def test_eps_denoiser_refuses_an_unknown_t_mode():
    with pytest.raises(ValueError, match="t_mode"):
        EpsDenoiser(toy_eps, discrete_sigmas(), "linear")


def test_noise_sampler_gives_x_shape_and_dtype():
    x = torch.zeros(2, 4, 3, 3, dtype=torch.float16)
    a = default_noise_sampler(x, [5, 6])(1.0, 0.5)
    assert a.dtype == torch.float16 and a.shape == x.shape


def test_noise_of_an_image_does_not_depend_on_its_batch():
    x = torch.zeros(2, 4, 3, 3, dtype=torch.float16)
    pair, single = default_noise_sampler(x, [5, 6])(1.0, 0.5), default_noise_sampler(x[:1], [6])(1.0, 0.5)
    torch.testing.assert_close(pair[1:], single)


def test_noise_continues_the_seed_stream_after_the_initial_latent():
    g = torch.Generator().manual_seed(6)
    torch.randn((1, 4, 3, 3), generator=g)  # the initial latent
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float16)
    torch.testing.assert_close(default_noise_sampler(x, [6])(1.0, 0.5), torch.randn((1, 4, 3, 3), generator=g).half())


def test_noise_with_skip_0_starts_the_seed_stream():
    first = torch.randn((1, 4, 3, 3), generator=torch.Generator().manual_seed(6)).half()
    x = torch.zeros(1, 4, 3, 3, dtype=torch.float16)
    torch.testing.assert_close(default_noise_sampler(x, [6], skip=0)(1.0, 0.5), first)


def test_noise_sampler_needs_one_seed_per_image():
    with pytest.raises(ValueError, match="one seed per image"):
        default_noise_sampler(torch.zeros(2, 4, 3, 3), [1])


def k_diffusion_sample_dpm_2(model, x, sigmas, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
                             randn_like=torch.randn_like):
    """k-diffusion's `sample_dpm_2`, ported line for line from crowsonkb/k-diffusion at 4601bf0
    (k_diffusion/sampling.py; `to_d` inlined, the progress bar and callback dropped, `randn_like` injectable)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
        eps = randn_like(x) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in)
        d = (x - denoised) / sigma_hat
        if sigmas[i + 1] == 0:
            dt = sigmas[i + 1] - sigma_hat
            x = x + d * dt
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            dt_1 = sigma_mid - sigma_hat
            dt_2 = sigmas[i + 1] - sigma_hat
            x_2 = x + d * dt_1
            denoised_2 = model(x_2, sigma_mid * s_in)
            d_2 = (x_2 - denoised_2) / sigma_mid
            x = x + d_2 * dt_2
    return x


@pytest.mark.parametrize("s_churn", [0.0, 1.0])
@pytest.mark.parametrize("schedule", ["exponential", "karras", "sgm"])
def test_dpm_2_equals_k_diffusion(schedule, s_churn):
    """Issue 11: dpm_2 + exponential looked degraded on the default model; the sampler is k-diffusion's
    (float64 here, so to rounding), so what remains is the method's (docs/samplers.md)."""
    sigmas = get_sigmas(schedule, 20)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    ours_noise, their_noise = default_noise_sampler(x, SEEDS), default_noise_sampler(x, SEEDS)
    ours = SAMPLERS["dpm_2"](EpsDenoiser(toy_eps), x, sigmas, noise_sampler=ours_noise, s_churn=s_churn)
    theirs = k_diffusion_sample_dpm_2(EpsDenoiser(toy_eps), x, sigmas, s_churn=s_churn,
                                      randn_like=lambda x: their_noise(0.0, 0.0))
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- parity with diffusers


class Replay:
    """t mapping that hands the model, call by call, the timesteps diffusers used (where diffusers
    itself is inconsistent: fractional `linspace` timesteps, KDPM2's rounded main but fractional
    midpoint timesteps, int-truncated exponential timesteps)."""

    def __init__(self, timesteps):
        self.timesteps, self.calls = timesteps, 0

    def __call__(self, sigma):
        self.calls += 1
        return torch.full_like(sigma, self.timesteps[self.calls - 1])


def _lms_without_scipy(monkeypatch):
    """diffusers' LMS integrates its Lagrange polynomials with scipy's quad; without scipy, use
    8-point Gauss-Legendre, exact for these (degree <= 3) polynomials."""
    import diffusers.schedulers.scheduling_lms_discrete as lms

    try:
        import scipy.integrate  # noqa: F401
    except ImportError:
        nodes, weights = np.polynomial.legendre.leggauss(8)

        def quad(f, a, b, epsrel=None):
            a, b = float(a), float(b)
            return sum(w * float(f((b - a) / 2 * u + (a + b) / 2)) for u, w in zip(nodes, weights)) * (b - a) / 2, 0.0

        monkeypatch.setattr(lms, "integrate", types.SimpleNamespace(quad=quad), raising=False)
    return lms.LMSDiscreteScheduler


def _vp(scheduler) -> bool:
    """Schedulers whose sample is x_vp = x / sqrt(1 + sigma^2) (init_noise_sigma 1), not x itself."""
    return isinstance(scheduler, (diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler,
                                  diffusers.DPMSolverSinglestepScheduler, diffusers.UniPCMultistepScheduler))


def run_diffusers(scheduler, steps, step_kwargs):
    """diffusers' denoising loop; returns the final sample, the initial noise and the timesteps given to the model."""
    scheduler.set_timesteps(steps)
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    noise = randn_tensor(SHAPE, generator=generators, dtype=torch.float32)
    x = noise * scheduler.init_noise_sigma
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs = {**step_kwargs, "generator": generators}
    timesteps = []
    for t in scheduler.timesteps:
        timesteps.append(float(t))
        eps = toy_eps(scheduler.scale_model_input(x, t), t.reshape(1).expand(SHAPE[0]))
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x, noise, timesteps


def scheduler_sigmas(scheduler) -> torch.Tensor:
    """The distinct sigmas a diffusers scheduler steps through (Heun/KDPM2 store each one twice)."""
    if type(scheduler).__name__ == "DDIMScheduler":
        table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5
        return torch.cat([table[scheduler.timesteps], torch.zeros(1)]).double()
    return torch.unique_consecutive(scheduler.sigmas).double()


def every_other_sigma(scheduler) -> torch.Tensor:
    """DPMSolverSinglestep order 2 with 2N+1 steps = N DPM-Solver++(2S) steps over every other sigma, then to 0."""
    return torch.cat([scheduler.sigmas[:-1:2].double(), torch.zeros(1, dtype=torch.float64)])


def parity_error(sampler, scheduler, steps, t_mode, opts=None, step_kwargs=None, sigmas=scheduler_sigmas):
    """(ours, diffusers') final latents in sigma form, after checking both made the same number of model calls."""
    ref, noise, timesteps = run_diffusers(scheduler, steps, step_kwargs or {})
    sigmas = sigmas(scheduler) if callable(sigmas) else sigmas
    ref = ref.double()
    if _vp(scheduler):
        x = noise.double() * (1 + sigmas[0] ** 2) ** 0.5  # VP init_noise_sigma 1 in sigma form
        ref = ref * (1 + sigmas[-1] ** 2) ** 0.5
    else:
        x = noise.double() * float(scheduler.init_noise_sigma)  # `leading`: sqrt(sigma_0^2 + 1), else sigma_0
    calls = []
    model = EpsDenoiser(lambda x_in, t: (calls.append(t), toy_eps(x_in, t))[1], discrete_sigmas(),
                        Replay(timesteps) if t_mode == "replay" else t_mode)
    out = SAMPLERS[sampler](model, x, sigmas, noise_sampler=default_noise_sampler(x, SEEDS), **(opts or {}))
    assert len(calls) == len(timesteps)
    return out, ref


if diffusers is not None:

    class Fixed3M(diffusers.DPMSolverMultistepScheduler):
        """diffusers' sde-dpmsolver++ third-order update with the D2 coefficient of k-diffusion:
        alpha_t * ((1 - e^-2h - 2h) / (2h)^2 + 0.5), where diffusers (0.42) has - 0.5. Ours follows
        k-diffusion: it is the ODE coefficient under h -> 2h, as are the D0 and D1 terms."""

        def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
            if self.config.algorithm_type != "sde-dpmsolver++":
                return super().multistep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)
            ats = [self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + k]) for k in (1, 0, -1, -2)]
            lam = [torch.log(a) - torch.log(s) for a, s in ats]
            (alpha_t, sigma_t), (_, sigma_s0) = ats[0], ats[1]
            h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
            r0, r1 = h_0 / h, h_1 / h
            m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
            d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
            d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
            e = torch.exp(-2.0 * h)
            return (sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * (1 - e) * m0
                    + alpha_t * ((1 - e) / (-2.0 * h) + 1.0) * d1
                    + alpha_t * ((1 - e - 2.0 * h) / (2.0 * h) ** 2 + 0.5) * d2
                    + sigma_t * torch.sqrt(1.0 - e) * noise)
else:
    Fixed3M = type("Fixed3M", (), {})


LEAD = dict(timestep_spacing="leading", steps_offset=1)  # SDXL's diffusers scheduler config
TRAIL = dict(timestep_spacing="trailing")
LIN = dict(timestep_spacing="linspace")
KARRAS = dict(use_karras_sigmas=True)
EXP = dict(use_exponential_sigmas=True)
SDE = dict(algorithm_type="sde-dpmsolver++")
DDIM = dict(clip_sample=False, set_alpha_to_one=True)
SIGMA_MIN = dict(final_sigmas_type="sigma_min")  # the schedule ends at the smallest training sigma, not 0

# (our sampler, diffusers scheduler class name, its config, steps, t mode, our options, step() kwargs)
CASES = [
    ("euler", "EulerDiscreteScheduler", LEAD, 10, "nearest", {}, {}),
    ("euler", "EulerDiscreteScheduler", TRAIL, 10, "nearest", {}, {}),
    ("euler", "EulerDiscreteScheduler", LIN, 10, "replay", {}, {}),
    ("euler", "EulerDiscreteScheduler", {**LEAD, **KARRAS}, 10, "interp", {}, {}),
    ("euler", "EulerDiscreteScheduler", {**LEAD, **EXP}, 10, "interp", {}, {}),
    ("euler", "EulerDiscreteScheduler", LEAD, 1, "nearest", {}, {}),
    ("euler", "EulerDiscreteScheduler", TRAIL, 3, "nearest", {}, {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", LEAD, 10, "nearest", {}, {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", TRAIL, 10, "nearest", {}, {}),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", LIN, 10, "replay", {}, {}),
    ("heun", "HeunDiscreteScheduler", LEAD, 10, "nearest", {}, {}),
    ("heun", "HeunDiscreteScheduler", TRAIL, 10, "nearest", {}, {}),
    ("heun", "HeunDiscreteScheduler", {**LEAD, **KARRAS}, 10, "interp", {}, {}),
    ("heun", "HeunDiscreteScheduler", LEAD, 2, "nearest", {}, {}),
    ("dpm_2", "KDPM2DiscreteScheduler", LEAD, 10, "interp", {}, {}),
    ("dpm_2", "KDPM2DiscreteScheduler", TRAIL, 10, "interp", {}, {}),
    ("dpm_2", "KDPM2DiscreteScheduler", {**LEAD, **KARRAS}, 10, "replay", {}, {}),
    ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", LEAD, 10, "interp", {}, {}),
    ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler", {**LEAD, **KARRAS}, 10, "replay", {}, {}),
    ("lms", "LMSDiscreteScheduler", LEAD, 10, "nearest", {}, {}),
    ("lms", "LMSDiscreteScheduler", {**LEAD, **KARRAS}, 10, "interp", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", LEAD, 10, "nearest", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", TRAIL, 10, "nearest", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", LIN, 10, "nearest", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", KARRAS, 10, "nearest", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", EXP, 10, "replay", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", KARRAS, 3, "nearest", {}, {}),
    # lower_order_final (diffusers' default, < 15 steps: first-order last step) matters only above sigma = 0
    ("dpmpp_2m", "DPMSolverMultistepScheduler", TRAIL, 10, "nearest", {"lower_order_final": True}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {**TRAIL, **SIGMA_MIN}, 10, "nearest", {"lower_order_final": True}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {**TRAIL, **SIGMA_MIN, "lower_order_final": False}, 10, "nearest",
     {}, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {**SDE, **LEAD}, 10, "nearest", {}, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {**SDE, **KARRAS}, 10, "nearest", {}, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {**SDE, **KARRAS, "solver_type": "heun"}, 10, "nearest",
     {"solver_type": "heun"}, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {**SDE, **KARRAS, **SIGMA_MIN}, 10, "nearest",
     {"lower_order_final": True}, {}),
    # 3M: diffusers' 2nd-order warm-up step must be "heun" (k-diffusion's), >= 15 steps (below, diffusers
    # also lowers the order of the second-to-last step), and the SDE D2 coefficient fixed (Fixed3M)
    ("dpmpp_3m_sde", "Fixed3M", {**SDE, **KARRAS, "solver_order": 3, "solver_type": "heun"}, 20, "nearest", {}, {}),
    ("dpmpp_3m_sde", "Fixed3M", {**SDE, **LEAD, "solver_order": 3, "solver_type": "heun"}, 20, "nearest", {}, {}),
    ("dpmpp_3m_sde", "DPMSolverMultistepScheduler", {**KARRAS, "solver_order": 3, "solver_type": "heun"}, 20,
     "nearest", {"eta": 0.0}, {}),  # eta 0: the ODE DPM-Solver++(3M), no fix needed
    # below 15 steps diffusers lowers the second-to-last step to second order: lower_order_final
    ("dpmpp_3m_sde", "Fixed3M", {**SDE, **KARRAS, "solver_order": 3, "solver_type": "heun"}, 10, "nearest",
     {"lower_order_final": True}, {}),
    ("ddim", "DDIMScheduler", {**DDIM, **LEAD}, 10, "nearest", {}, {}),
    ("ddim", "DDIMScheduler", {**DDIM, **TRAIL}, 10, "nearest", {}, {}),
    ("ddim", "DDIMScheduler", {**DDIM, **LEAD}, 10, "nearest", {"eta": 1.0}, {"eta": 1.0}),
    ("ddim", "DDIMScheduler", {**DDIM, **LEAD}, 10, "nearest", {"eta": 0.5}, {"eta": 0.5}),
    ("uni_pc", "UniPCMultistepScheduler", LEAD, 10, "nearest", {}, {}),
    ("uni_pc", "UniPCMultistepScheduler", KARRAS, 10, "nearest", {}, {}),
    ("uni_pc", "UniPCMultistepScheduler", {**KARRAS, "solver_order": 3}, 10, "nearest", {"order": 3}, {}),
    ("uni_pc", "UniPCMultistepScheduler", LEAD, 2, "nearest", {}, {}),
    # bh1 into sigma = 0 is NaN in diffusers (-inf * 0 in the last predictor step): compare with a sigma_min end
    ("uni_pc", "UniPCMultistepScheduler", {**TRAIL, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 10,
     "nearest", {"variant": "bh1"}, {}),
]


def _case_id(case):
    sampler, cls, cfg, steps = case[:4]
    flags = [f"{k}={v}" for k, v in cfg.items() if k not in ("steps_offset", "algorithm_type", "clip_sample",
                                                             "set_alpha_to_one")]
    return f"{sampler}-{cls}-{steps}-" + ",".join(flags) + ("-" + str(case[5]) if case[5] else "")


def make_scheduler(cls_name, cfg, monkeypatch):
    if cls_name == "LMSDiscreteScheduler":
        cls = _lms_without_scipy(monkeypatch)
    elif cls_name == "Fixed3M":
        cls = Fixed3M
    else:
        cls = getattr(diffusers, cls_name)
    return cls(**CONFIG, **cfg)


@needs_diffusers
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_parity_with_diffusers(case, monkeypatch):
    sampler, cls_name, cfg, steps, t_mode, opts, step_kwargs = case
    scheduler = make_scheduler(cls_name, cfg, monkeypatch)
    sigmas = (lambda s: s.sigmas.double()) if cfg.get("final_sigmas_type") == "sigma_min" else scheduler_sigmas
    out, ref = parity_error(sampler, scheduler, steps, t_mode, opts, step_kwargs, sigmas)
    torch.testing.assert_close(out, ref, **PARITY)


@needs_diffusers
@pytest.mark.parametrize("sampler", ["dpmpp_2s_ancestral", "dpmpp_sde"])
def test_parity_singlestep(sampler):
    """eta=0 both are DPM-Solver++(2S) with r = 1/2: diffusers' DPMSolverSinglestep (order 2) over
    log-uniform (exponential) sigmas, whose odd sigmas are exactly those midpoints; 9 steps = 4 pairs + 1."""
    scheduler = diffusers.DPMSolverSinglestepScheduler(**CONFIG, **EXP)
    out, ref = parity_error(sampler, scheduler, 9, "replay", {"eta": 0.0}, sigmas=every_other_sigma)
    torch.testing.assert_close(out, ref, **PARITY)


@needs_diffusers
@pytest.mark.parametrize("sampler, cls_name, cfg, schedule, t_mode", [
    ("euler", "EulerDiscreteScheduler", LEAD, "leading", "nearest"),  # diffusers' SDXL default
    ("euler", "EulerDiscreteScheduler", TRAIL, "trailing", "nearest"),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", LEAD, "leading", "nearest"),
    ("euler", "EulerDiscreteScheduler", {**LIN, **KARRAS}, "karras", "interp"),  # linspace spans all 1000 levels
    ("dpmpp_2m", "DPMSolverMultistepScheduler", KARRAS, "karras", "nearest"),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {**SDE, **KARRAS}, "karras", "nearest"),
    ("uni_pc", "UniPCMultistepScheduler", KARRAS, "karras", "nearest"),
    ("ddim", "DDIMScheduler", {**DDIM, **LEAD}, "ddim_uniform", "nearest"),
])
def test_end_to_end_with_our_schedules(sampler, cls_name, cfg, schedule, t_mode, monkeypatch):
    """Our schedule + sampler + t mapping against diffusers' scheduler, 30 steps."""
    scheduler = make_scheduler(cls_name, cfg, monkeypatch)
    out, ref = parity_error(sampler, scheduler, 30, t_mode, sigmas=get_sigmas(schedule, 30))
    torch.testing.assert_close(out, ref, **END_TO_END)


@needs_diffusers
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 30, 40, 150, 999])
def test_schedules_match_diffusers(steps):
    """On diffusers' float32 training sigmas, ours equal its arrays to float32 rounding."""
    ref = diffusers.EulerDiscreteScheduler(**CONFIG)
    table = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5

    def theirs(cls=diffusers.EulerDiscreteScheduler, **cfg):
        s = cls(**CONFIG, **cfg)
        s.set_timesteps(steps)
        return s.sigmas.double()

    same = dict(atol=0, rtol=1e-6)
    torch.testing.assert_close(get_sigmas("leading", steps, table), theirs(**LEAD), **same)
    if len(theirs(**TRAIL)) == steps + 1:  # numpy's arange gives diffusers steps + 1 timesteps at 62 counts
        torch.testing.assert_close(get_sigmas("trailing", steps, table), theirs(**TRAIL), **same)
    if steps > 1:  # karras/exponential over all 1000 levels = DPMSolverMultistep's (and Euler's with linspace)
        dpm = diffusers.DPMSolverMultistepScheduler
        torch.testing.assert_close(get_sigmas("karras", steps, table), theirs(dpm, **KARRAS), **same)
        torch.testing.assert_close(get_sigmas("exponential", steps, table), theirs(dpm, **EXP), **same)
        # Euler-type schedulers' use_karras_sigmas span only the spaced timesteps' sigmas
        euler = theirs(**LEAD, **KARRAS)
        torch.testing.assert_close(karras_sigmas(steps, euler[-2].item(), euler[0].item()), euler, **same)


# The differences docs/samplers.md lists, measured so that a diffusers change shows up here.


@needs_diffusers
def test_diffusers_trailing_can_run_one_step_more_than_asked():
    trailing = diffusers.EulerDiscreteScheduler(**CONFIG, **TRAIL)
    trailing.set_timesteps(61)
    assert len(trailing.timesteps) == 62  # np.arange(1000, 0, -1000/61) has 62 values; ours keeps 61
    assert get_sigmas("trailing", 61).shape == (62,)


@needs_diffusers
def test_diffusers_unipc_bh1_into_sigma_0_is_nan():
    x, _, _ = run_diffusers(diffusers.UniPCMultistepScheduler(**CONFIG, solver_type="bh1"), 10, {})
    assert torch.isnan(x).all()


@needs_diffusers
def test_diffusers_leading_euler_starts_at_sqrt_sigma_0_squared_plus_1():
    euler = diffusers.EulerDiscreteScheduler(**CONFIG, **LEAD)
    euler.set_timesteps(30)
    sigma_0 = euler.sigmas[0].item()
    assert euler.init_noise_sigma.item() == pytest.approx(math.sqrt(sigma_0**2 + 1))  # ours: noise * sigma_0
