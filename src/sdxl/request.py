"""A generation request: every setting that determines an image, and the one set of rules that checks it.

Whatever the source (CLI flags, a PNG's recipe, an HTTP request), settings become one immutable `Request`
and `Request.validate` runs once, before anything big is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from sdxl.errors import SDXLError
from sdxl.sampling import samplers as samplers_
from sdxl.sampling import schedules


@dataclass(frozen=True)
class Request:
    """Everything that determines an image; the same Request and weights give the same image."""

    prompt: str | tuple[str, ...]  # one for every image, or one per image (len = batch)
    negative_prompt: str = ""
    prompt_2: str | None = None  # for the bigG encoder; default: the same prompt
    negative_prompt_2: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 40
    sampler: str = "euler"
    schedule: str = "sgm"
    cfg: float = 5.0
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # fraction of the schedule where CFG applies
    seed: int = 0
    batch: int = 1
    # micro-conditioning (SDXL report §2.2); None: (height, width), (0, 0), (height, width)
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # refiner only (sgm defaults)
    negative_aesthetic_score: float = 2.5
    # img2img / inpainting
    init_image: Image.Image | None = field(default=None, compare=False)
    strength: float = 1.0
    mask: Image.Image | None = field(default=None, compare=False)
    init_latent: torch.Tensor | None = field(default=None, compare=False)  # a saved base latent to refine
    outpaint: tuple[int, int, int, int] | None = None  # pad the init image (left, top, right, bottom) and paint there
    # refiner: hand-off at a fraction of one schedule (ensemble of experts), or SDEdit afterwards
    refiner_switch: float | None = None
    refiner_strength: float | None = None
    refiner_steps: int | None = None
    # hires fix
    hires_scale: float | None = None
    hires_upscale: str = "latent"  # latent | pixel
    hires_strength: float = 0.5
    hires_steps: int | None = None

    def validate(self, has_refiner: bool) -> None:
        if self.width % 8 or self.height % 8 or self.width <= 0 or self.height <= 0:
            raise SDXLError(f"width and height must be positive multiples of 8, got {self.width}x{self.height}")
        if self.sampler not in samplers_.SAMPLERS:
            raise SDXLError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(samplers_.SAMPLERS)}")
        if self.schedule not in schedules.SCHEDULES:
            raise SDXLError(f"unknown scheduler {self.schedule!r}; choose one of: {', '.join(schedules.SCHEDULES)}")
        for name in ("strength", "hires_strength", "refiner_switch", "refiner_strength"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise SDXLError(f"{name.replace('_', '-')} must be in [0, 1], got {v}")
        if self.steps < 1 or self.batch < 1:
            raise SDXLError(f"steps and batch must be at least 1, got {self.steps} and {self.batch}")
        if (self.refiner_switch is not None or self.refiner_strength is not None) and not has_refiner:
            raise SDXLError("a refiner switch or strength was given but no refiner is loaded (--refiner PATH)")
        if self.mask is not None and self.init_image is None:
            raise SDXLError("a mask needs an init image (--init-image)")
