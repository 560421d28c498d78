"""The generation plan: the stages `Pipeline.generate` runs and the progress total, checked against the
callbacks a real run makes (tiny random models, fp32)."""

import numpy as np
import pytest
import torch
from conftest import randomize
from PIL import Image

from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel
from sdxl.pipeline import Pipeline, Plan, Stage
from sdxl.request import Request
from sdxl.sampling import schedules

SIZE = 32


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    base = randomize(SDXLModel(TINY_BASE), 0, 0.05)
    refiner = randomize(SDXLModel(TINY_REFINER), 1, 0.05)
    return Pipeline(base, refiner, dtype=torch.float32, channels_last=False)


def image() -> Image.Image:
    a = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(a)


def mask() -> Image.Image:
    m = Image.new("L", (SIZE, SIZE), 0)
    m.paste(255, (8, 8, 24, 24))
    return m


def callbacks(pipe: Pipeline, req: Request) -> int:
    seen = []
    pipe.generate(req, callback=seen.append)
    return len(seen)


def test_img2img_with_refiner_sdedit_counts_the_steps_it_runs(pipe):
    """img2img at strength 0.5 with refiner strength 0.3 and 10 steps: 5 base steps + 3 refiner steps (the old CLI
    copy of this sum said 13)."""
    req = Request("x", width=SIZE, height=SIZE, steps=10, seed=0, init_image=image(), strength=0.5,
                  refiner_strength=0.3)
    plan = pipe.plan(req)
    assert [(s.name, s.model, s.start, s.steps) for s in plan.stages] == [
        ("base", "base", "image", 5), ("refiner-sdedit", "refiner", "previous", 3)]
    assert plan.total_steps == 8 == callbacks(pipe, req)


SCENARIOS = {
    "txt2img": (dict(), [("base", "noise", 6)]),
    "img2img": (dict(init_image=image(), strength=0.5), [("base", "image", 3)]),
    "inpaint": (dict(init_image=image(), mask=mask(), strength=1.0), [("base", "image", 6)]),
    "outpaint": (dict(init_image=image(), outpaint=(8, 0, 0, 8)), [("base", "image", 6)]),
    "refiner hand-off": (dict(refiner_switch=0.5), [("base", "noise", 3), ("refiner", "previous", 3)]),
    "refiner SDEdit": (dict(refiner_strength=0.5, refiner_steps=4), [("base", "noise", 6),
                                                                     ("refiner-sdedit", "previous", 2)]),
    "latent refine": (dict(init_latent=torch.randn(1, 4, 16, 16), refiner_strength=0.25, refiner_steps=8),
                      [("refiner-sdedit", "latent", 2)]),
    "latent img2img": (dict(init_latent=torch.randn(1, 4, 16, 16), strength=0.5), [("base", "latent", 3)]),
    "hires fix": (dict(hires_scale=1.5, hires_strength=0.5, hires_steps=4), [("base", "noise", 6),
                                                                            ("hires", "previous", 2)]),
    "hires fix, strength 0": (dict(hires_scale=1.5, hires_strength=0.0), [("base", "noise", 6),
                                                                         ("hires", "previous", 0)]),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_plan_total_equals_the_callbacks_made(pipe, scenario):
    kw, stages = SCENARIOS[scenario]
    req = Request("x", width=SIZE, height=SIZE, steps=6, seed=0, **kw)
    plan = pipe.plan(req)
    assert [(s.name, s.start, s.steps) for s in plan.stages] == stages
    assert plan.total_steps == sum(n for *_, n in stages) == callbacks(pipe, req)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_sde", "dpmpp_2m", "uni_pc", "lms"])
def test_one_callback_per_step_for_every_sampler_kind(pipe, sampler):
    """Two-evaluation samplers (heun, dpm_2, dpmpp_sde) and multistep ones still report once per step."""
    req = Request("x", width=SIZE, height=SIZE, steps=5, seed=0, sampler=sampler, refiner_strength=0.4)
    assert pipe.plan(req).total_steps == 7 == callbacks(pipe, req)


def test_the_hand_off_splits_one_schedule(pipe):
    """Base and refiner walk one schedule, meeting at the switch sigma (diffusers' denoising_end/start)."""
    req = Request("x", width=SIZE, height=SIZE, steps=10, schedule="leading", refiner_switch=0.8)
    base, refiner = pipe.plan(req).stages
    full = schedules.get_sigmas("leading", 10)
    assert base.sigmas[-1] == refiner.sigmas[0]
    assert torch.equal(torch.cat([base.sigmas[:-1], refiner.sigmas]), full)
    assert (base.steps, refiner.steps) == (8, 2)


def test_stage_and_plan_are_plain_values():
    s = Stage("base", "base", torch.tensor([2.0, 1.0, 0.0]), "noise")
    assert s.steps == 2 and Plan((s, s)).total_steps == 4
