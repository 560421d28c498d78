"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and LyCORIS adapters for SDXL.

Training wraps layers in place (`add_lora`) and saves kohya's format (what A1111 and ComfyUI
read: `lora_unet_<sgm path>`, `lora_te1_`/`lora_te2_<transformers path>`, `.lora_down`, `.lora_up`,
`.alpha`) or diffusers'/PEFT's (`unet.`/`text_encoder.`/`text_encoder_2.` `<diffusers path>.lora_A`/`.lora_B`).
Loading is two steps: `read_adapter` checks a file (any kind in `KINDS`, optionally DoRA) and gives
one `Patch` per changed tensor, whose `delta(W)` is the full dW; `load_lora` merges them in place.

Every adapter-addressable layer of a model is a `Site`, named from the conversion tables in
convert.py: kohya addresses the UNet by our (sgm) paths and the text encoders by
transformers' names, so bigG's fused `in_proj_weight` is three sites, one per q/k/v slice.
"""
from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.errors import CheckpointError, SDXLError, first_few
from sdxl.formats.convert import bigg_table, clip_l_table, unet_table
from sdxl.formats.checkpoint import check_float
from sdxl.formats.files import SafetensorsFile, write_tensors
from sdxl.models.model import PREFIXES, ModelConfig, SDXLModel
from sdxl.models.text_encoders import MultiheadSelfAttention

# What kohya's sd-scripts trains by default (networks/lora.py: every Linear in a Transformer2DModel,
# CLIPAttention, CLIPMLP), as suffixes of our module paths; bigG's fused q/k/v is `attn.in_proj`.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "in_proj", "c_fc", "c_proj")
DEFAULT_TARGETS = UNET_TARGETS + TEXT_TARGETS
# Add these for a LoCon-style LoRA that also trains the ResBlock and resampling convolutions.
CONV_TARGETS = ("in_layers.2", "out_layers.3", "skip_connection", "op", "conv")

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # diffusers' names: CLIP-L, bigG
_KOHYA_TE = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
PEFT_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights(folder) reads


# --- the modules ---------------------------------------------------------------------------------

class FusedRows(nn.Module):
    """Rows [start, stop) of bigG's fused in_proj as a Linear that owns nothing (the weights stay in the attention)."""

    def __init__(self, attn: MultiheadSelfAttention, index: int):
        super().__init__()
        object.__setattr__(self, "attn", attn)  # not registered as a child: no second path to the same tensors
        w = attn.in_proj_weight.shape[1]
        self.rows = slice(index * w, (index + 1) * w)

    @property
    def weight(self) -> torch.Tensor:
        return self.attn.in_proj_weight[self.rows]  # a view: merging into it changes in_proj_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.attn.in_proj_bias[self.rows])


class LoRA(nn.Module):
    """`base(x) + up(down(x)) * (alpha / rank) * multiplier` around one Linear or Conv2d; a fresh one is a no-op."""

    def __init__(self, base: nn.Linear | nn.Conv2d | FusedRows, rank: int, alpha: float | None = None,
                 multiplier: float = 1.0, dtype: torch.dtype | None = None):
        super().__init__()
        if rank < 1:
            raise SDXLError(f"LoRA rank must be at least 1, got {rank}")
        self.base = base
        self.rank, self.multiplier = rank, float(multiplier)
        self.alpha = float(rank if alpha is None else alpha)
        w = base.weight
        kw = dict(device=w.device, dtype=dtype or w.dtype)
        if isinstance(base, nn.Conv2d):
            if base.groups != 1:
                raise SDXLError("LoRA on a grouped convolution is not supported")
            # down: the base's kernel, stride and padding; up: 1x1 (kohya LoCon, PEFT Conv2d)
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False, padding_mode=base.padding_mode, **kw)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw)
        elif isinstance(base, (nn.Linear, FusedRows)):
            self.lora_down = nn.Linear(w.shape[1], rank, bias=False, **kw)
            self.lora_up = nn.Linear(rank, w.shape[0], bias=False, **kw)
        else:
            raise SDXLError(f"LoRA wraps nn.Linear or nn.Conv2d, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's and PEFT's init
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """What the LoRA adds to the base layer's output."""
        h = self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype)))  # LoRA weights may be fp32 on a bf16 base
        return (h * (self.scale * self.multiplier)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)

    def delta_weight(self) -> torch.Tensor:
        """multiplier * scale * up @ down in float32, shaped as the base weight."""
        return delta_weight(self.lora_up.weight, self.lora_down.weight, self.base.weight.shape,
                            self.scale * self.multiplier)

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the LoRA into the base weight; returns the base layer to put back in place of this wrapper."""
        w = self.base.weight
        w.add_(self.delta_weight().to(device=w.device, dtype=w.dtype))
        return self.base


class FusedQKVLoRA(nn.Module):
    """LoRA on bigG's `MultiheadSelfAttention`: one pair each on the q, k, v slices of its fused in_proj.

    kohya and diffusers address them as transformers' q_proj/k_proj/v_proj; out_proj is a plain
    Linear inside `base` and takes an ordinary `LoRA`.
    """

    def __init__(self, base: MultiheadSelfAttention, rank: int, alpha: float | None = None,
                 multiplier: float = 1.0, dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.q_proj, self.k_proj, self.v_proj = (LoRA(FusedRows(base, i), rank, alpha, multiplier, dtype)
                                                 for i in range(3))

    @property
    def pairs(self) -> tuple[LoRA, LoRA, LoRA]:
        return self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.base  # MultiheadSelfAttention.forward with the three LoRA deltas added to the fused projection
        qkv = F.linear(x, a.in_proj_weight, a.in_proj_bias) + torch.cat([p.delta(x) for p in self.pairs], dim=-1)
        return a.attend(qkv)

    @torch.no_grad()
    def merge(self) -> MultiheadSelfAttention:
        for p in self.pairs:
            p.merge()
        return self.base


_WRAPPERS = (LoRA, FusedQKVLoRA)


def delta_weight(up: torch.Tensor, down: torch.Tensor, shape: torch.Size | tuple, scale: float) -> torch.Tensor:
    """scale * up @ down as a weight of `shape`, float32; up (out, r[, 1, 1]), down (r, in[, kh, kw]).

    A 1x1 up after a kh x kw down is the kh x kw convolution with weight up @ down (per input tap).
    """
    return ((up.flatten(1).float() @ down.flatten(1).float()) * scale).reshape(shape)


# --- where a LoRA can go, and its names ----------------------------------------------------------

@dataclass(frozen=True)
class Site:
    """One layer a LoRA can address: our module path and its diffusers/transformers name."""

    path: str  # module path in SDXLModel; bigG's fused q/k/v projection is `...attn.in_proj`
    component: str  # "unet", "text_encoder" (CLIP-L) or "text_encoder_2" (bigG), as in diffusers
    theirs: str  # the diffusers/transformers module path inside that component
    rows: int | None = None  # bigG in_proj only: 0 q, 1 k, 2 v
    transposed: bool = False  # bigG text_projection: open_clip's (width, proj) Parameter is transformers' Linear.weight.T
    norm: bool = False  # a LayerNorm or GroupNorm: LyCORIS `w_norm`/`b_norm` (and full diffs) only, never a LoRA

    @property
    def kohya(self) -> str:
        """kohya sd-scripts' SDXL name: the UNet by its sgm path, the text encoders by transformers' names."""
        if self.component == "unet":
            return "lora_unet_" + self.path.removeprefix(PREFIXES["unet"]).replace(".", "_")
        return _KOHYA_TE[self.component] + self.theirs.replace(".", "_")

    @property
    def peft(self) -> str:
        """diffusers' name (`StableDiffusionXLPipeline.save_lora_weights`)."""
        return f"{self.component}.{self.theirs}"


def _component_tables(cfg: ModelConfig):
    """(component, our key prefix, conversion table) for each component of `cfg` a LoRA can address."""
    if cfg.unet is not None:
        yield "unet", PREFIXES["unet"], unet_table(cfg.unet)
    if cfg.conditioner is not None:
        c = cfg.conditioner
        if c.clip_l is not None:
            yield "text_encoder", "conditioner.embedders.0.", clip_l_table(c.clip_l)
        yield "text_encoder_2", f"conditioner.embedders.{1 if c.clip_l else 0}.", bigg_table(c.bigg)


@functools.lru_cache(maxsize=8)
def sites(cfg: ModelConfig) -> tuple[Site, ...]:
    """Every Linear, Conv2d and norm layer of the UNet and text encoders, bigG's q/k/v slices and text_projection
    (convert.py names)."""
    layers = dict(SDXLModel(ModelConfig(cfg.unet, cfg.conditioner, None), device="meta").named_modules())
    out = []
    for component, prefix, table in _component_tables(cfg):
        for e in table:
            if e.op == "copy" and e.ours.endswith(".weight"):
                path = prefix + e.ours.removesuffix(".weight")
                if isinstance(layers.get(path), (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)):
                    out.append(Site(path, component, e.theirs[0].removesuffix(".weight"),
                                    norm=isinstance(layers[path], (nn.LayerNorm, nn.GroupNorm))))
            elif e.op == "cat0" and e.ours.endswith("in_proj_weight"):  # bigG: q, k, v stacked on dim 0
                path = prefix + e.ours.removesuffix("_weight")
                out += [Site(path, component, t.removesuffix(".weight"), i) for i, t in enumerate(e.theirs)]
            elif e.op == "transpose":  # bigG text_projection (kohya: lora_te2_text_projection)
                out.append(Site(prefix + e.ours, component, e.theirs[0].removesuffix(".weight"), transposed=True))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _names(cfg: ModelConfig) -> dict[str, Site]:
    """Every module name a LoRA file may use for each site of `cfg`."""
    single_te = "text_encoder" if cfg.conditioner is not None and cfg.conditioner.clip_l else "text_encoder_2"
    out: dict[str, Site] = {}
    for s in sites(cfg):
        names = [s.kohya, s.peft]
        if s.component == "unet":
            # diffusers names without the `unet.` prefix, and in kohya spelling (both read by ComfyUI)
            names += [s.theirs, "lora_unet_" + s.theirs.replace(".", "_")]
        else:
            names.append(f"{s.component}.{s.theirs.removeprefix('text_model.')}")  # transformers 5 drops text_model.
        if s.component == single_te:  # `lora_te_`: one-encoder files (SD 1.x style), read as ComfyUI does
            names.append("lora_te_" + s.theirs.replace(".", "_"))
        for n in names:
            assert out.get(n, s) == s, f"two LoRA sites named {n}"
            out[n] = s
    return out


def _matches(path: str, targets: Iterable[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


def _locate(model: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute, module) at our module path, looking through LoRA wrappers."""
    parent, m = None, model
    for name in path.split("."):
        if isinstance(m, _WRAPPERS):
            m = m.base
        parent, m = m, getattr(m, name)
    return parent, name, m


# --- training: wrap, collect, merge --------------------------------------------------------------

def add_lora(model: SDXLModel, rank: int = 16, alpha: float | None = None, unet: bool = True,
             text_encoders: bool = False, targets: Iterable[str] = DEFAULT_TARGETS,
             dtype: torch.dtype | None = None) -> list[nn.Parameter]:
    """Wrap the target layers in `LoRA`s in place; returns the new trainable parameters (nothing else is changed).

    `targets`: suffixes of our module paths (sgm / open_clip names). `alpha` None means alpha = rank
    (scale 1). `dtype`: the LoRA weights' (default: each base layer's), e.g. fp32 LoRA on a bf16 model.
    """
    targets = tuple(targets)
    chosen = {"unet"} if unet else set()
    if text_encoders:
        chosen |= {"text_encoder", "text_encoder_2"}
    wrapped: list[nn.Module] = []
    for s in sites(model.cfg):
        if (s.component not in chosen or not _matches(s.path, targets) or s.rows not in (None, 0) or s.transposed
                or s.norm):
            continue
        path = s.path.removesuffix(".in_proj") if s.rows is not None else s.path
        parent, name, layer = _locate(model, path)
        if isinstance(layer, _WRAPPERS):
            raise SDXLError(f"{path} already has a LoRA; merge_lora(model) first, or build a fresh model")
        wrapper = (FusedQKVLoRA if s.rows is not None else LoRA)(layer, rank, alpha, dtype=dtype)
        setattr(parent, name, wrapper)
        wrapped.append(wrapper)
    if not wrapped:
        raise SDXLError(f"add_lora: no layer of this model matches the targets {targets} in {sorted(chosen)}")
    pairs = [p for w in wrapped for p in (w.pairs if isinstance(w, FusedQKVLoRA) else (w,))]
    return [w for p in pairs for w in (p.lora_down.weight, p.lora_up.weight)]


def lora_modules(model: nn.Module) -> list[tuple[Site, LoRA]]:
    """The model's LoRA wrappers with their sites (a fused bigG wrapper gives three: q, k, v)."""
    by_path = {(s.path, s.rows): s for s in sites(model.cfg)}
    out = []
    for name, m in model.named_modules():
        path = name.replace(".base.", ".")  # a layer inside a wrapped module (bigG's out_proj)
        if isinstance(m, FusedQKVLoRA):
            out += [(by_path[(path + ".in_proj", i)], p) for i, p in enumerate(m.pairs)]
        elif isinstance(m, LoRA) and not isinstance(m.base, FusedRows):
            out.append((by_path[(path, None)], m))
    return out


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA wrapper into its base weight (times its multiplier) and put the plain layer back.

    Afterwards the model's state_dict has the official keys again; returns the number of sites merged.
    """
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, _WRAPPERS) and not isinstance(getattr(child, "base", None), FusedRows)]
    for parent, name, wrapper in found:
        setattr(parent, name, wrapper.merge())
    return sum(3 if isinstance(w, FusedQKVLoRA) else 1 for _, _, w in found)


# --- saving ----------------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module, format: str = "kohya") -> dict[str, torch.Tensor]:
    """The model's LoRA weights by file name: kohya (`lora_down`/`lora_up`/`alpha`) or peft (`lora_A`/`lora_B`).

    PEFT files carry no alpha (diffusers reads them as alpha = rank), so alpha / rank is folded into lora_B.
    """
    if format not in ("kohya", "peft"):
        raise SDXLError(f"unknown LoRA format {format!r}: use 'kohya' or 'peft'")
    out = {}
    for s, m in lora_modules(model):
        down, up = m.lora_down.weight.detach(), m.lora_up.weight.detach()
        if format == "kohya":
            out[f"{s.kohya}.lora_down.weight"] = down.contiguous()
            out[f"{s.kohya}.lora_up.weight"] = up.contiguous()
            out[f"{s.kohya}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
        else:
            out[f"{s.peft}.lora_A.weight"] = down.contiguous()
            out[f"{s.peft}.lora_B.weight"] = (up.float() * m.scale).to(up.dtype).contiguous()
    return out


def save_lora(model: nn.Module, path, format: str = "kohya", metadata: dict | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Write the model's LoRA as safetensors; atomic, never overwrites. A peft `path` may be a folder (-> PEFT_FILE)."""
    path = Path(path)
    if path.is_dir():
        if format != "peft":
            raise SDXLError(f"{path}: is a folder; give the LoRA file's name")
        path = path / PEFT_FILE
    state = {k: v.cpu() for k, v in lora_state_dict(model, format).items()}
    if not state:
        raise SDXLError("the model has no LoRA layers to save: call add_lora first")
    if dtype is not None:
        state = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in state.items()}
    meta = {}
    if format == "kohya":
        mods = [m for _, m in lora_modules(model)]
        meta["ss_network_module"] = "networks.lora"
        if len({(m.rank, m.alpha) for m in mods}) == 1:
            meta |= {"ss_network_dim": str(mods[0].rank), "ss_network_alpha": f"{mods[0].alpha:g}"}
    meta |= {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return write_tensors(path, state, meta, mode="new")


# --- adapter kinds: each a small function giving dW -------------------------------------------------
# The math of the LyCORIS reference (KohakuBlueleaf/LyCORIS at f49d30d670591ec8841d241d79aaa8449b30a715,
# lycoris/modules/{locon,loha,lokr,ia3,full,norms}.py and lycoris/functional/) and of PEFT's DoRA layer
# (peft/tuners/lora/dora.py). Each function gets the file's tensors by role (float32) and the base weight
# (float32), and returns dW at multiplier 1 before alpha / rank scaling, shaped as the weight.

class _Misfit(ValueError):
    """An adapter's tensors do not fit the layer they address."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Misfit(what)


def _fit(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A (out, in*kh*kw) product as a weight of w's shape (kernel taps last, as Conv2d stores them)."""
    _need(d.shape[0] == w.shape[0] and d.numel() == w.numel() and d.ndim in (2, w.ndim), "")
    return d.reshape(w.shape)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Core (r, r, kh, kw) times wa (r, out), wb (r, in) -> (out, in, kh, kw); functional/general.py rebuild_tucker."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t, wa, wb)


def _lora(t: dict, w: torch.Tensor) -> torch.Tensor:
    """up @ down; up (out, r[, 1, 1]), down (r, in[, kh, kw]); a 1x1 up after a kh x kw down (LoCon) is one conv.
    LoCon with a Tucker core `lora_mid` (r, r, kh, kw) between 1x1 down and up: functional/locon.py diff_weight."""
    up, down = t["up"], t["down"]
    if "mid" in t:
        _need(up.ndim == down.ndim == 4 and up.shape[2:] == down.shape[2:] == (1, 1), "")
        return _fit(_tucker(t["mid"], up.flatten(1).T, down.flatten(1)), w)
    _need(down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[2:] in ((), (1, 1)) and up.shape[1] == down.shape[0]
          and (down.ndim == 2 or w.ndim == 2 or down.shape[2:] == w.shape[2:]), "")
    return _fit(up.flatten(1) @ down.flatten(1), w)


def _loha(t: dict, w: torch.Tensor) -> torch.Tensor:
    """LoHa (Hyeon-Woo et al. 2022): (w1a @ w1b) * (w2a @ w2b), or with Tucker cores t1, t2 (loha.py)."""
    w1, w2 = ((_tucker(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]) if f"hada_t{i}" in t
               else t[f"hada_w{i}_a"] @ t[f"hada_w{i}_b"]) for i in (1, 2))
    _need(w1.shape == w2.shape, "")
    return _fit(w1 * w2, w)


def _lokr(t: dict, w: torch.Tensor) -> torch.Tensor:
    """LoKr (Yeh et al. 2023): kron(w1, w2), each factor full or a product, w2 optionally Tucker (lokr.py).

    alpha / rank is applied once, as in functional/lokr.py diff_weight, PEFT, A1111 and ComfyUI (lokr.py's
    module get_diff_weight multiplies by it twice).
    """
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = (t["lokr_w2"] if "lokr_w2" in t else _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]) if "lokr_t2" in t
          else t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1))
    _need(w1.ndim == 2, "")
    d = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.ndim - 2)), w2.contiguous())  # (a*c, b*d[, kh, kw])
    return d if d.shape == w.shape else _fit(d, w)


def _ia3(t: dict, w: torch.Tensor) -> torch.Tensor:
    """(IA)^3 (Liu et al. 2022): W scaled per output channel, or per input channel with on_input (ia3.py)."""
    axis, v = int(bool(t.get("on_input", 0))), t["weight"]
    _need(v.numel() == w.shape[axis], "")
    return w * v.reshape([-1 if i == axis else 1 for i in range(w.ndim)])


def _diff(role: str):
    """The file's tensor is dW itself: full.py `diff`/`diff_b`, norms.py `w_norm`/`b_norm`."""
    def diff(t: dict, w: torch.Tensor) -> torch.Tensor | None:
        if role not in t:
            return None
        _need(t[role].shape == w.shape, "")
        return t[role]
    return diff


def _dora(magnitude: torch.Tensor, peft: bool, d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """DoRA (Liu et al. 2024, eq. 5): m * (W + dW) / ||W + dW|| - W.

    The norm is per output channel (PEFT's `lora_magnitude_vector`: (out,) for Linear, (1, out, 1, 1) for
    Conv2d; LyCORIS' `dora_scale` (out, 1[, 1, 1]), its default wd_on_out) or per input channel
    (`dora_scale` (1, in[, 1, 1]), LyCORIS' wd_on_out=False); eps as LyCORIS base.py apply_weight_decompose.
    """
    axis = 1 if not peft and magnitude.ndim >= 2 and magnitude.shape[0] == 1 and w.shape[0] != 1 else 0
    v = w + d
    norm = torch.linalg.vector_norm(v, dim=[i for i in range(v.ndim) if i != axis], keepdim=True)
    _need(magnitude.numel() == v.shape[axis], f"DoRA magnitude {tuple(magnitude.shape)} for a weight {tuple(w.shape)}")
    return magnitude.reshape(norm.shape) * v / (norm + torch.finfo(torch.float32).eps) - w


@dataclass(frozen=True)
class Kind:
    """One adapter type: the roles that name it, those it needs and may have, dW for weight and bias, and the
    rank alpha divides by."""

    roles: frozenset  # a module is this kind if it has any of these
    weight: Callable  # (tensors by role, base weight) -> dW (or None)
    bias: Callable | None = None  # (tensors by role, base bias) -> dB (or None)
    rank: Callable = lambda t: None  # None: no alpha / rank scale
    needs: tuple = ()  # each: alternatives (|) of role sets (+)
    optional: frozenset = frozenset()  # besides these and alpha, a module may have nothing else

    def allowed(self) -> set:
        return {*self.roles, *re.split(r"[|+]", "|".join(self.needs)), *self.optional, "alpha"}


_DORA = {"dora_scale", "magnitude"}
KINDS = {
    "lora": Kind(frozenset({"down", "up"}), _lora, rank=lambda t: t["down"].shape[0], needs=("down", "up"),
                 optional=frozenset({"mid", *_DORA})),
    "loha": Kind(frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}), _loha,
                 rank=lambda t: t["hada_w1_b"].shape[0], needs=("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
                 optional=frozenset({"hada_t1", "hada_t2", *_DORA})),
    # scaled only with a decomposed factor: LyCORIS lokr.py uses alpha = lora_dim when w1 and w2 are both full
    "lokr": Kind(frozenset({"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}), _lokr,
                 rank=lambda t: next((t[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in t), None),
                 needs=("lokr_w1|lokr_w1_a+lokr_w1_b", "lokr_w2|lokr_w2_a+lokr_w2_b"),
                 optional=frozenset({"lokr_t2", *_DORA})),
    "ia3": Kind(frozenset({"on_input"}), _ia3, needs=("weight",)),
    "full": Kind(frozenset({"diff", "diff_b"}), _diff("diff"), _diff("diff_b")),
    "norm": Kind(frozenset({"w_norm", "b_norm"}), _diff("w_norm"), _diff("b_norm")),
}
# key suffixes of other LyCORIS types, refused by name
_UNSUPPORTED = {".oft_blocks": "OFT/BOFT", ".oft_diag": "OFT", ".a1.weight": "GLoRA", ".b1.weight": "GLoRA"}
_SCALARS = ("alpha", "on_input")  # read as numbers
_SHOWN = {"down": "lora_down", "up": "lora_up"}  # how a missing role is named


# --- loading ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Patch:
    """One tensor an adapter changes: `delta(W)` is the full dW (W's shape, float32, multiplier 1, alpha / rank
    scaling included) given the current base tensor W (`target(model, p.site, p.param)`); DoRA needs W's values."""

    site: Site
    component: str  # as site.component: which multiplier applies
    delta: Callable[[torch.Tensor], torch.Tensor]
    param: str = "weight"  # or "bias"
    kind: str = "lora"  # a key of KINDS
    dora: bool = False  # weight-decomposed (DoRA)


@dataclass
class Adapter:
    """A checked adapter file: its patches, and per component the modules skipped (layers this model lacks)."""

    path: Path
    format: str  # naming: kohya | peft | diffusers-old
    patches: list[Patch]
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class LoadReport:
    """What `load_lora` merged: sites per component (bigG's fused q/k/v count as three), and what it skipped."""

    path: Path
    format: str  # kohya | peft | diffusers-old
    multiplier: float
    applied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    skipped: dict[str, int] = field(default_factory=dict)
    te_multiplier: float | None = None
    kinds: dict[str, int] = field(default_factory=dict)  # modules per kind (lora, loha, ...), DoRA as "+dora"

    @property
    def total(self) -> int:
        return sum(self.applied.values())


# file suffix -> role: kohya, PEFT, then older diffusers names (LoRA layers, text encoder patches)
_ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"),
          (".lora_A.weight", "down"), (".lora_B.weight", "up"),
          (".lora.down.weight", "down"), (".lora.up.weight", "up"), (".lora_mid.weight", "mid"),
          (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
          (".lora_magnitude_vector.weight", "magnitude"), (".lora_magnitude_vector", "magnitude"))
_LAST = {*(r for k in KINDS.values() for r in k.roles), *_SCALARS, "weight", "dora_scale", "hada_t1", "hada_t2",
         "lokr_w1_b", "lokr_w2_b", "lokr_t2"}  # LyCORIS: `<module>.<role>`
# diffusers < 0.21 attention processors: `<attn>.processor.to_q_lora.down.weight` is `<attn>.to_q`
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _split(key: str) -> tuple[str, str] | None:
    """A file key -> (module name, role), or None for a key that is no adapter tensor."""
    if m := _PROCESSOR.match(key):
        return f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else ""), m[3]
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), role
    module, _, role = key.rpartition(".")
    return (module, role) if module and role in _LAST else None


def _peft_scales(meta: dict[str, str], name: str) -> dict[str, dict]:
    """diffusers' `lora_adapter_metadata` (a LoraConfig per component, keys `unet.lora_alpha` ...), by component."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
        assert isinstance(flat, dict)
    except (ValueError, AssertionError, RecursionError):
        raise CheckpointError(f"{name}: corrupt lora_adapter_metadata (not a JSON object)") from None
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, key = k.rpartition(".")
        out.setdefault(comp, {})[key] = v
    for comp, c in out.items():
        _check_peft_config(c, f"{name}: lora_adapter_metadata {comp}")
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_peft_config(c: dict, where: str) -> None:
    """The LoraConfig fields `_peft_scale` reads: numbers, and an alpha_pattern of valid regular expressions."""
    if "lora_alpha" in c and not _number(c["lora_alpha"]):
        raise CheckpointError(f"{where}: lora_alpha = {c['lora_alpha']!r} is not a number")
    pattern = c.get("alpha_pattern") or {}
    if not isinstance(pattern, dict) or not all(_number(v) for v in pattern.values()):
        raise CheckpointError(f"{where}: alpha_pattern = {pattern!r} is not an object of numbers")
    for p in pattern:
        try:
            re.compile(p)
        except re.error as e:
            raise CheckpointError(f"{where}: alpha_pattern key {p!r} is not a valid regular expression ({e})") from None


def _peft_scale(config: dict, theirs: str, rank: int) -> float:
    """alpha / rank (or alpha / sqrt(rank) with rsLoRA) from a PEFT LoraConfig; alpha_pattern keys match name suffixes."""
    alpha = config.get("lora_alpha", rank)
    for pattern, a in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", theirs):
            alpha = a
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


View = Callable[[torch.Tensor], torch.Tensor]  # a parameter -> the part of it a patch changes (a view)


def place(model: nn.Module, site: Site, param: str = "weight") -> tuple[nn.Module, str, View]:
    """(module, parameter name, view) of the tensor a patch changes: a layer's weight or bias (through a training
    LoRA wrapper), bigG's q/k/v rows of its fused in_proj, or bigG's text_projection (open_clip's (width, proj)
    Parameter, transposed: transformers' Linear.weight)."""
    parent, name, layer = _locate(model, site.path.removesuffix(".in_proj") if site.rows is not None else site.path)
    if site.transposed:
        return parent, name, torch.Tensor.t
    layer = layer.base if isinstance(layer, _WRAPPERS) else layer
    if site.rows is None:
        return layer, param, lambda w: w
    width = layer.in_proj_weight.shape[1]
    return layer, f"in_proj_{param}", lambda w: w[site.rows * width:(site.rows + 1) * width]


def target(model: nn.Module, site: Site, param: str = "weight") -> torch.Tensor | None:
    """The live tensor a patch changes (`place`'s view of it), or None (no bias there)."""
    if site.transposed and param != "weight":
        return None
    module, name, view = place(model, site, param)
    return None if getattr(module, name) is None else view(getattr(module, name))


def adapter_file(path) -> Path:
    """The file an adapter path means: itself, or a diffusers LoRA folder's `PEFT_FILE`."""
    return Path(path) / PEFT_FILE if Path(path).is_dir() else Path(path)


def read_adapter(model: SDXLModel, path) -> Adapter:
    """Parse and check an adapter file (LoRA/LoCon, LoHa, LoKr, (IA)^3, full diff, norm, each with optional DoRA;
    kohya, PEFT or older diffusers names, detected from the keys) for `model`; changes nothing.

    Everything is checked here: keys that are no adapter, a layer named twice, a file for another
    architecture, shapes (each patch is evaluated on the meta device), non-float or non-finite values.
    Modules for layers this model does not have are skipped with one warning.
    """
    f = SafetensorsFile(adapter_file(path))  # refuses pickles unread
    name = str(f.path)
    check_float(name, {k: d for k, d in f.dtypes().items() if not k.endswith(".on_input")})  # (IA)^3's flag: an int
    groups, skipped = _groups(f, name, model.cfg)
    fmt = ("kohya" if any(k.startswith("lora_") for k in f) else
           "diffusers-old" if any(".processor." in k or ".lora_linear_layer." in k or ".lora.down." in k for k in f)
           else "peft")
    patches = _patches(model, f, groups, _peft_scales(f.metadata, name), name)
    return Adapter(f.path, fmt, patches, skipped)


def load_lora(model: SDXLModel, path, multiplier: float = 1.0, te_multiplier: float | None = None) -> LoadReport:
    """Merge an adapter file into the model: W += multiplier * dW per patch (`read_adapter` checks it all first).

    UNet layers get `multiplier`, text-encoder layers `te_multiplier` (default: `multiplier`).
    """
    te = multiplier if te_multiplier is None else te_multiplier
    if not (math.isfinite(multiplier) and math.isfinite(te)):
        raise SDXLError(f"{path}: the weights {multiplier}, {te} must be finite numbers")
    adapter = read_adapter(model, path)
    report = LoadReport(adapter.path, adapter.format, float(multiplier), skipped=adapter.skipped,
                        te_multiplier=None if te_multiplier is None else float(te_multiplier))
    with torch.no_grad():
        for p in adapter.patches:
            w = target(model, p.site, p.param)
            delta = p.delta(w) * (multiplier if p.component == "unet" else te)
            if not torch.isfinite(delta).all():
                raise CheckpointError(f"{adapter.path}: {p.site.kohya}: the {p.kind} product overflows (non-finite) "
                                      f"at weight {multiplier if p.component == 'unet' else te}")
            w.add_(delta.to(w.dtype))
    for site, kind in {(p.site, p.kind + "+dora" * p.dora) for p in adapter.patches}:  # one per module
        report.applied[site.component] += 1
        report.kinds[kind] = report.kinds.get(kind, 0) + 1
    return report


# kohya / diffusers name prefixes -> component, for modules that address nothing in this model
_PREFIX_COMPONENT = (("lora_unet_", "unet"), ("unet.", "unet"), ("lora_te1_", "text_encoder"),
                     ("lora_te2_", "text_encoder_2"), ("text_encoder.", "text_encoder"),
                     ("text_encoder_2.", "text_encoder_2"), ("lora_te_", "text_encoder"))
# module names only other architectures have (SD 1.x/2.x attend at the first level, which SDXL does not)
_FOREIGN = ((re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), "Flux"),
            (re.compile(r"joint_blocks|context_block|lora_te3_|^transformer\.transformer_blocks"), "SD3"),
            (re.compile(r"down_blocks[._]0[._]attentions|up_blocks[._]3[._]attentions|input_blocks_[12]_1_"
                        r"|output_blocks_(9|10|11)_1_"), "SD 1.x/2.x"))
_SD_CONTEXT = {768: "SD 1.x", 1024: "SD 2.x"}  # the cross-attention context width: attn2.to_k's input


def _component(module: str) -> str:
    return next((c for p, c in _PREFIX_COMPONENT if module.startswith(p)), "unet" if "blocks" in module else "other")


def _foreign(f: SafetensorsFile, unknown: list[str], cfg: ModelConfig) -> str | None:
    """The architecture a file is for, from module names this model lacks; None if it may be for this one."""
    for pattern, arch in _FOREIGN:
        if any(pattern.search(m) for m in unknown):
            if arch == "SD 1.x/2.x":
                widths = {s[1] for k, s in f.shapes().items()
                          if "attn2" in k and "to_k" in k and _split(k)[1] == "down"}
                arch = _SD_CONTEXT.get(next(iter(widths), 0), arch) if len(widths) == 1 else arch
            return arch
    if (cfg.conditioner is not None and cfg.conditioner.clip_l is None
            and any(_component(m) == "text_encoder" and not m.startswith("lora_te_") for m in unknown)):
        return "the SDXL base (it has CLIP-L modules; this model has no CLIP-L)"
    return None


def _modules(f: SafetensorsFile, name: str) -> dict[str, dict[str, str]]:
    """A file's keys by module name (role -> key), whatever the model; CheckpointError for keys that are no adapter
    tensor, a LyCORIS kind not supported, or no adapter tensor at all."""
    if other := sorted({t for suffix, t in _UNSUPPORTED.items() if any(k.endswith(suffix) for k in f)}):
        raise CheckpointError(f"{name}: a LyCORIS {other[0]} adapter, which is not supported (supported: "
                              f"{', '.join(KINDS)}, DoRA)")
    groups, unsupported = {}, []
    for key in f:
        parsed = _split(key)
        if parsed is None or parsed[1] == "weight" and f"{parsed[0]}.on_input" not in f:  # (IA)^3 has both
            unsupported.append(key)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = key
    if unsupported:
        one = len(unsupported) == 1
        raise CheckpointError(f"{name}: {len(unsupported)} tensor{'' if one else 's'} whose name{'' if one else 's'} "
                              f"match{'es' if one else ''} no adapter weights ({first_few(unsupported)}); supported: "
                              f"{', '.join(KINDS)}, DoRA")
    if not groups:
        raise CheckpointError(f"{name}: holds no LoRA tensors")
    return groups


def adapter_problem(path) -> str | None:
    """Why an adapter file cannot be used by any model (unreadable, not safetensors, no adapter tensors), read
    from its header alone; None when it may be used (`read_adapter` checks the rest against a model)."""
    try:
        _modules(f := SafetensorsFile(adapter_file(path)), str(f.path))
    except SDXLError as e:
        return str(e)
    return None


def _groups(f: SafetensorsFile, name: str, cfg: ModelConfig) -> tuple[dict[Site, tuple[str, dict]], dict[str, int]]:
    """File keys by site: (module name, role -> key); and modules skipped per component (layers this model lacks)."""
    names, groups = _names(cfg), _modules(f, name)
    unknown = sorted(g for g in groups if g not in names)
    if unknown and (arch := _foreign(f, unknown, cfg)):
        raise CheckpointError(f"{name}: an adapter for {arch}, not this {cfg.architecture} model "
                              f"(modules such as {first_few(unknown, 2)})")
    if len(unknown) == len(groups):
        raise CheckpointError(f"{name}: none of its {len(groups)} modules address this {cfg.architecture} model "
                              f"({first_few(unknown)}); is it an adapter for another model?")
    skipped = {c: n for c in (*COMPONENTS, "other") if (n := sum(_component(m) == c for m in unknown))}
    if unknown:
        warnings.warn(f"{name}: skipped {len(unknown)} module{'s' if len(unknown) != 1 else ''} for layers this "
                      f"{cfg.architecture} model does not have ({', '.join(f'{c}: {n}' for c, n in skipped.items())}; "
                      f"{first_few(unknown)})", stacklevel=3)
    by_site: dict[Site, list[str]] = {}
    for module in groups:
        if module in names:
            by_site.setdefault(names[module], []).append(module)
    twice = [" and ".join(ms) for ms in by_site.values() if len(ms) > 1]
    if twice:
        raise CheckpointError(f"{name}: {len(twice)} layer{'s' if len(twice) != 1 else ''} listed under two names "
                              f"({first_few(twice)}); merging both would apply them twice: keep one spelling")
    return {s: (ms[0], groups[ms[0]]) for s, ms in by_site.items()}, skipped


def _kind(roles: dict) -> tuple[str | None, str]:
    """(the kind a module's roles name, "") or (None, what is wrong: a missing tensor, no known kind)."""
    kind = next((k for k, spec in KINDS.items() if spec.roles & roles.keys()), None)
    if kind is None:
        return None, f": no adapter kind has the tensors {', '.join(sorted(roles))}"
    for need in KINDS[kind].needs:
        if not any(set(alt.split("+")) <= roles.keys() for alt in need.split("|")):
            return None, f" lacks {' or '.join(_SHOWN.get(a, a).replace('+', ' and ') for a in need.split('|'))}"
    if extra := sorted(roles.keys() - KINDS[kind].allowed()):
        return None, f": {kind} with tensors of another kind ({', '.join(extra)})"
    return kind, ""


def _patches(model: SDXLModel, f: SafetensorsFile, groups: dict, peft_cfg: dict, name: str) -> list[Patch]:
    """The patches of every module, after checking each on the meta device; an error lists every bad module."""
    patches, problems = [], []
    for site, (module, roles) in groups.items():
        kind, problem = _kind(roles)
        t = {r: f[k] for r, k in roles.items()} if kind else {}
        if problem:
            problems.append(module + problem)
        elif bad := [r for r in _SCALARS if r in t and t[r].numel() != 1]:
            problems.append(f"{module}: {bad[0]} holds {t[bad[0]].numel()} values, expected one")
        elif not all(bool(torch.isfinite(v.float()).all()) for v in t.values()):  # float(): no float8 isfinite kernel
            problems.append(f"{module}: non-finite (NaN or inf) values")
        else:
            try:
                patches += _module_patches(model, site, kind, t, peft_cfg)
            except (_Misfit, RuntimeError) as e:  # RuntimeError: factors torch cannot multiply
                shapes = " ".join(f"{r} {tuple(v.shape)}" for r, v in t.items() if r not in _SCALARS)
                problems.append(f"{module}: {e}" if isinstance(e, _Misfit) and str(e)
                                else f"{module}: {shapes} for a weight {tuple(target(model, site).shape)}")
    if problems:
        raise CheckpointError(f"{name}: {len(problems)} bad adapter module{'s' if len(problems) != 1 else ''}: "
                              f"{first_few(problems)}")
    return patches


def _module_patches(model: SDXLModel, site: Site, kind: str, t: dict, peft_cfg: dict) -> list[Patch]:
    """A module's weight and bias patches; each is run once on meta tensors, so a misfit raises here, not mid-merge."""
    t = dict(t)
    spec, scalars = KINDS[kind], {r: float(t.pop(r).float()) for r in _SCALARS if r in t}
    magnitude = t.pop("magnitude", None)
    peft = magnitude is not None
    magnitude = t.pop("dora_scale", magnitude)
    rank = spec.rank(t)
    _need(rank != 0, f"rank 0 ({kind} factors are empty)")
    # alpha 0 or none means alpha = rank (kohya, LyCORIS); a plain LoRA's may be in diffusers' metadata
    scale = (1.0 if rank is None else scalars["alpha"] / rank if scalars.get("alpha")
             else _peft_scale(peft_cfg.get(site.component, {}), site.theirs, rank) if kind == "lora" else 1.0)

    def delta(param, w: torch.Tensor) -> torch.Tensor | None:
        ts = {r: v.to(w.device, torch.float32) for r, v in t.items()} | scalars
        w = w.float()
        d = (spec.weight if param == "weight" else spec.bias)(ts, w)
        if d is not None and param == "weight" and magnitude is not None:
            return _dora(magnitude.to(w.device, torch.float32), peft, d * scale, w)
        return None if d is None else d * scale

    out = []
    for param in ("weight", "bias") if spec.bias else ("weight",):
        w = target(model, site, param)
        if w is None:
            _need(not {"diff_b", "b_norm"} & t.keys(), "the layer has no bias")
            continue
        d = delta(param, torch.empty(w.shape, device="meta"))
        if d is not None:
            _need(d.shape == w.shape, "")
            out.append(Patch(site, site.component, functools.partial(delta, param), param, kind, magnitude is not None))
    return out
