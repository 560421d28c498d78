"""The embedded default model: a small SDXL-family base and refiner trained by this project (package data).

`python -m sdxl.lab.recipe` makes them (see its docstring); `default_model.json` beside the weights holds the
native settings and how they were trained.
"""

from __future__ import annotations

import json
from pathlib import Path

from sdxl.errors import SDXLError

ASSETS = Path(__file__).parent / "assets"
NATIVE = {"resolution": 128, "steps": 20, "cfg": 5.0, "refiner_switch": 0.8}


def default_model_paths() -> dict:
    """Paths and native settings of the shipped default model; a clear error while none is installed."""
    base = ASSETS / "default_base.safetensors"
    if not base.is_file():
        raise SDXLError("no --model given and no embedded default model is installed; pass --model PATH "
                        "(a single-file .safetensors or a diffusers folder)")
    refiner = ASSETS / "default_refiner.safetensors"
    info = ASSETS / "default_model.json"
    settings = json.loads(info.read_text()) if info.is_file() else {}
    return {"base": base, "refiner": refiner if refiner.is_file() else None,
            **{k: settings.get(k, v) for k, v in NATIVE.items()}}
