"""Where a checkpoint gets read and written: single-file safetensors, diffusers folders, standalone VAEs.

Files are recognised by their bytes, never by their names; pickles (`.ckpt`, `.pt`,
`.bin`, or renamed) are refused and never unpickled. Safetensors files are read through
files.py (the safetensors library's validation, memory-mapped: a tensor's bytes are read
when it is used). Models are built on the meta device and materialised straight from the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdxl.models import conditioning
from sdxl.models import text_encoders
from sdxl.models import unet
from sdxl.models import vae
from sdxl.formats.convert import Entry, check, to_ours, to_theirs, unet_table
from sdxl.formats.convert import IGNORE as TEXT_IGNORE
from sdxl.formats.convert import bigg_table, clip_l_table, vae_table
from sdxl.errors import CheckpointError, first_few
from sdxl.formats.files import DTYPES, SafetensorsFile, write_json, write_tensors  # noqa: F401 (re-exported)
from sdxl.models.model import PREFIXES, ModelConfig, SDXLModel

# Tolerated and ignored: an int buffer some released files carry (docs/formats.md §1).
IGNORED_SUFFIXES = ("embeddings.position_ids",)
# Empty tensors kohya and ComfyUI write into a single file to say how its UNet was trained: "v_pred" (v-prediction),
# and with it "ztsnr" (zero terminal SNR); ComfyUI comfy/supported_models.py `SDXL.model_type` (c4d1a8d3567a).
MARKERS = ("v_pred", "ztsnr")


def sampling_of(keys) -> dict:
    """The ModelConfig fields `prediction` and `zero_terminal_snr` that a single file's marker keys say."""
    v = "v_pred" in keys
    return {"prediction": "v" if v else "epsilon", "zero_terminal_snr": v and "ztsnr" in keys}


def sampling_settings(path) -> dict:
    """{"prediction", "zero_terminal_snr"} of a checkpoint, from a single file's marker keys (header only) or a
    diffusers folder's scheduler_config.json (`prediction_type`, `rescale_betas_zero_snr`); {} if unreadable (the
    load that follows says why)."""
    path = Path(path)
    try:
        if path.is_file():
            return sampling_of(SafetensorsFile(path).shapes())
        sched = _read_json(path / "scheduler" / "scheduler_config.json")
    except CheckpointError:
        return {}
    return {"prediction": "v" if sched.get("prediction_type") == "v_prediction" else "epsilon",
            "zero_terminal_snr": sched.get("rescale_betas_zero_snr") is True}


def markers_of(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The marker tensors a single file of this config carries (`sampling_of` reads them back)."""
    keys = (("v_pred",) if cfg.prediction == "v" else ()) + (("ztsnr",) if cfg.zero_terminal_snr else ())
    return {k: torch.zeros(0) for k in keys}


# --- single-file checkpoints ------------------------------------------------------------------

def _sub(shapes: Mapping, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], name: str = "checkpoint") -> ModelConfig:
    """Detect the architecture of a single-file checkpoint from its tensor names and shapes alone."""
    u, c, v = (_sub(shapes, PREFIXES[k]) for k in ("unet", "conditioner", "vae"))
    if any(k.startswith("cond_stage_model.") for k in shapes) and not c:
        raise CheckpointError(f"{name}: a Stable Diffusion 1.x/2.x checkpoint (cond_stage_model.*), not SDXL")
    if not (u or c or v):
        if any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in shapes):
            raise CheckpointError(f"{name}: one component of a diffusers folder; pass the folder that holds model_index.json")
        raise CheckpointError(f"{name}: unknown architecture: no key starts with model.diffusion_model., conditioner. or "
                              f"first_stage_model. (keys: {first_few(shapes)})")
    first = tuple(u.get("input_blocks.0.0.weight", (0, 0, 3, 3)))
    if len(first) != 4 or first[2:] != (3, 3):
        raise CheckpointError(f"{name}: {PREFIXES['unet']}input_blocks.0.0.weight has shape {first}, but the UNet's first "
                              "convolution is (channels, in_channels, 3, 3): a corrupt or transposed checkpoint")
    try:
        unet_cfg = unet.config_from_shapes(u) if u else None
        cond_cfg = _conditioner_config(c, unet_cfg) if c else None
        vae_cfg = vae.config_from_shapes(_sub(v, "")) if v else None
        cfg = ModelConfig(unet_cfg, cond_cfg, vae_cfg)
        expected_shapes(cfg)  # builds it (on meta): shapes no SDXL-family model has fail here
    except (KeyError, ValueError, StopIteration, IndexError, ZeroDivisionError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{name}: unknown architecture: not an SDXL-family layout ({type(e).__name__}: {e})") from None
    return cfg


def _conditioner_config(c: dict, unet_cfg) -> conditioning.ConditionerConfig:
    """Base: embedders.0 = CLIP-L (HF names), embedders.1 = bigG; refiner: embedders.0 = bigG (open_clip names)."""
    base = any(k.startswith("embedders.0.transformer.") for k in c)
    clip_l = text_encoders.config_from_shapes(_sub(c, "embedders.0."), "clip") if base else None
    bigg = text_encoders.config_from_shapes(_sub(c, f"embedders.{int(base)}."), "openclip")
    return conditioning.conditioner_config(clip_l, bigg, unet_cfg and unet_cfg.adm_in_channels)


@functools.lru_cache(maxsize=8)
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape a checkpoint of this config holds (built on the meta device; do not modify)."""
    with skip_init():
        return {k: tuple(t.shape) for k, t in SDXLModel(cfg, device="meta").state_dict().items()}


def check_float(name: str, dtypes: Mapping[str, torch.dtype]) -> None:
    """Every weight of a model or LoRA is floating point: an integer label on one means a corrupt file."""
    bad = [f"{k} {str(d).removeprefix('torch.')}" for k, d in dtypes.items()
           if not d.is_floating_point and not k.endswith(IGNORED_SUFFIXES)]
    if bad:
        raise CheckpointError(f"{name}: {len(bad)} tensor{'s' if len(bad) != 1 else ''} with a non-float dtype where "
                              f"weights belong ({first_few(bad)}); the file is corrupt: re-download or re-save it")


def check_finite(name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every weight of a swapped-in file (--unet, --vae) is finite: NaN/Inf in one is the file's fault, named here
    rather than as an overflow of the dtype when sampling."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{name}: {len(bad)} tensor{'s' if len(bad) != 1 else ''} holding NaN/Inf "
                              f"({first_few(bad)}); the file is damaged: re-download or re-save it")


def compare_keys(expected: Mapping, found: Mapping) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong shape) keys of `found` against `expected` shapes."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected and not k.endswith(IGNORED_SUFFIXES)]
    wrong = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    return missing, unexpected, wrong


def _check_keys(name: str, expected: Mapping, found: Mapping) -> None:
    """Raise CheckpointError.keys, listing them, where `compare_keys` finds any."""
    missing, unexpected, wrong = compare_keys(expected, found)
    if missing or unexpected or wrong:
        raise CheckpointError.keys(name, missing, unexpected, wrong)


_SKIPPING = threading.local()  # skip_init's flag: per thread


def _skippable(original):
    """An nn.init fill function that does nothing in a thread inside `skip_init`, and its usual work elsewhere."""
    def init(tensor, *args, **kwargs):
        return tensor if getattr(_SKIPPING, "on", False) else original(tensor, *args, **kwargs)
    init.skippable = True
    return init


@contextlib.contextmanager
def skip_init():
    """torch.nn.init's fill functions as no-ops while this thread builds a model on meta (nothing to fill; they cost
    ~0.9 s importing torch._dynamo, measured). Other threads, and calls outside `skip_init`, initialise as usual."""
    for name in (n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")):
        if not getattr(getattr(nn.init, name), "skippable", False):
            setattr(nn.init, name, _skippable(getattr(nn.init, name)))
    before, _SKIPPING.on = getattr(_SKIPPING, "on", False), True
    try:
        yield
    finally:
        _SKIPPING.on = before


def placeholder(shape, dtype, device) -> torch.Tensor:
    """A tensor of this shape, dtype and device holding no memory (one element, zero strides): a weight not loaded."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def convert(src: torch.Tensor, dtype: torch.dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """A new tensor: `src` in `dtype` on `device` and in `memory_format`, in one pass over `src`. Between two
    floating-point dtypes on CPU, through a float32 buffer that stays in cache, a few rows at a time: measured
    2.7-3.8x faster than one `copy_` for fp16 -> bf16 (which has no direct vector path), and bit-identical."""
    out = torch.empty(src.shape, dtype=dtype, device=device, memory_format=memory_format)
    if not (out.device.type == src.device.type == "cpu" and src.dtype != dtype and src.dtype.is_floating_point
            and dtype.is_floating_point and src.ndim and src.numel() > _ROWS_OF):
        return out.copy_(src)
    rows = max(1, _ROWS_OF // max(1, src[0].numel()))
    buf = torch.empty((rows, *src.shape[1:]), dtype=torch.float32)
    for i in range(0, src.shape[0], rows):
        n = min(rows, src.shape[0] - i)
        out[i:i + n].copy_(buf[:n].copy_(src[i:i + n]))
    return out


_ROWS_OF = 1 << 18  # elements per step of `convert`: a 1 MiB float32 buffer


def _materialise(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], device, dtype, channels_last: bool = False,
                 lazy: tuple[str, ...] = ()) -> SDXLModel:
    """Build on meta, then make each tensor from the file in one `convert` (dtype, device, with `channels_last` the
    UNet's and VAE's 4-d weights' memory format), in parallel, releasing its file pages; a tensor needing no change
    stays a view of the file. Keys starting with a `lazy` prefix get a `placeholder` (filled by sdxl.memory)."""
    with skip_init():
        model = SDXLModel(cfg, device="meta")
    layout = (PREFIXES["unet"], PREFIXES["vae"]) if channels_last else ()
    release = getattr(tensors, "release", lambda keys: None)

    def fill(k: str) -> torch.Tensor:
        src = tensors[k]
        target = dtype if (dtype is not None and src.is_floating_point()) else src.dtype
        if k.startswith(lazy) and lazy:
            return placeholder(src.shape, target, device)
        fmt = torch.channels_last if src.ndim == 4 and k.startswith(layout) and layout else torch.contiguous_format
        if src.dtype == target and src.device == torch.device(device) and src.is_contiguous(memory_format=fmt):
            return src
        out = convert(src, target, device, fmt)
        release([k])
        return out

    keys = list(model.state_dict())
    with ThreadPoolExecutor(max(1, len(os.sched_getaffinity(0)))) as pool:
        state = dict(zip(keys, pool.map(fill, keys)))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_single_file(path, device="cpu", dtype: torch.dtype | None = None,
                     components=("unet", "conditioner", "vae"), channels_last: bool = False,
                     lazy: tuple[str, ...] = ()) -> SDXLModel:
    """Load an official-layout single-file checkpoint (any SDXL-family size) as an SDXLModel."""
    f = SafetensorsFile(path)
    shapes = {k: v for k, v in f.shapes().items() if k not in MARKERS}
    cfg = dataclasses.replace(config_from_shapes(shapes, str(f.path)), **sampling_of(f.shapes()))
    check_float(str(f.path), f.dtypes())
    _check_keys(str(f.path), expected_shapes(cfg), shapes)
    cfg = dataclasses.replace(cfg, **{n: None for n in ("unet", "conditioner", "vae") if n not in components})
    return _materialise(cfg, f, device, dtype, channels_last, lazy)


def save_single_file(model: SDXLModel, path, dtype: torch.dtype | None = None, metadata: dict | None = None,
                     overwrite: bool = False) -> Path:
    """Write the official single-file layout; atomic (files.write_file); never overwrites unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; choose another name (nothing was overwritten)")
    state = {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
             for k, t in model.state_dict().items()} | markers_of(model.cfg)
    return write_tensors(path, state, metadata, mode="replace" if overwrite else "new")


# --- diffusers folders ------------------------------------------------------------------------

def _open_weights(folder: Path, stem: str, variant: str | None) -> Mapping[str, torch.Tensor]:
    """The safetensors weights of one diffusers component: plain or `.fp16` variant, single or sharded (memory-mapped
    views: nothing is read until used)."""
    variants = [variant] if variant else [None, "fp16"]
    for var in variants:
        name = f"{stem}.{var}" if var else stem
        if (folder / f"{name}.safetensors").is_file():
            return SafetensorsFile(folder / f"{name}.safetensors")
        index = folder / f"{name}.safetensors.index.json"
        if index.is_file():
            shards = _read_json(index).get("weight_map")
            if not isinstance(shards, dict) or not all(isinstance(s, str) and "/" not in s for s in shards.values()):
                raise CheckpointError(f"{index}: corrupt shard index (weight_map is not an object of file names)")
            return {k: f[k] for f in map(SafetensorsFile, sorted({folder / s for s in shards.values()})) for k in f}
    pickles = [p.name for p in folder.glob(f"{stem}*.bin")] + [p.name for p in folder.glob("*.ckpt")]
    if pickles:
        raise CheckpointError(f"{folder}: only pickle weights ({first_few(pickles)}); pickles can run arbitrary code and are "
                              "never loaded here: use a release with .safetensors weights")
    raise CheckpointError(f"{folder}: no {stem}.safetensors (or .fp16 variant, or sharded index) found")


def _read_json(path: Path) -> dict:
    """A diffusers JSON file (model_index.json, config.json, shard index): a JSON object, or a one-line error."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a diffusers folder needs model_index.json and a config.json per component") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder; a diffusers folder needs this to be a JSON file") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(d).__name__}, not an object; is this a diffusers folder?")
    return d


# Config fields that count layers or levels (a huge value would build a huge model before any check).
_COUNTS = ("channel_mult", "ch_mult", "num_res_blocks", "transformer_depth", "transformer_depth_middle", "layers")


def _component_config(path: Path, convert):
    """Our config from a diffusers component's config.json: missing or malformed keys are one-line errors."""
    d = _read_json(path)
    try:
        cfg = convert(d)
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}; is this a diffusers {path.parent.name} config?") from None
    except (TypeError, ValueError, ZeroDivisionError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed ({type(e).__name__}: {e})") from None
    for f in dataclasses.fields(cfg):
        v, top = getattr(cfg, f.name), 1000 if f.name in _COUNTS else 1 << 20
        if isinstance(v, str) or v is None:
            continue
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= top
                   for x in (v if isinstance(v, tuple) else (v,))):
            raise CheckpointError(f"{path}: {f.name} = {v!r} is not a plausible value (0..{top})")
    return cfg


# Our config field -> (the diffusers config.json key, its default; None: required): `_from_json` reads them,
# `_to_json` writes them.
_UNET_JSON = {"in_channels": ("in_channels", 4), "out_channels": ("out_channels", 4),
              "num_res_blocks": ("layers_per_block", 2), "context_dim": ("cross_attention_dim", None),
              "adm_in_channels": ("projection_class_embeddings_input_dim", None)}
_VAE_JSON = {"in_channels": ("in_channels", 3), "out_ch": ("out_channels", 3),
             "num_res_blocks": ("layers_per_block", 2), "z_channels": ("latent_channels", 4),
             "scaling_factor": ("scaling_factor", 0.13025)}
_TEXT_JSON = {"vocab_size": ("vocab_size", 49408), "max_length": ("max_position_embeddings", 77),
              "width": ("hidden_size", None), "layers": ("num_hidden_layers", None), "act": ("hidden_act", None)}


def _from_json(d: dict, fields: dict) -> dict:
    return {ours: d[key] if default is None else d.get(key, default) for ours, (key, default) in fields.items()}


def _to_json(cfg, fields: dict) -> dict:
    return {key: getattr(cfg, ours) for ours, (key, _) in fields.items()}


def unet_config_from_diffusers(d: dict) -> unet.UNetConfig:
    """Our UNetConfig from a diffusers UNet2DConditionModel config.json."""
    boc = d["block_out_channels"]
    tl = d.get("transformer_layers_per_block", 1)
    tl = [tl] * len(boc) if isinstance(tl, int) else list(tl)
    depth = tuple(t if "CrossAttn" in kind else 0 for t, kind in zip(tl, d["down_block_types"]))
    heads = d.get("num_attention_heads") or d["attention_head_dim"]
    heads = [heads] * len(boc) if isinstance(heads, int) else heads
    if any(h and c // h != 64 for c, h, t in zip(boc, heads, depth) if t):
        raise CheckpointError("diffusers UNet with attention heads other than width / 64: not an SDXL-family UNet")
    return unet.UNetConfig(model_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc), transformer_depth=depth,
                           transformer_depth_middle=tl[-1], **_from_json(d, _UNET_JSON))


def vae_config_from_diffusers(d: dict) -> vae.VAEConfig:
    boc = d["block_out_channels"]
    return vae.VAEConfig(ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc), embed_dim=d.get("latent_channels", 4),
                         **_from_json(d, _VAE_JSON))


def text_config_from_diffusers(d: dict) -> text_encoders.TextEncoderConfig:
    projected = "WithProjection" in str(d.get("architectures"))
    return text_encoders.TextEncoderConfig(proj_dim=d.get("projection_dim") if projected else None,
                                           **_from_json(d, _TEXT_JSON))


@dataclass(frozen=True)
class _Part:
    sub: str  # diffusers subfolder
    prefix: str  # our key prefix
    table: list[Entry]
    weights: Mapping[str, torch.Tensor]
    ignore: tuple[str, ...] = ()


def _layout(cfg: ModelConfig) -> list[tuple[str, str, object]]:
    """(diffusers subfolder, our key prefix, its config) of each component `cfg` has, in diffusers' order."""
    c = cfg.conditioner
    text = [("text_encoder", "conditioner.embedders.0.", c.clip_l),
            ("text_encoder_2", f"conditioner.embedders.{1 if c.clip_l else 0}.", c.bigg)] if c else []
    parts = [("unet", PREFIXES["unet"], cfg.unet), *text, ("vae", PREFIXES["vae"], cfg.vae)]
    return [p for p in parts if p[2] is not None]


def _diffusers_parts(folder: Path, variant: str | None, components, meta: bool) -> tuple[ModelConfig, list[_Part]]:
    """The config and the per-component conversion of a diffusers folder; `meta`: stand-ins built from headers only."""
    index = _read_json(folder / "model_index.json")
    present = lambda sub: index.get(sub) not in (None, [None, None])  # noqa: E731
    conf = lambda sub, convert: _component_config(folder / sub / "config.json", convert)  # noqa: E731
    read = lambda sub: _weights(folder / sub, sub, variant, meta)  # noqa: E731
    weights = {}  # each component's, read after its config.json: a folder's faults are reported in this order
    unet_cfg = cond_cfg = vae_cfg = None
    if "unet" in components and present("unet"):
        unet_cfg = conf("unet", unet_config_from_diffusers)
        weights["unet"] = read("unet")
    if "conditioner" in components and present("text_encoder_2"):
        bigg = conf("text_encoder_2", text_config_from_diffusers)
        clip_l = conf("text_encoder", text_config_from_diffusers) if present("text_encoder") else None
        try:
            cond_cfg = conditioning.conditioner_config(clip_l, bigg, unet_cfg and unet_cfg.adm_in_channels)
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{folder}: text encoders and UNet do not fit together ({e})") from None
        if clip_l:
            weights["text_encoder"] = read("text_encoder")
        weights["text_encoder_2"] = read("text_encoder_2")
    if "vae" in components and present("vae"):
        vae_cfg = conf("vae", vae_config_from_diffusers)
        weights["vae"] = read("vae")
    if not weights:
        raise CheckpointError(f"{folder}: model_index.json names none of unet, text_encoder_2, vae")
    cfg = ModelConfig(unet_cfg, cond_cfg, vae_cfg, **sampling_settings(folder))
    try:
        expected_shapes(cfg)  # builds it (on meta)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError, IndexError) as e:
        raise CheckpointError(f"{folder}: its config.json files describe no SDXL-family model ({type(e).__name__}: {e})") from None
    return cfg, [_Part(sub, prefix, _DIFFUSERS[sub].table(c), weights[sub],
                       TEXT_IGNORE if sub.startswith("text") else ()) for sub, prefix, c in _layout(cfg)]


def _weights(folder: Path, sub: str, variant: str | None, meta: bool) -> Mapping[str, torch.Tensor]:
    """A diffusers component's weights, named as `_DIFFUSERS[sub].table` expects; `meta`: stand-ins (headers only)."""
    w = _open_weights(folder, _DIFFUSERS[sub].stem, variant)
    if meta:
        w = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in w.items()}
    if sub == "vae":
        return _legacy_vae_names(w)
    if sub == "text_encoder" and not any(k.startswith("text_model.") for k in w):
        return {"text_model." + k: w[k] for k in w}  # transformers 5 saves CLIPTextModel without it
    return w


def load_diffusers(folder, device="cpu", dtype: torch.dtype | None = None, variant: str | None = None,
                   components=("unet", "conditioner", "vae")) -> SDXLModel:
    """Load a diffusers SDXL folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/)."""
    folder = Path(folder)
    cfg, parts = _diffusers_parts(folder, variant, components, meta=False)
    ours = {}
    for p in parts:
        ours |= {p.prefix + k: t for k, t in to_ours(p.table, p.weights, str(folder / p.sub), p.ignore).items()}
    check_float(str(folder), {k: t.dtype for k, t in ours.items()})
    _check_keys(str(folder), expected_shapes(cfg), {k: t.shape for k, t in ours.items()})
    return _materialise(cfg, ours, device, dtype)


# Older diffusers VAE files name the mid attention's to_q, to_k, to_v, to_out.0 so.
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY = re.compile(r"\.attentions\.0\.(query|key|value|proj_attn)\.")


def _legacy_vae_names(w: Mapping) -> dict:
    return {_LEGACY.sub(lambda m: f".attentions.0.{_LEGACY_ATTN[m[1]]}.", k): w[k] for k in w}


def save_diffusers(model: SDXLModel, folder, dtype: torch.dtype | None = None) -> Path:
    """Write a diffusers folder that diffusers' `StableDiffusionXLPipeline.from_pretrained` loads."""
    from sdxl.models.tokenizer import Tokenizer

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise CheckpointError(f"{folder}: exists and is not empty; choose another folder (nothing was overwritten)")
    cfg, sd = model.cfg, model.state_dict()
    index = {"_class_name": "StableDiffusionXLPipeline" if not cfg.is_refiner else "StableDiffusionXLImg2ImgPipeline",
             "_diffusers_version": "0.30.0", "force_zeros_for_empty_prompt": not cfg.is_refiner}
    if cfg.is_refiner:
        index["requires_aesthetics_score"] = True
    if cfg.conditioner:
        index["text_encoder"] = index["tokenizer"] = [None, None]
    for sub, prefix, c in _layout(cfg):
        part = _DIFFUSERS[sub]
        theirs = to_theirs(part.table(c), _sub(sd, prefix))
        (folder / sub).mkdir(parents=True, exist_ok=True)
        write_tensors(folder / sub / f"{part.stem}.safetensors",
                      {k: v.to(dtype) if dtype and v.is_floating_point() else v for k, v in theirs.items()})
        write_json(folder / sub / "config.json", part.config(c))
        index[sub] = list(part.index)
        if sub.startswith("text_encoder"):  # each text encoder's tokenizer: tokenizer/, tokenizer_2/
            tokenizer = sub.replace("text_encoder", "tokenizer")
            _write_tokenizer(folder / tokenizer, Tokenizer.default(), "<|endoftext|>" if sub == "text_encoder" else "!")
            index[tokenizer] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    write_json(folder / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG | {
        "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon",
        "rescale_betas_zero_snr": cfg.zero_terminal_snr})
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    write_json(folder / "model_index.json", index)
    return folder


# diffusers' SDXL 1.0 scheduler_config.json
SCHEDULER_CONFIG = {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                    "interpolation_type": "linear", "steps_offset": 1, "timestep_spacing": "leading",
                    "use_karras_sigmas": False, "clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False,
                    "skip_prk_steps": True}


def _unet_diffusers_config(c: unet.UNetConfig) -> dict:
    boc = [m * c.model_channels for m in c.channel_mult]
    last = c.transformer_depth[-1]
    if last and last != c.transformer_depth_middle:
        raise CheckpointError("this UNet's middle depth differs from its last level's: diffusers cannot express it")
    depth = [d or (c.transformer_depth_middle if i == len(boc) - 1 else 1) for i, d in enumerate(c.transformer_depth)]
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "sample_size": 128,
            **_to_json(c, _UNET_JSON), "block_out_channels": boc,
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in c.transformer_depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(c.transformer_depth)],
            "transformer_layers_per_block": depth, "attention_head_dim": [b // c.head_dim for b in boc],
            "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
            "mid_block_type": "UNetMidBlock2DCrossAttn"}


def _vae_diffusers_config(c: vae.VAEConfig) -> dict:
    n = len(c.ch_mult)
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", **_to_json(c, _VAE_JSON),
            "block_out_channels": [c.ch * m for m in c.ch_mult], "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 1024}


def _text_diffusers_config(c: text_encoders.TextEncoderConfig) -> dict:
    return {"architectures": ["CLIPTextModelWithProjection" if c.proj_dim else "CLIPTextModel"],
            "model_type": "clip_text_model", **_to_json(c, _TEXT_JSON), "intermediate_size": 4 * c.width,
            "num_attention_heads": c.width // 64, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1, "projection_dim": c.proj_dim or c.width}


@dataclass(frozen=True)
class _Component:
    """One component folder of a diffusers SDXL pipeline."""
    stem: str  # its weights file: STEM.safetensors (or .fp16, or sharded)
    index: tuple[str, str]  # its model_index.json entry: library, class
    table: Callable  # our component config -> conversion table (formats.convert)
    config: Callable  # our component config -> its config.json
    name: str  # its name in `inspect`


_DIFFUSERS = {
    "unet": _Component("diffusion_pytorch_model", ("diffusers", "UNet2DConditionModel"), unet_table,
                       _unet_diffusers_config, "unet"),
    "text_encoder": _Component("model", ("transformers", "CLIPTextModel"), clip_l_table, _text_diffusers_config,
                               "text_encoder_l"),
    "text_encoder_2": _Component("model", ("transformers", "CLIPTextModelWithProjection"), bigg_table,
                                 _text_diffusers_config, "text_encoder_g"),
    "vae": _Component("diffusion_pytorch_model", ("diffusers", "AutoencoderKL"), vae_table, _vae_diffusers_config,
                      "vae"),
}


def _write_tokenizer(folder: Path, tok, pad: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.write_files(folder)
    cfg = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
           "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad, "do_lower_case": True}
    write_json(folder / "tokenizer_config.json", cfg)
    write_json(folder / "special_tokens_map.json", {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})


# --- any of the above ---------------------------------------------------------------------------

# What `--model` needs from a checkpoint, and where a missing part comes from.
_NEEDED = {"unet": "no UNet (model.diffusion_model.*): --model and --refiner take checkpoints with one (a VAE alone "
                   "goes with --vae)",
           "conditioner": "no text encoders (conditioner.*): --model takes a full checkpoint (a UNet-only refiner goes "
                          "with --refiner, after a full --model)",
           "vae": "no VAE (first_stage_model.*): give one with --vae FILE"}


def load(path, device="cpu", dtype: torch.dtype | None = None, vae_path=None,
         components=("unet", "conditioner", "vae"), require=(), unet_path=None, channels_last: bool = False,
         lazy: tuple[str, ...] = ()) -> SDXLModel:
    """Load a single file or a diffusers folder; `vae_path` replaces the checkpoint's VAE, `unet_path` its UNet
    (`load_unet`; the checkpoint's own is not loaded); `require`: components that must be there (an error naming
    what is missing and which flag supplies it); a UNet, when among `components`, always is (every use of a
    checkpoint needs one). Single files only: `channels_last` (the UNet's and VAE's convolutions), `lazy` key
    prefixes left as placeholders."""
    path = Path(path)
    swap = unet_path is not None and "unet" in components
    own = tuple(c for c in components if not (swap and c == "unet"))
    if path.is_dir():
        model = load_diffusers(path, device, dtype, components=own)
    elif path.exists():
        model = load_single_file(path, device, dtype, own, channels_last, lazy)
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    if vae_path is not None or swap:
        parts, sampling = model.components(), {}
        if swap:
            parts["unet"], sampling = load_unet(unet_path, _unet_config(path), device, dtype)
        if vae_path is not None:
            parts["vae"] = load_vae(vae_path, device, dtype)
        model = SDXLModel.from_parts(**parts, like=dataclasses.replace(model.cfg, **sampling)).eval()
    absent = [_NEEDED[c] for c in (*require, *(("unet",) if "unet" in components else ())) if c not in model.components()]
    if absent:
        raise CheckpointError(f"{path}: has {absent[0]}")
    return model


def _unet_config(path: Path) -> unet.UNetConfig:
    """The UNet config of a checkpoint, from its header or config.json alone (nothing is loaded)."""
    cfg = (_diffusers_parts(path, None, ("unet",), meta=True)[0] if path.is_dir()
           else config_from_shapes(SafetensorsFile(path).shapes(), str(path)))
    if cfg.unet is None:
        raise CheckpointError(f"{path}: has no UNet, so a --unet file has nothing to replace or be checked against")
    return cfg.unet


def load_unet(path, base: unet.UNetConfig, device="cpu", dtype: torch.dtype | None = None) -> tuple[unet.UNet, dict]:
    """A UNet-only file replacing a base's UNet (SDXL-Lightning, DMD2, ... ship so): official keys, with or without
    `model.diffusion_model.`, or diffusers names; its shapes must be the base's. Returns (UNet, the `sampling_of`
    its v_pred/ztsnr keys, {} without them). A refiner's or another architecture's UNet is refused by name."""
    f = SafetensorsFile(path)
    name, shapes = str(f.path), {k: v for k, v in f.shapes().items() if k not in MARKERS}
    names = _unet_names(shapes, base, name)  # our key -> the file's
    if "label_emb.0.0.weight" not in names:
        raise CheckpointError(f"{name}: a UNet without SDXL's vector input (label_emb / add_embedding): a Stable "
                              "Diffusion 1.x/2.x UNet, not SDXL")
    width = shapes[names["label_emb.0.0.weight"]][-1]
    if width != base.adm_in_channels:
        kind = "a refiner UNet (pass it with --refiner)" if width < base.adm_in_channels else "not this base's kind"
        raise CheckpointError(f"{name}: {kind}: its vector input is {width} wide, the base's {base.adm_in_channels}")
    check_float(name, {k: d for k, d in f.dtypes().items() if k in shapes})
    ours = {PREFIXES["unet"] + k: v for k, v in names.items()}
    _check_keys(name, expected_shapes(ModelConfig(base, None, None)), {k: shapes[v] for k, v in ours.items()})
    sampling = sampling_of(f.shapes()) if any(k in f.shapes() for k in MARKERS) else {}
    tensors = {k: f[v] for k, v in ours.items()}
    check_finite(name, tensors)
    return _materialise(ModelConfig(base, None, None), tensors, device, dtype).unet, sampling


def _unet_names(shapes: Mapping, base: unet.UNetConfig, name: str) -> dict[str, str]:
    """Our UNet key (no prefix) -> the file's key, for official or diffusers names; unknown diffusers keys keep
    theirs behind a marker so that they are listed as unexpected."""
    prefix = PREFIXES["unet"]
    if any(k.startswith(prefix) for k in shapes):
        return {k[len(prefix):]: k for k in shapes if k.startswith(prefix)}
    if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in shapes):
        return {k: k for k in shapes}
    if any(k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in shapes):
        table = {e.theirs[0]: e.ours for e in unet_table(base)}
        return {table.get(k, f"(diffusers) {k}"): k for k in shapes}
    raise CheckpointError(f"{name}: not a UNet: no key starts with {prefix}, input_blocks. or down_blocks. "
                          f"(keys: {first_few(shapes)})")


def load_vae(path, device="cpu", dtype: torch.dtype | None = None) -> vae.AutoencoderKL:
    """A standalone VAE: single file (official names, with or without `first_stage_model.`, or diffusers names), or a
    diffusers vae folder."""
    path, prefix = Path(path), PREFIXES["vae"]
    if path.is_dir():
        cfg = _component_config(path / "config.json", vae_config_from_diffusers)
        sd, name = to_ours(vae_table(cfg), _weights(path, "vae", None, meta=False), str(path)), str(path)
    else:
        f = SafetensorsFile(path)
        name, shapes = str(f.path), f.shapes()
        if any(k.startswith(prefix) for k in shapes):
            sd = {k[len(prefix):]: f[k] for k in shapes if k.startswith(prefix)}
        elif "encoder.down_blocks.0.resnets.0.conv1.weight" in shapes:
            sd = to_ours(vae_table(_vae_config_from_diffusers_shapes(shapes, name)), _legacy_vae_names(f), name)
        elif "encoder.conv_in.weight" in shapes:
            sd = dict(f)
        else:
            raise CheckpointError(f"{name}: not a VAE: no encoder.conv_in / first_stage_model. keys "
                                  f"(keys: {first_few(shapes)})")
    check_float(name, {k: t.dtype for k, t in sd.items()})
    try:
        cfg = ModelConfig(None, None, vae.config_from_shapes({k: tuple(t.shape) for k, t in sd.items()}))
    except (KeyError, ValueError, IndexError, ZeroDivisionError) as e:
        raise CheckpointError(f"{name}: unknown VAE layout ({type(e).__name__}: {e})") from None
    ours = {prefix + k: t for k, t in sd.items()}
    _check_keys(name, expected_shapes(cfg), {k: t.shape for k, t in ours.items()})
    check_finite(name, sd)
    return _materialise(cfg, ours, device, dtype).vae


def _vae_config_from_diffusers_shapes(shapes: Mapping, name: str) -> vae.VAEConfig:
    """`vae.config_from_shapes` of a diffusers VAE file: the tensors it reads have our names but for the down blocks."""
    down = re.compile(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.")
    try:
        return vae.config_from_shapes({down.sub(r"encoder.down.\1.block.\2.", k): s for k, s in shapes.items()})
    except (CheckpointError, ZeroDivisionError) as e:
        raise CheckpointError(f"{name}: unknown diffusers VAE layout ({e})") from None


# --- inspect: headers only ----------------------------------------------------------------------

def _dominant_dtype(tensors) -> str:
    """The floating-point dtype holding most parameters, from (dtype, numel) pairs."""
    counts: dict[torch.dtype, int] = {}
    for dtype, n in tensors:
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + n
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else "none"


def _params(tensors) -> int:
    """The parameters of (key, shape) pairs, less the ignored buffers."""
    return sum(math.prod(shape) for k, shape in tensors if not k.endswith(IGNORED_SUFFIXES))


def inspect(path) -> dict:
    """Format, architecture, dtype, parameters per component, missing/unexpected keys and, for a single file, the
    prediction its v_pred/ztsnr marker keys say (`sampling_of`); reads headers only."""
    path = Path(path)
    if path.is_dir():
        return _inspect_diffusers(path)
    f = SafetensorsFile(path)
    shapes = {k: v for k, v in f.shapes().items() if k not in MARKERS}
    cfg = config_from_shapes(shapes, str(f.path))
    check_float(str(f.path), f.dtypes())
    missing, unexpected, wrong = compare_keys(expected_shapes(cfg), shapes)
    components = {_DIFFUSERS[sub].name: {"params": _params((k, s) for k, s in shapes.items() if k.startswith(prefix))}
                  for sub, prefix, _ in _layout(cfg)}
    return {"format": "single-file", "architecture": cfg.architecture,
            "dtype": _dominant_dtype((DTYPES[i.dtype], math.prod(i.shape)) for i in f.infos.values()),
            "components": components, "missing_keys": missing, "unexpected_keys": unexpected, "wrong_shapes": wrong,
            "sampling": sampling_of(f.shapes())}


def _inspect_diffusers(folder: Path) -> dict:
    cfg, parts = _diffusers_parts(folder, None, ("unet", "conditioner", "vae"), meta=True)
    components, missing, unexpected, wrong = {}, [], [], []
    for p in parts:
        check_float(str(folder / p.sub), {k: t.dtype for k, t in p.weights.items()})
        components[_DIFFUSERS[p.sub].name] = {"params": _params((k, t.shape) for k, t in p.weights.items())}
        m, u = check(p.table, p.weights, p.ignore)
        missing += [f"{p.sub}/{k}" for k in m]
        unexpected += [f"{p.sub}/{k}" for k in u]
        if not (m or u):  # names fine: compare shapes after conversion (meta tensors: nothing is read)
            ours = {p.prefix + k: t.shape for k, t in to_ours(p.table, p.weights, p.sub, p.ignore).items()}
            wrong += compare_keys({k: s for k, s in expected_shapes(cfg).items() if k.startswith(p.prefix)}, ours)[2]
    dtype = _dominant_dtype((t.dtype, t.numel()) for p in parts for t in p.weights.values())
    return {"format": "diffusers", "architecture": cfg.architecture, "dtype": dtype, "components": components,
            "missing_keys": missing, "unexpected_keys": unexpected, "wrong_shapes": wrong}
