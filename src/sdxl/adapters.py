"""A set of adapters (LoRA, LyCORIS: `sdxl.formats.lora.read_adapter`) on a loaded model, switched between requests
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

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from sdxl.errors import CheckpointError

View = Callable[[torch.Tensor], torch.Tensor]  # a parameter -> the part of it a patch changes (a view)


@dataclass
class _Applied:
    """What `use_adapters` did to one model: the set, and how to undo it."""

    key: tuple  # ((path, te, unet), ...), runtime
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
    is the set already applied. Every file is read and checked before a weight changes; a delta that is not finite
    (overflow) undoes the whole set and raises CheckpointError."""
    from sdxl.formats.lora import read_adapter

    key = (tuple((str(p), float(te), float(unet)) for p, te, unet in uses), runtime)
    if (now := _APPLIED.get(model)) is not None and now.key == key:
        return []
    adapters = [read_adapter(model, path) for path, _, _ in key[0]]
    remove_adapters(model)
    applied = _APPLIED[model] = _Applied(key, adapters)
    try:
        with torch.no_grad():
            for adapter, (_, te, unet) in zip(adapters, key[0]):
                for patch in adapter.patches:
                    _apply(model, applied, patch, unet if patch.component == "unet" else te, runtime)
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


def _apply(model: nn.Module, applied: _Applied, patch, multiplier: float, runtime: bool) -> None:
    """One patch, times its multiplier, rounded to the weight's dtype once; merged into the weight, or stored in
    the weight's parametrization."""
    module, name, view = _target(model, patch.site, patch.param)
    weight = getattr(module, name)  # as changed so far (merged, or its parametrization's value): DoRA reads it
    delta = patch.delta(view(weight)).to(weight.device) * multiplier
    if not bool(torch.isfinite(delta).all()):
        raise CheckpointError(f"{patch.site.path}: the adapter's change overflows (non-finite) at weight {multiplier}")
    delta = delta.to(weight.dtype)
    if not runtime:
        if (module, name) not in applied.backups:
            applied.backups[module, name] = weight.detach().to("cpu", copy=True)
        view(weight).add_(delta)
        return
    if not parametrize.is_parametrized(module, name):
        parametrize.register_parametrization(module, name, _AddDeltas())
        applied.parametrized.append((module, name))
    module.parametrizations[name][0].deltas.append((view, delta))


def _target(model: nn.Module, site, param: str) -> tuple[nn.Module, str, View]:
    """(module, parameter name, view) of the tensor a patch changes (as `sdxl.formats.lora.target`): a layer's
    weight or bias, bigG's q/k/v rows of its fused in_proj, or bigG's text_projection (transposed, as transformers'
    Linear weight)."""
    if site.rows is not None:
        module = model.get_submodule(site.path.removesuffix(".in_proj"))
        width = module.in_proj_weight.shape[1]
        return module, f"in_proj_{param}", lambda w: w[site.rows * width:(site.rows + 1) * width]
    if site.transposed:
        parent, _, name = site.path.rpartition(".")
        return model.get_submodule(parent), name, torch.Tensor.t
    return model.get_submodule(site.path), param, lambda w: w
