"""The memory planner: from a budget (`--memory-budget 6GB`, or `auto`), what each component keeps in memory.

Levels, from most memory to least (the first whose estimate fits the budget is chosen):
resident (everything loaded once), offload (text encoders released once the prompt is encoded, the base and
refiner UNets never loaded together), 8bit (and the UNets' linear and convolution weights stored in 8 bits:
int8 on CPU, fp8 e4m3 on GPUs, one scale per output channel, upcast layer by layer at forward), stream (and the
UNet read layer by layer from the memory-mapped file at each forward, as diffusers' sequential CPU offload).
The same plan drives CPU and GPU: a released component goes back to the file (on CPU its pages leave the process,
madvise DONTNEED; the page cache keeps them warm) and is read again from it when next used.
A1111's `--medvram` and `--lowvram` are the budgets 8GB and 4GB.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from sdxl.errors import SDXLError

GiB = 1 << 30
UNITS = {"gb": GiB, "gib": GiB, "g": GiB, "mb": 1 << 20, "mib": 1 << 20, "m": 1 << 20}
FLAGS = {"medvram": "8GB", "lowvram": "4GB"}  # A1111's levels as budgets
# (level, text encoders offloaded, UNets swapped, UNet weights in 8 bits, UNet streamed from the file)
LEVELS = (("resident", False, False, False, False), ("offload", True, True, False, False),
          ("8bit", True, True, True, False), ("stream", True, True, False, True))
# Working memory besides the weights at 1024x1024, batch 1 with CFG (measured by bench/memory.py, rounded up):
# the process itself (CPU only), UNet activations, VAE decode untiled and tiled, per byte of compute dtype.
OVERHEAD = {"cpu": 0.8 * GiB, "cuda": 0.0}
UNET_WORK, VAE_WORK, VAE_TILED_WORK = 0.6 * GiB, 1.6 * GiB, 0.3 * GiB
STREAM_SHARE = 0.05  # the largest layer's share of a UNet's weights (in bytes), loaded while it runs


def parse_budget(text: str) -> int | None:
    """"6GB", "6GiB", "512MB", "6" (GiB), or a key of FLAGS ("medvram") -> bytes (GB and GiB both mean 2^30);
    "auto" -> None."""
    t = str(FLAGS.get(text, text)).strip().lower().replace(" ", "")
    if t == "auto":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", t)
    if not m or (m.group(2) and m.group(2) not in UNITS) or not 0 < float(m.group(1)) < 1e6:
        raise SDXLError(f"--memory-budget {text!r}: give a size such as 4GB, 6GB, 8GB or 512MB, or auto")
    return int(float(m.group(1)) * UNITS.get(m.group(2), GiB))


def available(device: torch.device) -> int:
    """Free memory now: the GPU's free memory, else the system's MemAvailable (/proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        raise SDXLError("--memory-budget auto: cannot read MemAvailable from /proc/meminfo; give a size, e.g. 8GB") from None


def share(budget: str | None, device, n: int) -> str | None:
    """One of `n` equal shares of a budget (`make_plan`'s forms; auto: the free memory now), e.g. for workers
    sharing a device; None stays None."""
    if budget is None:
        return None
    whole = parse_budget(budget)
    return f"{(available(torch.device(device)) if whole is None else whole) // n >> 20}MB"


@dataclass(frozen=True)
class Sizes:
    """Parameter counts of what a pipeline loads: base and refiner UNets and text encoders, the VAE."""

    unet: int
    text: int
    vae: int
    refiner_unet: int = 0
    refiner_text: int = 0

    @classmethod
    def of_files(cls, model, refiner=None) -> "Sizes":
        """From the files' headers alone (single files; a folder counts as the official sizes)."""
        count = lambda path, prefix: _params(path, prefix, {"model.diffusion_model.": 2_567_463_684,  # noqa: E731
                                                           "conditioner.": 817_720_321, "first_stage_model.": 83_653_863})
        return cls(count(model, "model.diffusion_model."), count(model, "conditioner."), count(model, "first_stage_model."),
                   count(refiner, "model.diffusion_model.") if refiner else 0,
                   count(refiner, "conditioner.") if refiner else 0)


def _params(path, prefix: str, official: dict) -> int:
    from pathlib import Path

    from sdxl.formats.files import SafetensorsFile

    if Path(path).is_dir():
        return official[prefix]
    return sum(math.prod(i.shape) for k, i in SafetensorsFile(path).infos.items() if k.startswith(prefix))


@dataclass(frozen=True)
class Plan:
    """What stays resident, what is released after use, how the UNets' weights are stored; `line()` says it."""

    level: str
    budget: int
    device: str
    offload_text: bool
    swap_unets: bool
    weights: str | None  # "int8" or "fp8": the UNets' weights in 8 bits; None: in the compute dtype
    stream: bool
    vae_tiling: bool | None  # None: automatic (the pipeline tiles above 1024x1024)
    estimate: int  # bytes at 1024x1024

    def line(self) -> str:
        gib = lambda b: f"{b / GiB:.1f} GiB" if b >= GiB else f"{b >> 20} MiB"  # noqa: E731
        parts = [f"memory plan: {self.level} for a budget of {gib(self.budget)} on {self.device}",
                 "text encoders " + ("released after encoding" if self.offload_text else "resident"),
                 "UNet " + ("streamed layer by layer from the file" if self.stream else
                            f"weights in {self.weights}, upcast per layer" if self.weights else "weights in full")
                 + (", base and refiner never loaded together" if self.swap_unets else ""),
                 "VAE " + ("tiled" if self.vae_tiling else "tiled above 1024x1024"),
                 f"estimated peak {gib(self.estimate)} at 1024x1024"
                 + (": over the budget, the least this model can run in" if self.estimate > self.budget else "")]
        return "; ".join(parts)

    def loras_error(self) -> SDXLError:
        """What to raise for LoRAs where this plan releases the weights they would patch in place."""
        return SDXLError(f"LoRAs need the model's weights resident; the memory plan ({self.level}) releases them: "
                         "give a larger --memory-budget or leave it out")

    def lazy(self, path) -> tuple[str, ...]:
        """The key prefixes a loader leaves as placeholders in this file, for `attach` to fill (none in a folder)."""
        from pathlib import Path

        if path is None or Path(path).is_dir():
            return ()
        unet = self.swap_unets or self.stream or self.weights
        return ((("conditioner.",) if self.offload_text else ()) + (("model.diffusion_model.",) if unet else ()))


def estimate(level: tuple, sizes: Sizes, device: torch.device, itemsize: int) -> int:
    """Peak bytes of a level at 1024x1024: the process, what stays loaded, and the largest phase (text encoding,
    a UNet's steps, the VAE decode) with what it loads and its working memory."""
    _, offload_text, swap, eight, stream = level
    unets = (sizes.unet, sizes.refiner_unet)
    text = (sizes.text + sizes.refiner_text) * itemsize
    unet = (max(unets) * itemsize * STREAM_SHARE if stream else max(unets) * (1 if eight else itemsize))
    always = sizes.vae * itemsize + (0 if offload_text else text) + (0 if swap else sum(unets) * itemsize)
    phases = (max(sizes.text, sizes.refiner_text) * itemsize if offload_text else 0,
              (unet if swap else 0) + UNET_WORK, VAE_TILED_WORK if swap else VAE_WORK)
    return int(OVERHEAD.get(device.type, 0) + always + max(phases))


def make_plan(budget: str, sizes: Sizes, device, dtype: torch.dtype) -> Plan:
    """The least-saving level whose estimate fits the budget (`parse_budget`'s forms; auto: the free
    memory now); the last level when none does."""
    device = torch.device(device)
    limit = parse_budget(budget)
    limit = available(device) if limit is None else limit
    itemsize = torch.empty(0, dtype=dtype).element_size()
    need = [estimate(level, sizes, device, itemsize) for level in LEVELS]
    i = next((i for i, n in enumerate(need) if n <= limit), len(LEVELS) - 1)
    return level_plan(LEVELS[i][0], device, limit, need[i])


def level_plan(level: str, device, budget: int = 0, estimate: int = 0) -> Plan:
    """The plan of a named level (one of LEVELS) on a device: 8-bit weights are int8 on CPU, fp8 e4m3 on GPUs."""
    _, offload_text, swap, eight, stream = next(lv for lv in LEVELS if lv[0] == level)
    weights = ("fp8" if torch.device(device).type == "cuda" else "int8") if eight else None
    return Plan(level, budget, str(device), offload_text, swap, weights, stream, True if swap else None, estimate)


# --- carrying out a plan ------------------------------------------------------------------------------------

def quantise(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only 8-bit storage, one scale per output channel (dim 0): int8 (symmetric, round to nearest) or
    fp8 e4m3 (scaled to its largest finite value, 448). Returns (stored, scale in float32, shape (out, 1, ...))."""
    w = w.float()
    top = 127.0 if kind == "int8" else torch.finfo(torch.float8_e4m3fn).max
    scale = w.abs().amax(dim=tuple(range(1, w.ndim)), keepdim=True).clamp(min=1e-12) / top
    q = (w / scale).round().clamp(-top, top).to(torch.int8) if kind == "int8" else (w / scale).to(torch.float8_e4m3fn)
    return q, scale


def dequantise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`quantise`'s inverse in the compute dtype (channels-last for convolution weights)."""
    w = (q.to(dtype) * scale.to(dtype))
    return w.contiguous(memory_format=torch.channels_last) if w.ndim == 4 else w


class Component:
    """One component's weights as a plan keeps them: `mode` "resident", "offload" (all loaded while in use),
    "8bit" (linear and convolution weights stored quantised, upcast per layer) or "stream" (each layer read from
    the file for its forward). `file` maps `prefix + name` to the file's tensors (memory-mapped)."""

    def __init__(self, module: nn.Module, file, prefix: str, mode: str, device, dtype: torch.dtype,
                 weights: str | None = None):
        self.module, self.file, self.prefix, self.mode = module, file, prefix, mode
        self.device, self.dtype, self.weights = torch.device(device), dtype, weights
        self.loaded, self.store = False, {}
        self.paths = {m: n for n, m in module.named_modules() if any(True for _ in m.parameters(recurse=False))}
        self.layers = list(self.paths)
        if mode in ("8bit", "stream"):
            for m in self.layers:
                m.register_forward_pre_hook(lambda m, args: self._layer(m, True))
                m.register_forward_hook(lambda m, args, out: self._layer(m, False))

    def _names(self, m: nn.Module) -> list[tuple[str, str]]:
        """(leaf name, file key) of a layer's own parameters."""
        path = self.paths[m]
        return [(leaf, self.prefix + (f"{path}.{leaf}" if path else leaf)) for leaf, _ in m.named_parameters(recurse=False)]

    def _from_file(self, key: str) -> torch.Tensor:
        from sdxl.formats.checkpoint import convert

        src = self.file[key]
        out = convert(src, self.dtype, self.device, torch.channels_last if src.ndim == 4 else torch.contiguous_format)
        self.file.release([key])
        return out

    def _set(self, m: nn.Module, leaf: str, t: torch.Tensor) -> None:
        m._parameters[leaf] = nn.Parameter(t, requires_grad=False)

    def _quantised(self, m: nn.Module) -> bool:
        return self.mode == "8bit" and isinstance(m, (nn.Linear, nn.Conv2d))

    def _layer(self, m: nn.Module, entering: bool) -> None:
        """Around one layer's forward: its weights made (8-bit: upcast; stream: read from the file), then dropped."""
        from sdxl.formats.checkpoint import placeholder

        if self.mode == "8bit" and not self._quantised(m):
            return
        if self.mode == "8bit":
            q, scale = self.store[m]
            self._set(m, "weight", dequantise(q, scale, self.dtype) if entering else
                      placeholder(q.shape, self.dtype, self.device))
            return
        for leaf, key in self._names(m):
            self._set(m, leaf, self._from_file(key) if entering else placeholder(self.file[key].shape, self.dtype, self.device))

    def load(self) -> None:
        """Make the component usable: its weights from the file (converted once, on all cores); 8-bit: quantised."""
        if self.loaded or self.mode in ("resident", "stream"):
            self.loaded = True
            return

        def one(m: nn.Module) -> None:
            for leaf, key in self._names(m):
                if self._quantised(m) and leaf == "weight":
                    self.store[m] = quantise(self.file[key].to(self.device), self.weights)
                    self.file.release([key])
                else:
                    self._set(m, leaf, self._from_file(key))

        with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool:
            list(pool.map(one, self.layers))
        self.loaded = True

    def unload(self) -> None:
        """Back to placeholders (the file keeps the weights): this component's memory is freed."""
        from sdxl.formats.checkpoint import placeholder

        if self.mode in ("resident", "stream") or not self.loaded:
            return
        for m in self.layers:
            for leaf, p in list(m.named_parameters(recurse=False)):
                self._set(m, leaf, placeholder(p.shape, self.dtype, self.device))
        self.store.clear()
        self.loaded = False
        if self.device.type == "cpu":
            _trim()


def _libc():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _trim() -> None:
    """Hand freed heap memory back to the system (glibc's malloc_trim)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def heap_returns_memory() -> None:
    """glibc: blocks of 1 MiB and more always get their own mapping (mallopt M_MMAP_THRESHOLD), so freed weights and
    temporaries go back to the system. Without it, long-lived 8-bit weights interleaved with freed temporaries on
    the heap measured 2.3x their size in RSS (the dynamic threshold rises to 32 MiB after the first large free)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


class Memory:
    """A plan carried out on a pipeline's components: a component about to run is loaded, and every other
    released component (text encoders, UNets) is unloaded first, so at most one of them is in memory."""

    def __init__(self, plan: Plan, components: list[tuple[str, Component, list[nn.Module]]]):
        self.plan, self.components = plan, {name: c for name, c, _ in components}
        for name, c, entries in components:
            for m in entries:
                m.register_forward_pre_hook(lambda m, args, name=name: self.use(name))

    def use(self, name: str) -> None:
        for other, c in self.components.items():
            if other != name and c.mode != "resident":
                c.unload()
        self.components[name].load()


def attach(pipe, plan: Plan, model_file, refiner_file=None) -> Memory:
    """Carry out `plan` on a pipeline loaded with `plan.lazy()` placeholders from these single files."""
    from pathlib import Path

    from sdxl.formats.files import SafetensorsFile

    if torch.device(pipe.device).type == "cpu" and plan.level != "resident":
        heap_returns_memory()
    unet_mode = "stream" if plan.stream else "8bit" if plan.weights else "offload" if plan.swap_unets else "resident"
    text_mode = "offload" if plan.offload_text else "resident"
    parts = []
    for tag, model, path in (("base", pipe.base, model_file), ("refiner", pipe.refiner, refiner_file)):
        if model is None or Path(path).is_dir():  # a diffusers folder is loaded whole (`Plan.lazy`)
            continue
        f = SafetensorsFile(path)
        unet = Component(model.unet, f, "model.diffusion_model.", unet_mode, pipe.device, pipe.dtype, plan.weights)
        parts.append((f"{tag} UNet", unet, [model.unet]))
        if any(k.startswith("conditioner.") for k in f.infos):  # else the base's encoder, shared
            text = Component(model.conditioner, f, "conditioner.", text_mode, pipe.device, pipe.dtype)
            parts.append((f"{tag} text encoders", text, [e for e in model.conditioner.embedders
                                                          if any(True for _ in e.parameters())]))
    return Memory(plan, parts)
