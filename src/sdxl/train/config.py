"""The training configuration: one frozen dataclass, read from TOML, with typed `--set key=value` overrides.

    model_config = "tiny"          # or model = "sd_xl_base_1.0.safetensors"
    dataset = "photos/"            # a folder (image + .txt caption), a .jsonl manifest, or "synthetic:64"
    steps = 2000
    [unet]                         # optional: override fields of the named config's UNet (also [vae], [clip_l], [bigg])
    model_channels = 128

Every value is checked against its field's type; a bad one is a one-line `SDXLError` (exit 2 in the CLI).
Relative paths are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdxl.errors import SDXLError
from sdxl.images import regular_file
from sdxl.models.model import SDXL_BASE, SDXL_REFINER, TINY_BASE, TINY_REFINER, ModelConfig
from sdxl.models.tokenizer import MAX_LENGTH, VOCAB_SIZE

NAMED_MODELS = {"tiny": TINY_BASE, "tiny-refiner": TINY_REFINER, "sdxl-base": SDXL_BASE, "sdxl-refiner": SDXL_REFINER}
SECTIONS = ("unet", "vae", "clip_l", "bigg")  # TOML tables overriding parts of `model_config`


@dataclass(frozen=True)
class TrainConfig:
    # --- the model -----------------------------------------------------------------------------
    model: str = ""  # a checkpoint to start from (single file or diffusers folder); empty: from scratch
    model_config: str = "tiny"  # from scratch: one of NAMED_MODELS, changed by the [unet]/[vae]/... tables
    unet: dict[str, Any] = field(default_factory=dict)
    vae: dict[str, Any] = field(default_factory=dict)
    clip_l: dict[str, Any] = field(default_factory=dict)
    bigg: dict[str, Any] = field(default_factory=dict)
    train: Literal["unet", "lora"] = "unet"  # the full UNet, or LoRA (sdxl.adapters.lora) on it
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: alpha = rank
    lora_text_encoders: bool = False  # also LoRA on both text encoders
    # --- data (SDXL report §2.3-2.5) ------------------------------------------------------------
    dataset: str = ""
    resolution: int = 1024  # buckets have about resolution^2 pixels
    bucket_step: int = 64  # bucket sides are multiples of this
    max_aspect: float = 4.0  # buckets from 1:max_aspect to max_aspect:1
    random_crop: bool = True  # False: centre crop
    caption_dropout: float = 0.1  # dropped captions get what inference uses for an empty prompt
    aesthetic_score: float = 6.0  # refiner micro-conditioning when the manifest gives none
    min_original_size: int = 0  # drop images whose shorter side is below this (report §2.2's "discard small images")
    # ablations of the micro-conditioning (report §2.2): off = the model is told nothing useful
    size_conditioning: bool = True  # False: original_size is always the bucket's size
    crop_conditioning: bool = True  # False: crop_coords_top_left is always (0, 0)
    cache_dir: str = ""  # cache VAE latents and text embeddings here (safetensors); one crop per image
    num_workers: int = 0  # DataLoader worker processes
    # --- the objective (docs/training.md §1) ----------------------------------------------------
    offset_noise: float = 0.05  # noise += offset_noise * randn(B, C, 1, 1)
    timestep_range: tuple[int, int] = (0, 1000)  # t drawn from [lo, hi): the refiner trains on (0, 200)
    min_snr_gamma: float = 0.0  # > 0: min-SNR loss weighting (Hang et al. 2023), typically 5
    # --- optimisation ---------------------------------------------------------------------------
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # per process and micro-step; global batch = batch_size * processes * grad_accum
    grad_accum: int = 1
    lr: float = 1e-5
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    lr_min: float = 0.0  # cosine ends here
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    ema_decay: float = 0.0  # 0: no EMA; else e.g. 0.999 (final.safetensors then holds the EMA weights)
    mixed_precision: Literal["no", "bf16"] = "no"  # bf16 autocast: fast on GPUs and AMX CPUs only
    gradient_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp shards a full UNet fine-tune
    device: str = ""  # default: cuda if available, else cpu
    seed: int = 0
    max_nonfinite: int = 5  # stop after this many non-finite steps in a row
    # --- checkpoints, logs, samples -------------------------------------------------------------
    output: str = "runs/sdxl"  # --output overrides
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # older step-* folders are deleted
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"  # of final.safetensors and the LoRA files
    sample_every: int = 0  # 0: no sample images
    sample_prompts: tuple[str, ...] = ()
    sample_seed: int = 0
    sample_steps: int = 20
    sample_cfg: float = 5.0
    sample_size: int = 0  # 0: resolution

    def model_config_resolved(self) -> ModelConfig:
        """The named from-scratch config with the [unet]/[vae]/[clip_l]/[bigg] overrides applied."""
        base = NAMED_MODELS[self.model_config]
        cond = base.conditioner
        if self.clip_l and not cond.clip_l:
            raise SDXLError(f"[clip_l] given, but {self.model_config!r} has no CLIP-L encoder")
        cond = dataclasses.replace(cond, clip_l=_replace(cond.clip_l, self.clip_l, "clip_l"),
                                   bigg=_replace(cond.bigg, self.bigg, "bigg"))
        _check_text_encoder(cond.clip_l, "clip_l")
        _check_text_encoder(cond.bigg, "bigg")
        # the UNet's inputs follow the text encoders unless [unet] sets them
        unet_cfg = _replace(base.unet, {"context_dim": cond.context_dim, "adm_in_channels": cond.vector_dim,
                                        **self.unet}, "unet")
        return ModelConfig(unet_cfg, cond, _replace(base.vae, self.vae, "vae"))

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def _replace(cfg, overrides: dict, section: str):
    if not overrides:
        return cfg
    _check_sizes(overrides, section)
    hints = typing.get_type_hints(type(cfg))
    try:
        return dataclasses.replace(cfg, **{k: coerce(v, hints[k], f"{section}.{k}") for k, v in overrides.items()})
    except ValueError as e:  # a config's own __post_init__ check
        raise SDXLError(f"[{section}]: {e}") from None


# --- reading and checking values -----------------------------------------------------------------

MAY_BE_ZERO = ("transformer_depth", "transformer_depth_middle")  # a level without attention


def _check_sizes(overrides: dict, section: str) -> None:
    """Sizes in the model tables are positive (depths may be 0) and lists are not empty."""
    for key, value in overrides.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not values:
            raise SDXLError(f"[{section}] {key}: needs at least one value, got []")
        low = 0 if key in MAY_BE_ZERO else 1
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if any(not (math.isfinite(v) and v >= low) for v in numbers):
            raise SDXLError(f"[{section}] {key} must be {'at least 0' if low == 0 else 'positive'}, got {value!r}")


def _check_text_encoder(enc, section: str) -> None:
    if enc is not None and (enc.vocab_size < VOCAB_SIZE or enc.max_length < MAX_LENGTH):
        raise SDXLError(f"[{section}] vocab_size {enc.vocab_size} and max_length {enc.max_length} must be at least "
                        f"the CLIP tokenizer's {VOCAB_SIZE} and {MAX_LENGTH}")


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}s"
        return f"a list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return "a table"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value, tp, name: str):
    """`value` as type `tp` (int, float, bool, str, Literal, X | None, tuples, dict), or a one-line SDXLError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = SDXLError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        if type(None) in args and (value is None or value == "none"):  # TOML has no null: "none"
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, name)
            except SDXLError:
                pass
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(coerce(v, a, name) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp in _SCALARS:  # a bool is a Python int, but not a config integer or number
        if not isinstance(value, _SCALARS[tp]) or (isinstance(value, bool) and tp is not bool):
            raise bad
        return float(value) if tp is float else value
    raise TypeError(f"{name}: unsupported config type {tp}")


_SCALARS = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}  # config type -> accepted Python types


def parse_value(text: str):
    """A `--set` value: TOML syntax (1e-4, true, [1, 2], "text"), else the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise SDXLError(f"--set {text[:40]}...: nested too deeply") from None


def _unknown(key: str, known: list[str], where: str) -> SDXLError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return SDXLError(f"{where}unknown setting {key!r}{hint}")


def build(values: dict, where: str = "", complete: bool = True) -> TrainConfig:
    """A TrainConfig from a dict of raw values (TOML tables included), every value type-checked.

    `complete`: also check ranges and combinations (off while overrides are still to come)."""
    hints = typing.get_type_hints(TrainConfig)
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown(key, known, where)
        kwargs[key] = coerce(value, hints[key], f"{where}{key}")
    for section in SECTIONS:
        sub_known = _section_fields(kwargs.get("model_config", TrainConfig.model_config), section)
        for k, v in kwargs.get(section, {}).items():
            if k not in sub_known:
                raise _unknown(f"{section}.{k}", [f"{section}.{n}" for n in sub_known], where)
            coerce(v, sub_known[k], f"{where}{section}.{k}")
    cfg = TrainConfig(**kwargs)
    if complete:
        check(cfg)
    return cfg


def _section_fields(model_config: str, section: str) -> dict:
    if model_config not in NAMED_MODELS:
        raise SDXLError(f"model_config: unknown {model_config!r}; choose one of {', '.join(NAMED_MODELS)}")
    base = NAMED_MODELS[model_config]
    cls = {"unet": type(base.unet), "vae": type(base.vae), "clip_l": type(base.conditioner.bigg),
           "bigg": type(base.conditioner.bigg)}[section]
    return typing.get_type_hints(cls)


def _numbers(cfg: TrainConfig) -> dict[str, float]:
    """Every float setting (tuples included) by name, for the one rule that they are finite."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        for i, x in enumerate(v if isinstance(v, tuple) else (v,)):
            if isinstance(x, float):
                out[f.name if not isinstance(v, tuple) else f"{f.name}[{i}]"] = x
    return out


# Upper limits, so that a typo fails at once instead of running for hours or exhausting memory.
MAX_LR = 1.0
MAX_BATCH = 4096
MAX_RESOLUTION = 4096  # as generation's largest side
MAX_SYNTHETIC = 1_000_000


def require(cfg, rules) -> None:
    """The one rule set of a training config (this file's TrainConfig, train.vae's VAETrainConfig): every float
    setting finite, the device one this machine has, then each (ok, message) of `rules` in order."""
    for name, v in _numbers(cfg).items():
        if not math.isfinite(v):
            raise SDXLError(f"{name} must be a finite number, got {v}")
    if cfg.device:
        from sdxl.session import device_and_dtype

        device_and_dtype(cfg.device, None)  # not a device, or not here: one line
    for ok, message in rules():
        if not ok:
            raise SDXLError(message)


def check(cfg: TrainConfig) -> None:
    """Ranges and combinations the types cannot express; a NaN or Inf anywhere is refused first."""
    require(cfg, lambda: _rules(cfg))
    if not cfg.model:
        cfg.model_config_resolved()  # the [unet]/[vae]/[clip_l]/[bigg] sizes


def _rules(cfg: TrainConfig) -> list[tuple[bool, str]]:
    lo, hi = cfg.timestep_range
    rules = [
        (cfg.steps >= 1, f"steps must be at least 1, got {cfg.steps}"),
        (cfg.batch_size >= 1 and cfg.grad_accum >= 1, "batch_size and grad_accum must be at least 1"),
        (0 < cfg.lr <= MAX_LR, f"lr must be in (0, {MAX_LR:g}] (AdamW; SDXL fine-tunes use about 1e-5 to 1e-3), "
                               f"got {cfg.lr}"),
        (cfg.batch_size <= MAX_BATCH, f"batch_size must be at most {MAX_BATCH} per process, got {cfg.batch_size}"),
        (0.0 <= cfg.lr_min <= cfg.lr, f"lr_min must be in [0, lr = {cfg.lr}], got {cfg.lr_min}"),
        (cfg.warmup_steps >= 0, f"warmup_steps must be at least 0, got {cfg.warmup_steps}"),
        (cfg.adam_eps > 0, f"adam_eps must be positive (it keeps Adam's division finite), got {cfg.adam_eps}"),
        (all(0.0 <= b < 1.0 for b in cfg.adam_betas), f"adam_betas must each be in [0, 1), got {list(cfg.adam_betas)}"),
        (cfg.weight_decay >= 0, f"weight_decay must be at least 0, got {cfg.weight_decay}"),
        (cfg.max_grad_norm >= 0, f"max_grad_norm must be at least 0 (0: no clipping), got {cfg.max_grad_norm}"),
        (cfg.offset_noise >= 0, f"offset_noise must be at least 0, got {cfg.offset_noise}"),
        (cfg.min_snr_gamma >= 0, f"min_snr_gamma must be at least 0 (0: off), got {cfg.min_snr_gamma}"),
        (cfg.lora_alpha is None or cfg.lora_alpha > 0, f"lora_alpha must be positive or none, got {cfg.lora_alpha}"),
        (cfg.num_workers >= 0, f"num_workers must be at least 0 (0: load in the main process), got {cfg.num_workers}"),
        (all(0 <= v < 2**63 for v in (cfg.seed, cfg.sample_seed)),
         f"seed and sample_seed must be in [0, 2**63), got {cfg.seed} and {cfg.sample_seed}"),
        (cfg.sample_steps >= 1 and cfg.sample_size >= 0, "sample_steps must be at least 1 and sample_size at least 0"),
        (0.0 <= cfg.caption_dropout <= 1.0, f"caption_dropout must be in [0, 1], got {cfg.caption_dropout}"),
        (0 <= lo < hi <= 1000, f"timestep_range must satisfy 0 <= lo < hi <= 1000, got {cfg.timestep_range}"),
        (0.0 <= cfg.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.resolution > 0 and cfg.bucket_step > 0 and cfg.resolution % cfg.bucket_step == 0,
         f"resolution ({cfg.resolution}) must be a positive multiple of bucket_step ({cfg.bucket_step})"),
        (cfg.resolution <= MAX_RESOLUTION, f"resolution must be at most {MAX_RESOLUTION} (SDXL trains at 1024), "
                                           f"got {cfg.resolution}"),
        (cfg.min_original_size >= 0, f"min_original_size must be at least 0, got {cfg.min_original_size}"),
        (cfg.max_aspect >= 1.0, f"max_aspect must be at least 1, got {cfg.max_aspect}"),
        (cfg.checkpoint_every >= 1, f"checkpoint_every must be at least 1, got {cfg.checkpoint_every}"),
        (cfg.keep_checkpoints >= 1, f"keep_checkpoints must be at least 1, got {cfg.keep_checkpoints}"),
        (cfg.max_nonfinite >= 1, f"max_nonfinite must be at least 1, got {cfg.max_nonfinite}"),
        (cfg.lora_rank >= 1, f"lora_rank must be at least 1, got {cfg.lora_rank}"),
        (not (cfg.lora_text_encoders and cfg.train != "lora"), "lora_text_encoders needs train = \"lora\""),
        (not (cfg.lora_text_encoders and cfg.cache_dir),
         "cache_dir caches text embeddings, but lora_text_encoders trains the encoders: drop one"),
        (not (cfg.distributed == "fsdp" and cfg.train != "unet"), "distributed = \"fsdp\" is for train = \"unet\""),
        (cfg.dataset != "", "no dataset: set dataset = \"folder/\", \"manifest.jsonl\" or \"synthetic:64\""),
        (not cfg.dataset.startswith("synthetic:")
         or cfg.dataset[10:].isdigit() and 0 < int(cfg.dataset[10:]) <= MAX_SYNTHETIC,
         f"dataset {cfg.dataset!r:.60}: synthetic datasets are written synthetic:N with N in 1..{MAX_SYNTHETIC}"),
        (not (cfg.sample_every and not cfg.sample_prompts), "sample_every needs sample_prompts"),
        (not (cfg.model and any(getattr(cfg, s) for s in SECTIONS)),
         f"the tables {', '.join(SECTIONS)} change model_config; with model = \"...\" the checkpoint fixes the shapes"),
    ]
    return rules


def load(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a TOML file (None: defaults only), then apply `key=value` overrides (dotted keys reach tables)."""
    values: dict = {}
    if path is not None:
        try:
            if Path(path).exists() and not Path(path).is_dir():
                regular_file(path, "config", "TOML file")  # a FIFO or device would block or never end
            values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SDXLError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise SDXLError(f"{path}: is a folder; give the TOML config file") from None
        except OSError as e:
            raise SDXLError(f"{path}: cannot read the config ({e.strerror})") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise SDXLError(f"{path}: not valid TOML ({e})") from None
        except RecursionError:
            raise SDXLError(f"{path}: not a usable config (arrays or tables nested too deeply)") from None
        if not overrides:
            return build(values, f"{path}: ")
        build(values, f"{path}: ", complete=False)  # the file's own type mistakes are named as the file's
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SDXLError(f"--set {item!r}: expected key=value")
        section, dot, sub = key.partition(".")
        if dot:
            if section not in SECTIONS:
                raise SDXLError(f"--set {key}: only the tables {', '.join(SECTIONS)} take dotted keys")
            values[section] = {**values.get(section, {}), sub: parse_value(text)}
        else:
            values[key] = parse_value(text)
    return build(values, "--set " if overrides else "")
