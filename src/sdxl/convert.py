"""The one table-driven converter between diffusers/transformers tensor names and ours.

Ours are the official single-file names (Stability `sgm`). A table is a list of
`Entry`: one of our tensors, the diffusers tensors it is made of, and how. Every
table is generated from a model config, so it lists exactly the tensors that config
has; the same table converts in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class Entry:
    ours: str  # key inside our component (no `model.diffusion_model.` style prefix)
    theirs: tuple[str, ...]  # diffusers/transformers keys inside their component folder
    op: str = "copy"  # copy | cat0 (theirs concatenated on dim 0) | transpose | conv1x1 | const
    value: float = 0.0  # for op == "const": ours has no diffusers source (e.g. bigG logit_scale)


def _forward(e: Entry, src: list[torch.Tensor]) -> torch.Tensor:
    if e.op == "copy":
        return src[0]
    if e.op == "cat0":
        return torch.cat(src, 0)
    if e.op == "transpose":
        return src[0].t().contiguous()
    if e.op == "conv1x1":  # Linear [o, i] -> Conv2d 1x1 [o, i, 1, 1]
        return src[0].reshape(*src[0].shape, 1, 1)
    raise ValueError(f"unknown op {e.op}")


def _backward(e: Entry, t: torch.Tensor) -> list[torch.Tensor]:
    if e.op == "copy":
        return [t]
    if e.op == "cat0":
        return [c.contiguous() for c in t.chunk(len(e.theirs), 0)]
    if e.op == "transpose":
        return [t.t().contiguous()]
    if e.op == "conv1x1":
        return [t.reshape(t.shape[0], t.shape[1])]
    raise ValueError(f"unknown op {e.op}")


def _check(name: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise CheckpointError.keys(name, missing, unexpected)


def to_ours(table: list[Entry], theirs: dict[str, torch.Tensor], name: str = "state dict",
            ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Convert a diffusers/transformers state dict to our names; strict both ways."""
    used = set()
    missing = [k for e in table for k in e.theirs if k not in theirs]
    unexpected = [k for k in theirs if k not in {k for e in table for k in e.theirs}
                  and not any(k.endswith(s) for s in ignore)]
    _check(name, missing, unexpected)
    out = {}
    for e in table:
        if e.op == "const":
            out[e.ours] = torch.tensor(e.value, dtype=torch.float32)
            continue
        out[e.ours] = _forward(e, [theirs[k] for k in e.theirs])
        used.update(e.theirs)
    return out


def to_theirs(table: list[Entry], ours: dict[str, torch.Tensor], name: str = "state dict") -> dict[str, torch.Tensor]:
    """Convert our state dict to diffusers/transformers names (const entries are dropped)."""
    known = {e.ours for e in table}
    _check(name, [e.ours for e in table if e.ours not in ours], [k for k in ours if k not in known])
    out = {}
    for e in table:
        if e.op == "const":
            continue
        for k, t in zip(e.theirs, _backward(e, ours[e.ours])):
            out[k] = t
    return out
