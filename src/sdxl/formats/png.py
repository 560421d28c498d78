"""What a generation leaves behind: PNGs with A1111-compatible `parameters` and a JSON recipe, never overwriting."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import fields
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdxl.errors import SDXLError
from sdxl.formats.files import candidates, write_file

RECIPE_KEY = "sdxl-recipe"
# Our names -> the names A1111 writes in its infotext (modules/sd_samplers_kdiffusion.py, sd_schedulers.py).
A1111_SAMPLERS = {"euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
                  "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE",
                  "dpmpp_3m_sde": "DPM++ 3M SDE", "dpmpp_sde": "DPM++ SDE", "dpmpp_2s_ancestral": "DPM++ 2S a",
                  "ddim": "DDIM", "uni_pc": "UniPC"}
A1111_SCHEDULES = {"sgm": "Uniform", "karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform",
                   "simple": "Simple", "ddim_uniform": "DDIM", "leading": "Leading", "trailing": "Trailing"}
# Request fields that are images or tensors: not part of a JSON recipe.
NOT_IN_RECIPE = ("init_image", "mask", "init_latent")


def next_free(path: str | os.PathLike) -> Path:
    """The name `write_file(path, ..., mode="free")` would take now: `path`, else stem-1.png, stem-2.png, ...

    Only a preview: another process may take it before it is written; writers use write_file."""
    return next(c for c in candidates(path) if not c.exists())


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file (A1111's "Model hash" is its first 10 hex digits); cached by path, size and mtime."""
    path = Path(path)
    if path.is_dir():
        return ""
    st = path.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl" / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        cache[key] = h.hexdigest()
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
        except OSError:
            pass
    return cache[key]


def recipe(req, models: dict[str, str | None]) -> dict:
    """The JSON recipe of a request: every field but images/tensors, plus the model files and their hashes."""
    d = {k: v for k, v in request_dict(req).items() if k not in NOT_IN_RECIPE}
    d["models"] = {k: v for k, v in models.items() if v}
    d["hashes"] = {k: file_hash(v)[:10] for k, v in models.items() if v and Path(v).is_file()}
    return d


def request_dict(req) -> dict:
    """A Request's fields, shallow (images and tensors stay objects)."""
    return {f.name: getattr(req, f.name) for f in fields(req)}


def a1111_parameters(req, models: dict[str, str | None], index: int = 0) -> str:
    """A1111's infotext: prompt, `Negative prompt:`, then `Key: value` pairs (modules/processing.py)."""
    pairs = {"Steps": req.steps, "Sampler": A1111_SAMPLERS[req.sampler], "Schedule type": A1111_SCHEDULES[req.schedule],
             "CFG scale": req.cfg, "Seed": req.seed + index, "Size": f"{req.width}x{req.height}"}
    model = models.get("model")
    if model:
        pairs["Model hash"] = file_hash(model)[:10] if Path(model).is_file() else None
        pairs["Model"] = Path(model).stem
    if req.guidance_rescale:
        pairs["CFG Rescale phi"] = req.guidance_rescale
    if req.init_image is not None:
        pairs["Denoising strength"] = req.strength
    if models.get("refiner"):
        pairs["Refiner"] = Path(models["refiner"]).stem
        if req.refiner_switch is not None:
            pairs["Refiner switch at"] = req.refiner_switch
        if req.refiner_strength is not None:
            pairs["Refiner strength"] = req.refiner_strength
    if req.hires_scale:
        pairs |= {"Hires upscale": req.hires_scale, "Hires upscaler": "Latent" if req.hires_upscale == "latent" else "Lanczos",
                  "Hires steps": req.hires_steps or req.steps, "Denoising strength": req.hires_strength}
    h, w = req.height, req.width
    pairs["Original size"] = "x".join(map(str, reversed(req.original_size or (h, w))))
    pairs["Crop"] = f"{req.crop[0]},{req.crop[1]}"
    pairs["Target size"] = "x".join(map(str, reversed(req.target_size or (h, w))))
    if req.batch > 1:
        pairs |= {"Batch size": req.batch, "Batch pos": index}
    text = req.prompt
    if req.negative_prompt:
        text += f"\nNegative prompt: {req.negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items() if v is not None)


def _quote(v) -> str:
    s = str(v)
    return json.dumps(s) if ("," in s or ":" in s or "\n" in s) else s


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str, recipe_: dict) -> Path:
    """Write a PNG with `parameters` and the recipe as text chunks, at `path` or the next free name (never replacing)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    info.add_text(RECIPE_KEY, json.dumps(recipe_))
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SDXLError(f"{path.parent}: cannot create the folder ({e.strerror})") from None
    return write_file(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), mode="free")


def read_recipe(path: str | os.PathLike) -> dict:
    """The recipe a PNG of ours carries; a clear error for other images."""
    try:
        with Image.open(path) as im:
            text = im.info.get(RECIPE_KEY)
    except FileNotFoundError:
        raise SDXLError(f"{path}: no such file") from None
    except OSError:
        raise SDXLError(f"{path}: not a readable image") from None
    if text is None:
        raise SDXLError(f"{path}: carries no sdxl recipe (only PNGs written by `sdxl generate` do)")
    try:
        return json.loads(text)
    except ValueError:
        raise SDXLError(f"{path}: its sdxl recipe is not valid JSON") from None


def request_fields_from_recipe(d: dict, request_cls) -> dict:
    """Recipe dict -> keyword arguments for Request (lists back to tuples)."""
    names = {f.name for f in fields(request_cls)}
    out = {}
    for k, v in d.items():
        if k in names:
            out[k] = tuple(v) if isinstance(v, list) else v
    return out

