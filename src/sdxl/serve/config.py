"""The server's settings and request limits, fixed at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each breach is a 422 naming the limit."""

    max_side: int = 4096  # pixels a side (width, height; multiples of 8)
    max_steps: int = 500
    max_images: int = 64  # batch x n_iter
    max_body_bytes: int = 50 * 2**20  # request body (base64 images included)
    max_image_pixels: int = 4096 * 4096  # decoded init image or mask (decompression bombs)
    max_prompt_chars: int = 8192  # each prompt and negative prompt


@dataclass(frozen=True)
class ServeConfig:
    """host/port to bind; models_dir None: the embedded default model; api_auth "USER:PASS" or None."""

    host: str = "127.0.0.1"
    port: int = 7860
    models_dir: Path | None = None
    output_dir: Path = Path("outputs")
    api_auth: str | None = None
    insecure: bool = False
    device: str | None = None  # default: the best available
    dtype: str | None = None  # fp32 | bf16 | fp16; default: as `sdxl generate`
    allowed_hosts: tuple[str, ...] = ()  # more names the Host header may give (a reverse proxy's), any port
    memory_budget: int | None = None  # bytes of loaded pipelines; None: half the device's (or the machine's) memory
    memory_plan: str | None = None  # --memory-budget/--medvram/--lowvram: each pipeline planned (sdxl.memory), one loaded
    workers: int = 1  # worker threads taking jobs from the one queue; each its own GPU when there are several
    limits: Limits = field(default_factory=Limits)

    @property
    def database(self) -> Path:
        return self.output_dir / "jobs.sqlite3"

    def exposed(self) -> bool:
        """Bound beyond this machine (anything but a loopback address)."""
        return self.host not in LOOPBACK
