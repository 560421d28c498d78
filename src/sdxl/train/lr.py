"""The learning-rate schedule of every training loop here (UNet, VAE, judge): linear warm-up, then constant or
a half cosine down to a floor (Loshchilov & Hutter 2017, SGDR without restarts; Goyal et al. 2017 warm-up)."""

from __future__ import annotations

import math


def learning_rate(step: int, steps: int, peak: float, warmup: int = 0, schedule: str = "cosine",
                  floor: float = 0.0) -> float:
    """The rate of 0-based `step` of `steps`: peak * (step + 1) / warmup while warming up, then `peak`
    ("constant") or floor + (peak - floor) * (1 + cos(pi * progress)) / 2 over the steps after warm-up."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
