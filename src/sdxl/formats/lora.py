"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for SDXL: train, save, load, merge.

A LoRA adds `multiplier * (alpha / rank) * up @ down` to a layer's weight. Training wraps
layers in place (`add_lora`); a file is either kohya's format (what A1111 and ComfyUI
read: `lora_unet_<sgm path>`, `lora_te1_`/`lora_te2_<transformers path>`, `.lora_down`,
`.lora_up`, `.alpha`) or diffusers'/PEFT's (`unet.`/`text_encoder.`/`text_encoder_2.`
`<diffusers path>.lora_A`/`.lora_B`). Loading merges into the base weights in place.

Every LoRA-addressable layer of a model is a `Site`, named from the conversion tables in
convert.py: kohya addresses the UNet by our (sgm) paths and the text encoders by
transformers' names, so bigG's fused `in_proj_weight` is three sites, one per q/k/v slice.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable
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
    """Every Linear and Conv2d of the UNet and text encoders, bigG's q/k/v slices and text_projection (convert.py names)."""
    layers = dict(SDXLModel(ModelConfig(cfg.unet, cfg.conditioner, None), device="meta").named_modules())
    out = []
    for component, prefix, table in _component_tables(cfg):
        for e in table:
            if e.op == "copy" and e.ours.endswith(".weight"):
                path = prefix + e.ours.removesuffix(".weight")
                if isinstance(layers.get(path), (nn.Linear, nn.Conv2d)):
                    out.append(Site(path, component, e.theirs[0].removesuffix(".weight")))
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
        if s.component not in chosen or not _matches(s.path, targets) or s.rows not in (None, 0) or s.transposed:
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


# --- loading ---------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What `load_lora` merged: sites per component (bigG's fused q/k/v count as three)."""

    path: Path
    format: str  # kohya | peft | diffusers-old
    multiplier: float
    applied: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))

    @property
    def total(self) -> int:
        return sum(self.applied.values())


# file suffix -> role: kohya, PEFT, then older diffusers names (LoRA layers, text encoder patches)
_ROLES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
          (".lora_A.weight", "down"), (".lora_B.weight", "up"),
          (".lora.down.weight", "down"), (".lora.up.weight", "up"),
          (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"))
# diffusers < 0.21 attention processors: `<attn>.processor.to_q_lora.down.weight` is `<attn>.to_q`
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _split(key: str) -> tuple[str, str] | None:
    """A file key -> (module name, role), or None for a key that is no plain LoRA tensor."""
    if m := _PROCESSOR.match(key):
        return f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else ""), m[3]
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key.removesuffix(suffix), role
    return None


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
    if any(c.get("use_dora") for c in out.values()):
        raise CheckpointError(f"{name}: a DoRA adapter; only plain LoRA is supported")
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


def load_lora(model: SDXLModel, path, multiplier: float = 1.0) -> LoadReport:
    """Merge a LoRA file (kohya, diffusers/PEFT, or older diffusers names; detected from the keys) into the model.

    Adds `multiplier * alpha / rank * up @ down` to each addressed weight. Everything is checked
    before the first weight changes: keys this model does not have, a layer named twice, wrong shapes,
    non-float or non-finite values.
    """
    path = Path(path)
    if path.is_dir():
        path = path / PEFT_FILE
    f = SafetensorsFile(path)  # refuses pickles unread
    name = str(f.path)
    check_float(name, f.dtypes())
    groups = _groups(f, name, _names(model.cfg), model.cfg.architecture)
    fmt = ("kohya" if any(k.startswith("lora_") for k in f) else
           "peft" if any(".lora_A." in k for k in f) else "diffusers-old")
    plan = _plan(model, f, groups, _peft_scales(f.metadata, name), name)
    report = LoadReport(f.path, fmt, float(multiplier))
    with torch.no_grad():
        for site, weight, up, down, scale in plan:
            delta = delta_weight(up.to(weight.device), down.to(weight.device), weight.shape, multiplier * scale)
            if not torch.isfinite(delta).all():
                raise CheckpointError(f"{name}: {site.kohya}: the LoRA product overflows (non-finite)")
            weight.add_(delta.to(weight.dtype))
            report.applied[site.component] += 1
    return report


def _groups(f: SafetensorsFile, name: str, names: dict[str, Site], architecture: str) -> dict[str, dict[str, str]]:
    """File keys by module name and role; every module must address a site of the model, each site only once."""
    groups: dict[str, dict[str, str]] = {}  # module name -> role -> file key
    unsupported = []
    for key in f:
        if (parsed := _split(key)) is None:
            unsupported.append(key)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = key
    if unsupported:
        raise CheckpointError(f"{name}: {len(unsupported)} tensor{'s' if len(unsupported) != 1 else ''} that are no plain LoRA "
                              f"({first_few(unsupported)}); LoHa, LoKr, DoRA and other LyCORIS types are not supported")
    if not groups:
        raise CheckpointError(f"{name}: holds no LoRA tensors")
    unknown = sorted(g for g in groups if g not in names)
    if unknown:
        raise CheckpointError(f"{name}: {len(unknown)} of {len(groups)} LoRA modules address nothing in this "
                              f"{architecture} model ({first_few(unknown)}); is it a LoRA for another model "
                              "(SD 1.x/2.x, the SDXL base vs refiner) or for a component not loaded?")
    spellings: dict[Site, list[str]] = {}
    for module in groups:
        spellings.setdefault(names[module], []).append(module)
    twice = [" and ".join(ms) for ms in spellings.values() if len(ms) > 1]
    if twice:
        raise CheckpointError(f"{name}: {len(twice)} layer{'s' if len(twice) != 1 else ''} listed under two names "
                              f"({first_few(twice)}); merging both would apply them twice: keep one spelling")
    return groups


def _plan(model: SDXLModel, f: SafetensorsFile, groups: dict, peft_cfg: dict, name: str) -> list[tuple]:
    """(site, weight, up, down, scale) per module, after checking shapes and values; an error lists every bad one."""
    names, plan, problems = _names(model.cfg), [], []
    for module, roles in groups.items():
        site = names[module]
        if "down" not in roles or "up" not in roles:
            problems.append(f"{module} lacks lora_{'up' if 'down' in roles else 'down'}")
            continue
        down, up = f[roles["down"]], f[roles["up"]]
        alpha = f[roles["alpha"]] if "alpha" in roles else None
        _, _, layer = _locate(model, site.path.removesuffix(".in_proj") if site.rows is not None else site.path)
        weight = _site_weight(layer, site)
        rank = down.shape[0] if down.ndim else 0
        shape_ok = (down.ndim in (2, 4) and up.ndim == down.ndim and up.shape[2:] in ((), (1, 1))
                    and up.shape[:2] == (weight.shape[0], rank)
                    and down.flatten(1).shape[1] == math.prod(weight.shape[1:])
                    and (down.ndim == 2 or weight.ndim == 2 or down.shape[2:] == weight.shape[2:]))
        if rank == 0 and down.ndim:
            problems.append(f"{module}: rank 0 (lora_down {tuple(down.shape)} is empty)")
        elif not shape_ok:
            problems.append(f"{module}: down {tuple(down.shape)} up {tuple(up.shape)} for a weight {tuple(weight.shape)}")
        elif alpha is not None and alpha.numel() != 1:
            problems.append(f"{module}: alpha holds {alpha.numel()} values, expected one")
        elif not all(bool(torch.isfinite(t.float()).all()) for t in (down, up) + ((alpha,) if alpha is not None else ())):
            problems.append(f"{module}: non-finite (NaN or inf) values")  # float(): isfinite has no float8 kernel
        else:
            scale = (float(alpha.float()) / rank if alpha is not None
                     else _peft_scale(peft_cfg.get(site.component, {}), site.theirs, rank))
            plan.append((site, weight, up, down, scale))
    if problems:
        raise CheckpointError(f"{name}: {len(problems)} bad LoRA module{'s' if len(problems) != 1 else ''}: {first_few(problems)}")
    return plan


def _site_weight(layer: nn.Module, site: Site) -> torch.Tensor:
    """The weight tensor (or bigG's q/k/v row slice of it) that a site's LoRA changes."""
    if isinstance(layer, _WRAPPERS):
        layer = layer.base
    if site.transposed:
        return layer.t()  # a view of the Parameter, shaped as transformers' Linear weight
    if site.rows is None:
        return layer.weight
    w = layer.in_proj_weight.shape[1]
    return layer.in_proj_weight[site.rows * w:(site.rows + 1) * w]  # a view
