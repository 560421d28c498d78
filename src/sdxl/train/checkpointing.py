"""Training checkpoints that survive a kill at any moment, with nothing pickled.

    DIR/step-000120/trained.safetensors    the trained weights, official key names (LoRA: their wrapper names)
                    optimizer.safetensors  AdamW moments and step per parameter; param_groups as JSON metadata
                    ema.safetensors        EMA of the trained weights (when enabled)
                    rng-rank0.safetensors  python, numpy and torch RNG states of each process
                    state.json             step, data position, counters, config: written last
    DIR/latest                             the newest complete folder's name, e.g. "step-000120"

A checkpoint is written into `DIR/.tmp-step-000120/`, each file flushed to disk, then
renamed into place; only then is `latest` replaced (a temporary file renamed over it). A kill
at any moment leaves `latest` naming a complete checkpoint; leftover temporary folders are
removed by the next save. Loading reads safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sdxl.errors import SDXLError
from sdxl.formats import files
from sdxl.formats.files import fsync as _fsync

_STEP = re.compile(r"step-(\d+)")


def folder_name(step: int) -> str:
    return f"step-{step:06d}"


def latest(output: Path) -> Path | None:
    """The folder `output/latest` names, or None when there is none; an error if it names a missing one."""
    pointer = Path(output) / "latest"
    if not pointer.is_file():
        return None
    folder = Path(output) / pointer.read_text(encoding="utf-8").strip()
    if not (folder / "state.json").is_file():
        raise SDXLError(f"{pointer} names {folder.name}, which is not a complete checkpoint")
    return folder


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file of this run's checkpoint, flushed to disk (files.write_tensors, replacing)."""
    files.write_tensors(path, tensors, metadata, mode="replace")


def write_json(path: Path, obj) -> None:
    files.write_json(path, obj, mode="replace", indent=1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- what goes in: optimizer and RNG state as tensors + JSON --------------------------------------

def optimizer_to_tensors(osd: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's) -> tensors and JSON metadata."""
    tensors, extra = {}, {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{name}/{k}"] = v
            else:
                extra[f"{name}/{k}"] = v
    return tensors, {"param_groups": json.dumps(osd["param_groups"]), "extra": json.dumps(extra)}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    state: dict[str, dict] = {}
    for key, v in tensors.items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    for key, v in json.loads(metadata["extra"]).items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    groups = json.loads(metadata["param_groups"])
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's python, numpy and torch (CPU, CUDA) RNG states."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])])}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# --- save and load ------------------------------------------------------------------------------

def save(output: Path, step: int, trained: dict[str, torch.Tensor], optimizer: dict, ema: dict[str, torch.Tensor] | None,
         state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically and point `latest` at it; every process calls this (each adds its RNG).

    `trained`, `optimizer` and `ema` matter on rank 0 only (full tensors there). Returns the folder.
    """
    output = Path(output)
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = output / folder_name(step)
    current = latest(output)
    if current is not None and current.name == final.name:
        return final  # this very step is already the latest checkpoint (training is deterministic)
    tmp = output / f".tmp-{final.name}"
    if rank == 0:
        for old in output.glob(".tmp-step-*"):  # left by a killed save
            shutil.rmtree(old, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    rng_tensors, rng_meta = rng_state()
    write_tensors(tmp / f"rng-rank{rank}.safetensors", rng_tensors, rng_meta)
    _barrier()
    if rank == 0:
        write_tensors(tmp / "trained.safetensors", trained)
        opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
        write_tensors(tmp / "optimizer.safetensors", opt_tensors, opt_meta)
        if ema is not None:
            write_tensors(tmp / "ema.safetensors", ema)
        write_json(tmp / "state.json", state)  # last: a folder with state.json is complete
        _fsync(tmp)
        if final.exists():  # a complete folder from a run killed before it updated `latest`
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(output)
        files.write_file(output / "latest", lambda tmp: tmp.write_text(final.name + "\n", encoding="utf-8"), "replace")
        prune(output, keep)
    _barrier()
    return final


def prune(output: Path, keep: int) -> None:
    """Delete all but the newest `keep` step folders (never the one `latest` names)."""
    current = latest(output)
    folders = sorted((p for p in output.glob("step-*") if _STEP.fullmatch(p.name)), key=lambda p: p.name)
    for p in folders[:-keep]:
        if current is None or p.name != current.name:
            shutil.rmtree(p, ignore_errors=True)


def load(folder: Path, rank: int) -> dict:
    """A checkpoint's contents: trained, optimizer (state dict), ema (or None), state (JSON), rng (tensors, meta)."""
    folder = Path(folder)

    def read(name: str) -> tuple[dict, dict]:
        f = files.SafetensorsFile(folder / name, fix=None)  # the caller says what to do
        return dict(f), f.metadata

    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    opt_tensors, opt_meta = read("optimizer.safetensors")
    rng_file = folder / f"rng-rank{rank}.safetensors"
    rng = read(rng_file.name if rng_file.is_file() else "rng-rank0.safetensors")
    ema = read("ema.safetensors")[0] if (folder / "ema.safetensors").is_file() else None
    return {"trained": read("trained.safetensors")[0], "ema": ema, "state": state, "rng": rng,
            "optimizer": optimizer_from_tensors(opt_tensors, opt_meta)}
