"""A generation request: every setting that determines an image, and the one set of rules that checks it.

Whatever the source (CLI flags, a PNG's recipe, an HTTP request), settings become one immutable `Request`;
`Request.validate` runs once, before anything big is loaded.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
from PIL import Image

from sdxl.errors import SDXLError
from sdxl.sampling import names, schedules
from sdxl.sampling.samplers import DENOISERS

# Upper limits, so that a typo fails at once instead of running for hours or exhausting memory.
MAX_SIDE = 4096  # pixels a side, also after the hires fix (SDXL's largest bucket is 2048)
MAX_STEPS = 1000  # the training schedule's timesteps
MAX_BATCH = 64  # images per prompt; more: several runs or --prompts
MAX_CFG = 100.0
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range; image i uses seed + i
RANDOM_SEED = -1  # as A1111 and its clients: a fresh random seed
MAX_MICRO = 65536  # micro-conditioning sizes and coordinates
MAX_MASK_BLUR = 64  # pixels, as A1111's slider
PREDICTIONS = tuple(DENOISERS)  # what a UNet predicts: epsilon, v
# Field annotation -> (accepted Python types, words for errors).
_SCALARS = {"str": ((str,), "a string"), "int": ((int,), "an integer"), "float": ((int, float), "a number"),
            "bool": ((bool,), "true or false")}
# Request fields that hold images or tensors: never read from a dict of settings; the CLI flag that gives each.
NOT_SETTINGS = {"init_image": "--init-image", "mask": "--mask", "init_latent": "--latent"}


@dataclass(frozen=True)
class Request:
    """Everything that determines an image; the same Request and weights give the same image."""

    prompt: str | tuple[str, ...]  # one for every image, or one per image (len = batch)
    negative_prompt: str = ""
    prompt_2: str | None = None  # for the bigG encoder; default: the same prompt
    negative_prompt_2: str | None = None
    width: int = 1024
    height: int = 1024
    steps: int = 40
    sampler: str = "euler"
    schedule: str = "sgm"
    cfg: float = 5.0
    guidance_rescale: float = 0.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # fraction of the schedule where CFG applies
    seed: int = 0
    batch: int = 1
    # micro-conditioning (SDXL report §2.2); None: (height, width), (0, 0), (height, width)
    original_size: tuple[int, int] | None = None
    crop: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crop: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0  # refiner only (sgm defaults)
    negative_aesthetic_score: float = 2.5
    # img2img / inpainting
    init_image: Image.Image | None = field(default=None, compare=False)
    strength: float = 1.0
    mask: Image.Image | None = field(default=None, compare=False)
    mask_blur: int = 4  # pixels: the Gaussian blur of the mask where the original is pasted back (A1111's default)
    init_latent: torch.Tensor | None = field(default=None, compare=False)  # a saved base latent to refine
    outpaint: tuple[int, int, int, int] | None = None  # pad the init image (left, top, right, bottom) and paint there
    # refiner: hand-off at a fraction of one schedule (ensemble of experts), or SDEdit afterwards
    refiner_switch: float | None = None
    refiner_strength: float | None = None
    refiner_steps: int | None = None
    # hires fix
    hires_scale: float | None = None
    hires_upscale: str = "latent"  # latent | pixel
    hires_strength: float = 0.5
    hires_steps: int | None = None
    # what the UNet predicts (epsilon | v) and whether it was trained with zero terminal SNR (Lin et al. 2024);
    # None: as the checkpoint says (ModelConfig.prediction, .zero_terminal_snr)
    prediction: str | None = None
    zero_terminal_snr: bool | None = None
    eta: float | None = None  # fresh noise per step of samplers that add it (names.noise_parameter); None: theirs

    @classmethod
    def fields_from_dict(cls, d, source: str) -> dict:
        """Settings from a JSON-like dict (CLI flags, a PNG recipe, an HTTP body) -> typed keyword arguments, each
        checked against its field's annotation (lists become tuples); errors name the field."""
        if not isinstance(d, Mapping):
            raise SDXLError(f"{source}: expected an object of settings, got {type(d).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        out = {}
        for name, value in d.items():
            if name in NOT_SETTINGS:
                raise SDXLError(f"{source}: {name} cannot be given as a setting; pass the file with "
                                f"{NOT_SETTINGS[name]}")
            if name not in known:
                raise SDXLError(f"{source}: unknown setting {name!r}")
            out[name] = _typed(name, value, known[name], source)
        return out

    @classmethod
    def from_dict(cls, d, source: str) -> "Request":
        """A Request from settings (see `fields_from_dict`); no seed or seed -1 means a random seed, as A1111."""
        kw = cls.fields_from_dict(d, source)
        if kw.get("prompt") is None:
            raise SDXLError(f"{source}: no prompt")
        if kw.get("seed", RANDOM_SEED) == RANDOM_SEED:
            kw["seed"] = secrets.randbelow(2**32)
        return cls(**kw)

    def prompt_of(self, index: int) -> str:
        """The prompt of image `index` of the batch (a tuple gives one per image)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[index]

    @property
    def hires_size(self) -> tuple[int, int]:
        """(width, height) after the hires fix: each side times `hires_scale`, rounded to a multiple of 8."""
        return tuple(int(round(v * self.hires_scale / 8)) * 8 for v in (self.width, self.height))

    def validate(self, has_refiner: bool) -> None:
        """The value rules, for every source; raises SDXLError naming the setting and its allowed range."""
        _check_finite(self)
        _check_inputs(self, has_refiner)
        _check_sizes(self)
        _check_counts(self)
        _check_fractions(self)


def _typed(name: str, value, annotation: str, source: str):
    """`value` checked against a field annotation such as "int", "float | None", "tuple[int, int] | None",
    "str | tuple[str, ...]"; lists become tuples. The first alternative that fits wins."""
    alternatives = annotation.split(" | ")
    if value is None and "None" in alternatives:
        return None
    kinds = [k for k in alternatives if k != "None"]  # fields that are no settings are refused before (NOT_SETTINGS)
    for kind in kinds:
        try:
            return _as(value, kind)
        except (TypeError, ValueError):
            continue
    raise SDXLError(f"{source}: {name} must be {' or '.join(map(_words, kinds))}, got {value!r:.60}")


def _as(value, kind: str):
    """`value` as `kind` ("int", "float", "str", "tuple[int, int]", "tuple[str, ...]"); TypeError if it is not one."""
    if kind.startswith("tuple["):
        parts = _parts(kind)
        if isinstance(value, (list, tuple)) and parts[-1] == "...":
            parts = parts[:1] * len(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(parts) or not parts:
            raise TypeError(kind)
        return tuple(map(_as, value, parts))
    if isinstance(value, bool) != (kind == "bool") or not isinstance(value, _SCALARS[kind][0]):
        raise TypeError(kind)
    return float(value) if kind == "float" else value


def _words(kind: str) -> str:
    """"tuple[int, int]" -> "a list of 2 integers"; "int" -> "an integer"."""
    if not kind.startswith("tuple["):
        return _SCALARS[kind][1]
    parts = _parts(kind)
    noun = _SCALARS[parts[0]][1].split()[-1] + "s"
    return f"a list of {noun}" if parts[-1] == "..." else f"a list of {len(parts)} {noun}"


def _parts(kind: str) -> list[str]:
    """"tuple[int, int]" -> ["int", "int"]; "tuple[str, ...]" -> ["str", "..."]."""
    return [p.strip() for p in kind[6:-1].split(",")]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_range(r: Request, name: str, lo: float, hi: float, allowed: str, hint: str = "") -> None:
    """Setting `name`, where set, in lo..hi; the error writes the range as `allowed`."""
    if (v := getattr(r, name)) is not None and not lo <= v <= hi:
        raise SDXLError(f"{_flag(name)} must be in {allowed}, got {v}{hint}")


def _check_finite(r: Request) -> None:
    for f in fields(r):
        v = getattr(r, f.name)
        if any(isinstance(x, float) and not math.isfinite(x) for x in (v if isinstance(v, tuple) else (v,))):
            raise SDXLError(f"{_flag(f.name)} must be a finite number, got {v}")


def _check_sizes(r: Request) -> None:
    if r.width % 8 or r.height % 8 or r.width <= 0 or r.height <= 0:
        raise SDXLError(f"width and height must be positive multiples of 8, got {r.width}x{r.height}")
    if max(r.width, r.height) > MAX_SIDE:
        fix = ("a smaller --init-image (or --width/--height)" if r.init_image is not None and r.outpaint is None
               else "smaller --outpaint pads" if r.outpaint is not None else "a smaller --width/--height")
        raise SDXLError(f"{r.width}x{r.height} is over the limit of {MAX_SIDE} pixels a side; give {fix}")
    if r.hires_scale is not None:
        if not 1.0 <= r.hires_scale <= MAX_SIDE / 8:
            raise SDXLError(f"hires-scale must be at least 1 (e.g. 1.5 or 2), got {r.hires_scale}")
        big = r.hires_size
        if big == (r.width, r.height):
            raise SDXLError(f"hires-scale {r.hires_scale} leaves {r.width}x{r.height} unchanged (sizes are multiples "
                            "of 8); give a larger --hires-scale, e.g. 1.5")
        if max(big) > MAX_SIDE:
            raise SDXLError(f"hires-scale {r.hires_scale} makes {big[0]}x{big[1]}, over the limit of {MAX_SIDE} "
                            "pixels a side; give a smaller --hires-scale")
    for name in ("original_size", "crop", "target_size", "negative_original_size", "negative_crop",
                 "negative_target_size", "outpaint"):
        if any(not 0 <= v <= MAX_MICRO for v in getattr(r, name) or ()):
            raise SDXLError(f"{_flag(name)} must be in 0..{MAX_MICRO} (micro-conditioning sizes, crops and outpaint "
                            f"pads), got {getattr(r, name)}")


def _check_counts(r: Request) -> None:
    if r.sampler not in names.A1111_SAMPLERS:
        raise SDXLError(f"unknown sampler {r.sampler!r}; choose one of: {names.sampler_help()}")
    if r.prediction not in (None, *PREDICTIONS):
        raise SDXLError(f"unknown prediction {r.prediction!r}; choose one of: {', '.join(PREDICTIONS)}")
    if r.schedule not in schedules.SCHEDULES:
        raise SDXLError(f"unknown scheduler {r.schedule!r}; choose one of: {names.schedule_help()}")
    for name in ("steps", "refiner_steps", "hires_steps"):
        _check_range(r, name, 1, MAX_STEPS, f"1..{MAX_STEPS}")
        if (n := getattr(r, name)) is not None:
            try:
                schedules.get_sigmas(r.schedule, n)
            except ValueError as e:
                raise SDXLError(f"{_flag(name)} {n}: {e}") from None
    _check_range(r, "batch", 1, MAX_BATCH, f"1..{MAX_BATCH}", "; for more images run again or use --prompts")
    _check_range(r, "seed", 0, MAX_SEED, f"0..2**64-1 ({RANDOM_SEED}: random)")
    if r.seed > MAX_SEED - (r.batch - 1):
        raise SDXLError(f"seed {r.seed} with batch {r.batch}: image i of a batch uses seed + i, which passes 2**64-1; "
                        f"give a seed of at most {MAX_SEED - (r.batch - 1)}")
    if r.eta is not None and names.noise_parameter(r.sampler) is None:
        noisy = ", ".join(s for s in names.A1111_SAMPLERS if names.noise_parameter(s))
        raise SDXLError(f"eta applies to samplers that add noise ({noisy}), not {r.sampler}; drop --eta")
    _check_range(r, "eta", 0.0, 1.0, "[0, 1] (0: no fresh noise)")
    _check_range(r, "cfg", 0.0, MAX_CFG, f"0..{MAX_CFG:g} (1 turns guidance off)")
    _check_range(r, "mask_blur", 0, MAX_MASK_BLUR, f"0..{MAX_MASK_BLUR} pixels")
    for name in ("aesthetic_score", "negative_aesthetic_score"):  # the refiner's range (LAION aesthetics, 0..10)
        _check_range(r, name, 0.0, 10.0, "0..10")


def _check_fractions(r: Request) -> None:
    for name in ("strength", "hires_strength", "refiner_switch", "refiner_strength", "guidance_rescale"):
        _check_range(r, name, 0.0, 1.0, "[0, 1]")
    lo, hi = r.guidance_interval
    if not 0.0 <= lo <= hi <= 1.0:
        raise SDXLError(f"guidance-interval must be START END with 0 <= START <= END <= 1, got {lo:g} {hi:g}")
    if r.hires_upscale not in ("latent", "pixel"):
        raise SDXLError(f"hires-upscale must be latent or pixel, got {r.hires_upscale!r}")


def _check_inputs(r: Request, has_refiner: bool) -> None:
    for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
        value = getattr(r, name)
        for text in value if isinstance(value, tuple) else (value or "",):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                bad = text[e.start].encode("utf-8", "surrogateescape")
                raise SDXLError(f"{_flag(name)} holds a byte that is not UTF-8 text ({bad!r} at character "
                                f"{e.start}); write the prompt in UTF-8") from None
    if not isinstance(r.prompt, str) and len(r.prompt) != r.batch:
        raise SDXLError(f"prompt: {len(r.prompt)} prompts for a batch of {r.batch}; give one per image or a single one")
    if (r.refiner_switch is not None or r.refiner_strength is not None) and not has_refiner:
        raise SDXLError("a refiner switch or strength was given but no refiner is loaded (--refiner PATH)")
    if (r.mask is not None or r.outpaint is not None) and r.init_image is None:
        raise SDXLError(f"{'a mask' if r.mask is not None else 'outpainting'} needs an init image (--init-image)")
    if r.strength != 1.0 and r.init_image is None and r.init_latent is None:
        raise SDXLError(f"strength {r.strength} applies to img2img; give --init-image (or --latent), or drop it")
    if r.init_latent is not None and r.init_image is not None:
        raise SDXLError("--latent and --init-image both give the start of the image: give one of them")
    if r.init_latent is not None and r.init_latent.shape[0] not in (1, r.batch):
        n = r.init_latent.shape[0]
        raise SDXLError(f"the --latent file holds {n} latents for a batch of {r.batch}: pick one with --latent-index "
                        f"I (0 to {n - 1}), or give --batch {n}")
    if r.mask is not None and r.init_image is not None and r.mask.size != r.init_image.size:
        (w, h), (iw, ih) = r.mask.size, r.init_image.size
        raise SDXLError(f"mask is {w}x{h} but the image is {iw}x{ih}; they must match")
    if r.mask is not None and r.outpaint is not None:
        raise SDXLError("--mask and --outpaint cannot be combined: outpainting makes its own mask (the new border); "
                        "outpaint first, then inpaint the result with --mask")
    if r.init_image is not None and min(r.init_image.size) < 8:
        w, h = r.init_image.size
        raise SDXLError(f"the init image is {w}x{h} pixels; it must be at least 8x8")
