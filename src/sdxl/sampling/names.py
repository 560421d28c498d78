"""Names of samplers and schedules as users meet them: ours (`SAMPLERS`, `SCHEDULES`) and A1111's display names.
A1111 writes them as two infotext fields ("Sampler: DPM++ 2M, Schedule type: Karras", modules/sd_samplers_kdiffusion.py
and modules/sd_schedulers.py); before v1.9 as one ("DPM++ 2M Karras"). `from_a1111` reads both forms.
"""

from __future__ import annotations

import inspect

from sdxl.errors import SDXLError
from sdxl.sampling.samplers import SAMPLERS
from sdxl.sampling.schedules import SCHEDULES

# Our sampler name -> A1111's display name.
A1111_SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
                  "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
                  "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_sde": "DPM++ SDE", "dpmpp_2s_ancestral": "DPM++ 2S a",
                  "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM", "tcd": "TCD"}
# Our schedule name -> A1111's "Schedule type" ("Leading"/"Trailing" are diffusers' spacings, not A1111's).
A1111_SCHEDULES = {"sgm": "Uniform", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                   "simple": "Simple", "ddim_uniform": "DDIM", "leading": "Leading", "trailing": "Trailing"}
# A1111's "Automatic" schedule type: the sampler's own default, ours is sgm.
DEFAULT_SCHEDULE = "sgm"


def noise_parameter(sampler: str) -> str | None:
    """The keyword of a sampler's amount of fresh noise per step, which a Request's `eta` sets: `eta` of the ancestral,
    SDE and DDIM samplers (k-diffusion), TCD's `gamma` (ComfyUI calls it eta too); None where there is none."""
    params = inspect.signature(SAMPLERS[sampler]).parameters
    return next((p for p in ("eta", "gamma") if p in params), None)


def sampler_help() -> str:
    """The samplers, comma-separated, for --help and errors."""
    return ", ".join(SAMPLERS)


def schedule_help() -> str:
    return ", ".join(SCHEDULES)


def to_a1111(sampler: str, schedule: str) -> tuple[str, str]:
    """(sampler, schedule) -> A1111's ("Sampler", "Schedule type") infotext values."""
    return A1111_SAMPLERS[sampler], A1111_SCHEDULES[schedule]


def from_a1111(name: str, schedule_type: str | None = None) -> tuple[str, str]:
    """A1111's sampler name (new "DPM++ 2M" with a schedule type, or old "DPM++ 2M Karras") -> (sampler, schedule)."""
    samplers = {v.lower(): k for k, v in A1111_SAMPLERS.items()} | {k: k for k in SAMPLERS}
    schedules = {v.lower(): k for k, v in A1111_SCHEDULES.items()} | {k: k for k in SCHEDULES}
    key = name.strip().lower()
    schedule = DEFAULT_SCHEDULE
    if key not in samplers:  # the pre-1.9 form: "<sampler> <schedule>"
        head, _, tail = key.rpartition(" ")
        if head in samplers and tail in ("karras", "exponential"):
            key, schedule = head, tail
        else:
            raise SDXLError(f"unknown sampler {name!r}; choose one of: {', '.join(A1111_SAMPLERS.values())} "
                            f"(or ours: {sampler_help()})")
    if schedule_type is not None and schedule_type.strip().lower() != "automatic":
        if schedule_type.strip().lower() not in schedules:
            raise SDXLError(f"unknown schedule type {schedule_type!r}; choose one of: "
                            f"{', '.join(A1111_SCHEDULES.values())} (or ours: {schedule_help()})")
        schedule = schedules[schedule_type.strip().lower()]
    return samplers[key], schedule
