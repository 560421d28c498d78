"""What a generation leaves behind: PNGs with A1111-compatible `parameters` and a JSON recipe, never overwriting."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path

from PIL import Image, PngImagePlugin

from sdxl.default_model import ASSETS
from sdxl.errors import SDXLError
from sdxl.formats.files import write_file
from sdxl.request import NOT_SETTINGS, Request
from sdxl.sampling.names import to_a1111

RECIPE_KEY = "sdxl-recipe"
DTYPES = ("fp32", "bf16", "fp16")
MODEL_KEY = re.compile(r"model|refiner|vae|unet|lora\d+")


_HASHES: dict[str, str] = {}  # "path|size|mtime" -> sha256, for this process


def file_hash(path: str | os.PathLike, tensors_only: bool = False) -> str:
    """sha256 of a file (A1111's "Model hash" is its first 10 hex digits), or with `tensors_only` of a safetensors
    file's bytes after its header (A1111's LoRA hash: `lora_hash`); cached by path, size and mtime."""
    path = Path(path)
    if path.is_dir():
        return ""
    st = path.stat()
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sdxl" / "hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}" + ("|tensors" if tensors_only else "")
    if key in _HASHES:  # this process hashed or read it already: no second read of the cache file per image
        return _HASHES[key]
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        with open(path, "rb") as f:
            if tensors_only:  # after the 8-byte header length and the JSON header
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            cache[key] = hashlib.file_digest(f, "sha256").hexdigest()
        with contextlib.suppress(OSError):
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            cache_file.write_text(json.dumps(cache))
    _HASHES[key] = cache[key]
    return cache[key]


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's `Lora hashes` entry of a LoRA file: sha256 of the tensor bytes after the safetensors header, first 12
    hex digits (extensions-builtin/Lora/network.py and modules/hashes.py addnet_hash_safetensors, v1.10.1; it
    prefers a `sshs_model_hash` in the metadata, which kohya's sd-scripts computes the same way)."""
    return file_hash(path, tensors_only=True)[:12]


PACKAGED = "sdxl:"  # a recipe's name for a file shipped in the package (the default model): no local path recorded


def portable(path: str) -> str:
    """A model path as a recipe records it: absolute (a replay from another working directory finds it), or
    `sdxl:NAME` for a file shipped in the package."""
    p = Path(path)
    return PACKAGED + p.name if p.is_file() and p.resolve().parent == ASSETS.resolve() else os.path.abspath(path)


def local_path(entry: str) -> str:
    """A recipe's model entry -> a path on this machine (`sdxl:NAME`: the package's own file)."""
    return str(ASSETS / entry[len(PACKAGED):]) if entry.startswith(PACKAGED) else entry


def _model_entry_ok(key: str, entry: str) -> bool:
    """A recipe may name checkpoints only: `sdxl:NAME` of the package, a .safetensors file (a LoRA's with an
    optional `:WEIGHT`), or a diffusers folder; never an arbitrary file to open and hash."""
    from sdxl.adapters.tags import lora_spec

    if entry.startswith(PACKAGED):
        return re.fullmatch(r"[\w.-]+\.safetensors", entry[len(PACKAGED):]) is not None
    path = lora_spec(entry)[0] if key.startswith("lora") else entry
    return path.endswith(".safetensors") or (key in ("model", "refiner") and Path(path).is_dir())


def model_files(models: dict[str, str | None]) -> dict[str, Path]:
    """The files of a model table (model, refiner, vae, unet, lora0, ...) that a recipe hashes and a replay checks:
    a LoRA's without its weight (a diffusers LoRA folder's file)."""
    from sdxl.adapters.lora import adapter_file
    from sdxl.adapters.tags import lora_spec

    out = {k: adapter_file(lora_spec(v)[0]) if k.startswith("lora") else Path(v) for k, v in models.items() if v}
    return {k: p for k, p in out.items() if p.is_file()}


def lora_entry(spec: str, lora_dir: str | None) -> str:
    """A --lora FILE[:WEIGHT] as a recipe records it, to replay from any working directory: `FILE:WEIGHT` with FILE
    relative to the LoRA folder where it lies in it (`lora_dir` is recorded then), else absolute."""
    from sdxl.adapters.lora import adapter_file
    from sdxl.adapters.tags import inside, lora_spec

    path, weight = lora_spec(spec)
    path = adapter_file(path).resolve()
    if lora_dir is not None and inside(path, Path(lora_dir)):
        return f"{path.relative_to(Path(lora_dir).resolve()).as_posix()}:{weight!r}"
    return f"{path}:{weight!r}"


def replay_lora(entry: str, lora_dir: str | None, where: str) -> str:
    """A recipe's LoRA entry -> FILE:WEIGHT here: a relative FILE inside `lora_dir` (the LoRA folder given now,
    else the recorded one) where it is there, else as written (recipes that recorded paths from the working
    directory), else a file of its name in `lora_dir` (the LoRA moved); a file not found is an error."""
    from sdxl.adapters.tags import lora_spec

    path, weight = lora_spec(entry, where)
    folder = Path(lora_dir) if lora_dir else None
    tries = [folder / path] if folder and not Path(path).is_absolute() else []
    tries += [Path(path)] + ([folder / Path(path).name] if folder else [])  # last: a moved file, by its name
    path = str(next((p for p in tries if p.is_file()), path))
    if not Path(path).exists():
        raise SDXLError(f"{where}: the LoRA {path} is not here; give --lora-dir DIR (the folder it is in) or "
                        f"--lora FILE:{weight:g}")
    return f"{path}:{weight!r}"


def recipe(req, models: dict[str, str | None], latent: tuple[str, int | None] | None = None, loras=(),
           lora_dir: str | None = None) -> dict:
    """The JSON recipe of a request: every setting (not images/tensors; the prompt with its <lora:> tags), the model
    files (`lora_entry`) and their hashes, the LoRA folder with its tags' files' hashes (`lora_hash`), and the saved
    latent it started from (file, index, hash), if any."""
    d = {f.name: getattr(req, f.name) for f in fields(req) if f.name not in NOT_SETTINGS}
    d["models"] = {k: lora_entry(v, lora_dir) if k.startswith("lora") else portable(v) for k, v in models.items() if v}
    d["hashes"] = {k: file_hash(p)[:10] for k, p in model_files(models).items()}
    tagged = {u.name: lora_hash(u.path) for u in loras if u.tag}
    if tagged or any(k.startswith("lora") and not Path(v).is_absolute() for k, v in d["models"].items()):
        d["lora_dir"] = str(Path(lora_dir).resolve())
    if tagged:
        d["lora_hashes"] = tagged
    if latent is not None:
        d["latent"] = {"file": str(latent[0]), "index": latent[1], "hash": file_hash(latent[0])[:10]}
    images = {k: image_hash(getattr(req, k)) for k in ("init_image", "mask") if getattr(req, k) is not None}
    if images:
        d["inputs"] = images
    return d


def a1111_parameters(req, models: dict[str, str | None], index: int = 0, embeddings=None, loras=(),
                     run: dict | None = None) -> str:
    """A1111's infotext: prompt, `Negative prompt:`, then `Key: value` pairs (modules/processing.py). As in A1111
    the prompt keeps its `<lora:...>` tags where they were, the --lora files are appended as tags (as A1111's
    sd_lora option does), and `Lora hashes` names every LoRA's `lora_hash` (extra_networks_lora.py); `TI hashes`
    names the textual-inversion embeddings the prompts use (of `embeddings`), likewise."""
    from sdxl.adapters.tags import lora_free, tag_name  # tag_name: without ':' and ',' (extra_networks_lora.py)

    sampler, schedule = to_a1111(req.sampler, req.schedule)
    model, unet, refiner, run = models.get("model"), models.get("unet"), models.get("refiner"), run or {}
    hash_of = lambda path: file_hash(path)[:10] if Path(path).is_file() else None  # noqa: E731
    # the pairs in infotext order; one whose value is None is left out
    pairs = {"Steps": req.steps, "Sampler": sampler, "Schedule type": schedule, "CFG scale": req.cfg,
             "Seed": req.seed + index, "Size": f"{req.width}x{req.height}",
             "Model hash": hash_of(model) if model else None, "Model": Path(model).stem if model else None,
             "UNet": Path(unet).stem if unet else None, "UNet hash": hash_of(unet) if unet else None,  # not in A1111
             "CFG Rescale phi": req.guidance_rescale or None, "Eta": req.eta,
             "DeepCache interval": run.get("fast") or None, "UNet weights": run.get("weights") or None,
             "Prediction": "v" if req.prediction == "v" else None, "Zero terminal SNR": req.zero_terminal_snr or None}
    if req.init_image is not None:  # else the hires fix's own comes later in the line
        pairs["Denoising strength"] = req.strength
    pairs |= {"Mask blur": req.mask_blur if req.mask is not None or req.outpaint is not None else None,
              "Refiner": Path(refiner).stem if refiner else None,
              "Refiner switch at": req.refiner_switch if refiner else None,
              "Refiner strength": req.refiner_strength if refiner else None}
    if req.hires_scale:
        pairs |= {"Hires upscale": req.hires_scale, "Hires upscaler": "Latent" if req.hires_upscale == "latent" else "Lanczos",
                  "Hires steps": req.hires_steps or req.steps, "Denoising strength": req.hires_strength}
    size = (req.height, req.width)
    pairs |= {"Original size": "x".join(map(str, reversed(req.original_size or size))),
              "Crop": f"{req.crop[0]},{req.crop[1]}",
              "Target size": "x".join(map(str, reversed(req.target_size or size))),
              "Batch size": req.batch if req.batch > 1 else None, "Batch pos": index if req.batch > 1 else None}
    if loras:
        pairs["Lora hashes"] = ", ".join(f"{tag_name(u.name)}: {lora_hash(u.path)}" for u in loras)
    if embeddings is not None:  # the texts the encoders saw, without <lora:...> tags
        row = [v if v is None or isinstance(v, str) else v[index] for v in (req.prompt_2, req.negative_prompt,
                                                                              req.negative_prompt_2)]
        texts = [lora_free(req.prompt_of(index)), row[0]] + (row[1:] if req.cfg != 1.0 else [])
        pairs["TI hashes"] = embeddings.infotext(texts)
    text = " ".join(filter(None, [req.prompt_of(index)] + [f"<lora:{tag_name(u.name)}:{u.unet}>" for u in loras if not u.tag]))
    if req.negative_prompt:
        text += f"\nNegative prompt: {req.negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items() if v is not None)


def _quote(v) -> str:
    s = str(v)
    return json.dumps(s, ensure_ascii=False) if ("," in s or ":" in s or "\n" in s) else s


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


@dataclass(frozen=True)
class Recipe:
    """A PNG's recipe, checked: Request settings, model files and hashes, dtype, and the saved latent it used."""

    settings: dict
    models: dict[str, str]
    hashes: dict[str, str]
    dtype: str | None = None
    latent: dict | None = None  # {"file": str, "index": int | None, "hash": str}
    inputs: dict | None = None  # {"init_image": hash, "mask": hash} of the images it started from
    lora_dir: str | None = None  # where the prompt's <lora:NAME> tags were found
    lora_hashes: dict | None = None  # NAME -> lora_hash of the file then
    fast: int = 0  # the run's --fast (DeepCache interval; 0: off)
    weights: str | None = None  # "int8"/"fp8": the UNet weights a memory plan stored in 8 bits
    memory_budget: str | None = None  # the --memory-budget that chose them


def image_hash(image) -> str:
    """The first 10 hex digits of sha256 over an image's size, mode and pixels (what generation reads)."""
    return hashlib.sha256(f"{image.size} {image.mode}".encode() + image.tobytes()).hexdigest()[:10]


def read_recipe(path: str | os.PathLike) -> Recipe:
    """The recipe a PNG of ours carries, every field type-checked; a clear error for other images."""
    from sdxl.images import opened

    with opened(path, "--from-png") as im:
        text = im.info.get(RECIPE_KEY)
    if text is None:
        raise SDXLError(f"{path}: carries no sdxl recipe (only PNGs written by `sdxl generate` do)")
    try:
        d = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        why = str(e) if isinstance(e, _DuplicateKey) else "not valid JSON (or nested too deeply)"
        raise SDXLError(f"{path}: its sdxl recipe is {why}") from None
    return parse_recipe(d, f"{path}: its sdxl recipe")


class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are each given once (a repeated key would silently win over the first)."""
    keys = [k for k, _ in pairs]
    if dup := next((k for k in keys if keys.count(k) > 1), None):
        raise _DuplicateKey(f"ambiguous: the key {dup!r:.40} is given twice")
    return dict(pairs)


def parse_recipe(d, source: str) -> Recipe:
    """A recipe dict -> Recipe; the settings go through Request's rules, the rest is checked here."""
    from sdxl.adapters.tags import lora_spec

    if not isinstance(d, dict):
        raise SDXLError(f"{source} is not a JSON object")
    d = dict(d)
    models, hashes = d.pop("models", {}), d.pop("hashes", {})
    for name, table in (("models", models), ("hashes", hashes)):
        if not isinstance(table, dict):
            raise SDXLError(f"{source}: {name} must be an object, got {table!r:.60}")
        if bad := [k for k, v in table.items() if v is not None and not isinstance(v, str)]:
            raise SDXLError(f"{source}: {name}.{bad[0]:.40} must be a file name (a string), got {table[bad[0]]!r:.60}")
    models = {k: v for k, v in models.items() if v is not None}
    if bad := [k for k in models if not MODEL_KEY.fullmatch(k)]:
        raise SDXLError(f"{source}: unknown model entry {bad[0]!r:.40} (expected model, refiner, vae, unet, lora0, ...)")
    for k in (k for k in models if k.startswith("lora")):  # its weight by the one rule (sdxl.adapters.tags.lora_weight)
        lora_spec(models[k], f"{source}: models.{k}")
    if bad := [k for k, v in models.items() if not _model_entry_ok(k, v)]:
        raise SDXLError(f"{source}: models.{bad[0]} {models[bad[0]]!r:.80} is not a checkpoint name (a .safetensors "
                        "file or a diffusers folder); pass the files with --model/--refiner/--vae/--unet/--lora")
    dtype, latent = d.pop("dtype", None), d.pop("latent", None)
    if dtype is not None and dtype not in DTYPES:
        raise SDXLError(f"{source}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r:.60}")
    if latent is not None and not (isinstance(latent, dict) and isinstance(latent.get("file"), str)
                                   and isinstance(latent.get("hash"), str)
                                   and (latent.get("index") is None or type(latent.get("index")) is int)):
        raise SDXLError(f"{source}: latent must be an object with file, index and hash, got {latent!r:.60}")
    inputs = d.pop("inputs", None)
    if inputs is not None and not (isinstance(inputs, dict) and set(inputs) <= {"init_image", "mask"}
                                   and all(isinstance(v, str) for v in inputs.values())):
        raise SDXLError(f"{source}: inputs must be an object with init_image and mask hashes, got {inputs!r:.60}")
    lora_dir, lora_hashes = d.pop("lora_dir", None), d.pop("lora_hashes", None)
    if not (lora_dir is None or isinstance(lora_dir, str)) or not (lora_hashes is None or (
            isinstance(lora_hashes, dict) and all(isinstance(v, str) for v in lora_hashes.values()))):
        raise SDXLError(f"{source}: lora_dir must be a folder name and lora_hashes an object of NAME: hash")
    for key in ("index", "seed_of_image"):  # which image of the batch this PNG is; informational
        if type(d.pop(key, 0)) is not int:
            raise SDXLError(f"{source}: {key} must be an integer")
    fast, weights, budget = d.pop("fast", 0), d.pop("weights", None), d.pop("memory_budget", None)
    if type(fast) is not int or weights not in (None, "int8", "fp8") or not (budget is None or isinstance(budget, str)):
        raise SDXLError(f"{source}: fast must be an integer, weights int8 or fp8, memory_budget a size such as 6GB")
    return Recipe(Request.fields_from_dict(d, source), models, hashes, dtype, latent, inputs, lora_dir, lora_hashes,
                  fast, weights, budget)
