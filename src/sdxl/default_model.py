"""The embedded default model: a small SDXL-family base and refiner trained by this project (package data)."""

from __future__ import annotations

from pathlib import Path

from .errors import SDXLError

ASSETS = Path(__file__).parent / "assets"


def default_model_paths() -> dict:
    """Paths and native settings of the shipped default model; a clear error while none is shipped."""
    base = ASSETS / "default_base.safetensors"
    if not base.is_file():
        raise SDXLError("no --model given and no embedded default model is installed; pass --model PATH "
                        "(a single-file .safetensors or a diffusers folder)")
    refiner = ASSETS / "default_refiner.safetensors"
    return {"base": base, "refiner": refiner if refiner.is_file() else None, "refiner_switch": 0.8,
            "resolution": 256, "steps": 20, "cfg": 5.0}
