"""The models folder in the layout A1111, Forge and ComfyUI users already have, and the pipelines loaded from it.

checkpoints/ (or Stable-diffusion/), loras/ (or Lora/), embeddings/, vae/ (or VAE/). Files are listed by name and
hash; a name from a request is resolved inside its folder only (no `..`, absolute paths or symlinks out). Pickle
files are listed as refused and never loaded. Pipelines load on first use and stay loaded within a memory budget,
least recently used out; a request's LoRAs are applied to the loaded pipeline (sdxl.adapters), never reloading it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from sdxl.adapters.apply import use_embeddings
from sdxl.adapters.tags import PICKLES, find_lora, inside, lora_problem, request_loras
from sdxl.default_model import ASSETS
from sdxl.errors import SDXLError
from sdxl.formats.files import file_stamp
from sdxl.session import Models, device_and_dtype, load_pipeline, resolve_models

# kind -> the folder names that hold it, first match wins (ours, then A1111's)
FOLDERS = {"checkpoints": ("checkpoints", "Stable-diffusion"), "loras": ("loras", "Lora"),
           "embeddings": ("embeddings",), "vae": ("vae", "VAE")}
LOADABLE = (".safetensors",)
DEFAULT = "default"  # the embedded default model's name, listed when the folder has no checkpoint
NO_REFINER = "none"  # a request's refiner "none": no refiner, not even the default model's own


@dataclass(frozen=True)
class ModelFile:
    """One listed file: its name (path inside its folder), A1111-style title "name [hash]" and why it is refused."""

    kind: str
    name: str
    path: Path
    refused: str | None = None

    @property
    def hash(self) -> str:
        from sdxl.formats.png import file_hash

        return file_hash(self.path)[:10] if self.refused is None and self.path.is_file() else ""

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "hash": self.hash, "refused": self.refused}


class ModelsFolder:
    """Listing, name resolution and an LRU of loaded pipelines. Only the worker thread loads; listing is safe from
    any thread."""

    def __init__(self, root: Path | None, device: str | None = None, dtype: str | None = None,
                 budget: int | None = None, plan: str | None = None):
        self.root = Path(root) if root is not None else None
        self.device, self.dtype, self.dtype_why = device_and_dtype(device, dtype)
        self.plan = plan  # a memory budget for the planner (sdxl.memory): it plans one pipeline, so one is loaded
        self.budget = 0 if plan is not None else budget or _default_budget(self.device)
        self.loaded: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # files -> (pipeline, bytes), oldest first
        self.lock = threading.Lock()
        checkpoints = [m for m in self.list("checkpoints") if m.refused is None]
        self.current = checkpoints[0].name if checkpoints else DEFAULT  # A1111's sd_model_checkpoint

    def folder(self, kind: str) -> Path | None:
        """The folder of a kind of file (the first of its names that exists), or None."""
        if self.root is None:
            return None
        return next((self.root / n for n in FOLDERS[kind] if (self.root / n).is_dir()), None)

    def list(self, kind: str) -> list[ModelFile]:
        """The files of a kind, sorted by name; subfolders included, pickles listed as refused. Without a loadable
        checkpoint, the embedded default model is listed as "default"."""
        out = self._files(kind)
        if kind == "checkpoints" and not any(m.refused is None for m in out):
            try:
                out.append(ModelFile(kind, DEFAULT, Path(resolve_models(None, None, True).model)))
            except SDXLError:  # no default model installed
                pass
        return out

    def _files(self, kind: str) -> list[ModelFile]:
        folder = self.folder(kind)
        out = []
        for path in sorted(folder.rglob("*") if folder is not None else ()):
            suffix = path.suffix.lower()
            if not path.is_file() or suffix not in LOADABLE + PICKLES or path.name.startswith("."):
                continue
            if not inside(path, folder):
                continue
            refused = f"{suffix} is a pickle format, never loaded; convert it to .safetensors" \
                if suffix in PICKLES else lora_problem(path) if kind == "loras" \
                else _checkpoint_problem(str(path), file_stamp(path)) if kind == "checkpoints" else None
            out.append(ModelFile(kind, path.relative_to(folder).as_posix(), path, refused))
        return out

    def resolve(self, kind: str, name: str, field: str) -> Path:
        """A listed file by name, stem or title "name [hash]", inside its folder only."""
        clean = name.split(" [")[0].strip() if name.endswith("]") else name.strip()
        if not clean or Path(clean).is_absolute() or ".." in Path(clean).parts or "\\" in clean:
            raise SDXLError(f"{field} {name!r}: give a name listed in {kind}, not a path")
        for m in self.list(kind):
            if clean in (m.name, m.name.rsplit(".", 1)[0]):
                if m.refused:
                    raise SDXLError(f"{field} {name!r}: refused: {m.refused}")
                return m.path
        names = ", ".join(m.name for m in self.list(kind) if not m.refused) or "(none)"
        raise SDXLError(f"{field} {name!r}: no such file in {kind}; choose one of: {names}")

    def switch(self, name: str) -> str:
        """Make a listed checkpoint the current one (A1111's options sd_model_checkpoint); returns its name."""
        path = self.resolve("checkpoints", name, "sd_model_checkpoint")
        self.current = next(m.name for m in self.list("checkpoints") if m.path == path)
        return self.current

    def models(self, model: str | None, refiner: str | None, vae: str | None,
               loras: tuple[tuple[str, float], ...]) -> Models:
        """The files of a request (names resolved here), with the model's native settings. refiner None: the
        model's default (the embedded default model's own refiner); NO_REFINER ("none"): none at all."""
        path = self.resolve("checkpoints", model or self.current, "model")
        path = None if path.parent == ASSETS else str(path)  # the embedded default: its refiner, native settings
        off = refiner is not None and refiner.lower() == NO_REFINER
        ref = str(self.resolve("checkpoints", refiner, "refiner")) if refiner and not off else None
        vae_path = str(self.resolve("vae", vae, "vae")) if vae else None
        specs = [f"{find_lora(n, self.folder('loras'))}:{w}" for n, w in loras]
        embeddings = self.folder("embeddings")
        return resolve_models(path, ref, off, vae_path, specs, str(embeddings) if embeddings else None,
                              lora_dir=self.folder("loras"))

    def check_plan(self, models: Models, req) -> None:
        """With a memory budget: what the plan of `models` refuses for `req` (LoRAs unless resident), at submit
        time; without one nothing is read."""
        if self.plan is not None and request_loras(req, models):
            from sdxl.memory import Sizes, make_plan

            plan = make_plan(self.plan, Sizes.of_files(models.model, models.refiner), self.device, self.dtype)
            if plan.lazy(models.model):  # its weights released (a folder is loaded whole: `attach`)
                raise plan.loras_error()

    def pipeline(self, models: Models, log=print):
        """The loaded pipeline of `models`' checkpoint files, loading it (and unloading the least recently used) as
        needed; without LoRAs (each request applies its own: `sdxl.adapters.apply.use_loras`)."""
        key = (models.model, models.refiner, models.vae)
        with self.lock:
            if key in self.loaded:
                self.loaded.move_to_end(key)
                use_embeddings(self.loaded[key][0], models.embeddings, log)  # the folder as it is now
                return self.loaded[key][0]
            need = sum(_file_size(p) for p in (models.model, models.refiner) if p)
            while self.loaded and sum(size for _, size in self.loaded.values()) + need > self.budget:
                self.loaded.popitem(last=False)
                _free(self.device)
        pipe = load_pipeline(replace(models, loras=()), self.device, self.dtype, log=log, memory_budget=self.plan)
        with self.lock:
            self.loaded[key] = (pipe, _pipeline_bytes(pipe))
        return pipe


@functools.lru_cache(maxsize=1024)
def _checkpoint_problem(path: str, stamp: tuple | None) -> str | None:
    """Why a file in checkpoints/ cannot be a model, else None; `stamp` (files.file_stamp) is the cache key: the
    header is read once per version of the file."""
    from sdxl.formats.checkpoint import inspect

    try:
        info = inspect(path)
    except SDXLError as e:
        return str(e)
    if "unet" not in info["components"]:
        return f"{path}: no UNet in it (a VAE or LoRA file?); put VAEs in vae/ and LoRAs in loras/"
    return None


def _file_size(path: str) -> int:
    p = Path(path)
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _pipeline_bytes(pipe) -> int:
    seen, total = set(), 0
    for m in (pipe.base, pipe.refiner):
        for t in (m.state_dict().values() if m is not None else ()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _default_budget(device: str) -> int:
    """Half of the device's memory (a GPU's, else the machine's)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
