"""A set of adapters (LoRA, LyCORIS: `sdxl.adapters.lora.read_adapter`) on a loaded model, switched between requests
without reloading it, in one of two ways:

- merged: each patched weight gets `multiplier * dW` added in place, as A1111 does, after a copy of it is kept in
  CPU memory (A1111's `network_weights_backup`, extensions-builtin/Lora/networks.py); removal copies it back,
  bit-exactly.
- runtime: the weights stay untouched; a `torch.nn.utils.parametrize` parametrization adds the same `dW` each time
  a weight is read in the forward, with the same fp32 -> weight-dtype rounding, so the output equals the merged one;
  removal takes the parametrization off. Meanwhile the state_dict holds such a weight as
  `parametrizations.<name>.original`.

A patch's multiplier is the UNet's for the UNet, the text encoders' for CLIP-L and bigG (A1111's te/unet).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from sdxl.adapters.lora import View, place
from sdxl.adapters.tags import LoraUse
from sdxl.errors import CheckpointError, SDXLError
from sdxl.formats.files import file_stamp


@dataclass
class _Applied:
    """What `use_adapters` did to one model: the set, and how to undo it."""

    key: tuple  # ((path, te, unet), ...), runtime, the files' stamps (file_stamp)
    adapters: list
    backups: dict[tuple[nn.Module, str], torch.Tensor] = field(default_factory=dict)  # merged: originals (CPU)
    parametrized: list[tuple[nn.Module, str]] = field(default_factory=list)  # runtime


_APPLIED: weakref.WeakKeyDictionary[nn.Module, _Applied] = weakref.WeakKeyDictionary()


class _AddDeltas(nn.Module):
    """A parametrization: the weight plus each stored delta, added into its view in order (as merging would)."""

    def __init__(self):
        super().__init__()
        self.deltas: list[tuple[View, torch.Tensor]] = []

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out = weight.clone()
        for view, delta in self.deltas:
            view(out).add_(delta)
        return out


def use_adapters(model: nn.Module, uses: Sequence[tuple[str, float, float]], runtime: bool = False) -> list:
    """Make `uses` ((file, text-encoder multiplier, UNet multiplier), ...) the adapters on `model`, merged or at
    run time; the set applied before is removed first (exactly). Returns the Adapters newly read, [] when `uses`
    is the set already applied and no file of it changed since (`file_stamp`). Every file is read and checked before a
    weight changes; a multiplier that is not finite is refused, a delta that overflows (non-finite in the weight's
    dtype) undoes the whole set and raises CheckpointError naming the file and its weight."""
    from sdxl.adapters.lora import read_adapter

    uses = tuple((str(p), float(te), float(unet)) for p, te, unet in uses)
    if bad := next((u for u in uses if not all(map(math.isfinite, u[1:]))), None):
        raise SDXLError(f"{bad[0]}: the weights {bad[1]}, {bad[2]} must be finite numbers")
    key = (uses, runtime, tuple(file_stamp(p) for p, _, _ in uses))
    if (now := _APPLIED.get(model)) is not None and now.key == key:
        return []
    adapters = [read_adapter(model, path) for path, _, _ in key[0]]
    remove_adapters(model)
    applied = _APPLIED[model] = _Applied(key, adapters)
    try:
        with torch.no_grad():
            for adapter, (path, te, unet) in zip(adapters, key[0]):
                for patch in adapter.patches:
                    w = unet if patch.component == "unet" else te
                    if not _apply(model, applied, patch, w, runtime):
                        raise CheckpointError(f"{path}: its {patch.kind} change of {patch.site.kohya} overflows "
                                              f"(non-finite) at weight {w:g}; use a smaller weight")
    except BaseException:
        remove_adapters(model)
        raise
    return adapters


def remove_adapters(model: nn.Module) -> None:
    """Take every adapter `use_adapters` put on `model` off: the weights are again bit for bit what they were."""
    applied = _APPLIED.pop(model, None)
    if applied is None:
        return
    with torch.no_grad():
        for (module, name), original in applied.backups.items():
            getattr(module, name).copy_(original)
        for module, name in applied.parametrized:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def applied_adapters(model: nn.Module) -> tuple[tuple[str, float, float], ...]:
    """The (file, te, unet) set on `model` now; () when none."""
    applied = _APPLIED.get(model)
    return applied.key[0] if applied else ()


def non_finite_cause(model: nn.Module, what: str) -> SDXLError | None:
    """The error to raise when `what` (sampling) gave NaN/Inf on `model` with adapters applied: they are named
    with their weights as the cause (a LoRA's change at a large weight overflows the activations); None without."""
    if not (uses := applied_adapters(model)):
        return None
    names = ", ".join(f"{path} at weight {te:g}" + (f" (UNet {unet:g})" if unet != te else "")
                      for path, te, unet in uses)
    return SDXLError(f"{what} gave non-finite values (NaN/Inf) with the LoRA(s) {names}: their change overflows; "
                     "lower their weights (or leave them out to check the model alone)")


def _apply(model: nn.Module, applied: _Applied, patch, multiplier: float, runtime: bool) -> bool:
    """One patch, times its multiplier, rounded to the weight's dtype once; merged into the weight, or stored in
    the weight's parametrization. False (nothing changed) where the rounded delta is not finite (overflow)."""
    module, name, view = place(model, patch.site, patch.param)
    weight = getattr(module, name)  # as changed so far (merged, or its parametrization's value): DoRA reads it
    delta = (patch.delta(view(weight)).to(weight.device) * multiplier).to(weight.dtype)
    if not bool(torch.isfinite(view(weight) + delta).all()):  # the delta, or the weight with it, overflows
        return False
    if not runtime:
        if (module, name) not in applied.backups:
            applied.backups[module, name] = weight.detach().to("cpu", copy=True)
        view(weight).add_(delta)
        return True
    if not parametrize.is_parametrized(module, name):
        parametrize.register_parametrization(module, name, _AddDeltas())
        applied.parametrized.append((module, name))
    module.parametrizations[name][0].deltas.append((view, delta))
    return True


def use_loras(pipe, loras: tuple[LoraUse, ...], log=print, runtime: bool = False) -> None:
    """Make `loras` the LoRAs on the pipeline's base without reloading it (`sdxl.adapters.apply.use_adapters`: the set
    before is removed exactly; the same set again costs nothing); each newly applied one reported through `log`."""
    memory = getattr(pipe, "memory", None)
    if loras and memory is not None and any(c.mode != "resident" for c in memory.components.values()):
        raise memory.plan.loras_error()
    applied = use_adapters(pipe.base, [(u.path, u.te, u.unet) for u in loras], runtime)
    for u, adapter in zip(loras, applied):
        weight = f"weight {u.unet}" if u.te == u.unet else f"weight {u.te} text encoders, {u.unet} UNet"
        log(f"LoRA {u.name} ({u.path}): {len(adapter.patches)} layers, {weight}")


def use_embeddings(pipe, folder: str | None, log=print) -> None:
    """The textual-inversion embeddings of `folder` (None: none) for the pipeline's prompts, checked against its
    encoders; the files refused are reported through `log` with the reason. Files are read again only when the
    folder changes (A1111 re-reads its embeddings folder when it changes, too)."""
    from sdxl.adapters.embeddings import load_folder

    found = None
    if folder is not None:
        cond = pipe.base.conditioner.cfg
        found = load_folder(folder, (cond.clip_l.width, cond.bigg.width))
        if found is not pipe.tokenizer.embeddings:
            for name, why in found.skipped.items():
                log(f"embedding {name} skipped: {why}")
            log(f"embeddings {folder}: {', '.join(found.loaded) or 'none'} ({len(found.loaded)} loaded)")
    pipe.tokenizer = pipe.tokenizer.with_embeddings(found)
