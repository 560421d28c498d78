"""Generation as the CLI and the server run it: model files resolved, a Pipeline loaded (with LoRAs), a Request
built from settings and run, PNGs written with infotext and recipe. No argparse and no HTTP here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from sdxl.errors import SDXLError

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# a model whose file records no native settings gets SDXL's (SDXL report §2.3, sgm's sampling defaults)
SDXL_NATIVE = {"resolution": 1024, "steps": 40, "cfg": 5.0, "refiner_switch": 0.8}
# A1111's LoRA syntax in a prompt: <lora:NAME> or <lora:NAME:WEIGHT> (extensions-builtin/Lora/extra_networks_lora.py)
LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?>")


@dataclass(frozen=True)
class Models:
    """The files a generation uses, resolved once from flags (or a request), a recipe and the default model."""

    model: str
    refiner: str | None
    vae: str | None
    loras: tuple[str, ...]  # FILE or FILE:WEIGHT
    native: dict  # resolution, steps, cfg, refiner_switch
    native_from: str  # where the native settings come from, for the message
    default_refiner: bool  # the default model's refiner, chosen without --refiner

    def table(self) -> dict[str, str | None]:
        """The files as a recipe records them: model, refiner, vae, lora0, lora1, ..."""
        return {"model": self.model, "refiner": self.refiner, "vae": self.vae} | {
            f"lora{i}": spec for i, spec in enumerate(self.loras)}


def native_settings(model: str) -> tuple[dict, str]:
    """Native resolution/steps/cfg of a checkpoint: what training recorded in it (sdxl.train.config), else SDXL's."""
    if Path(model).suffix != ".safetensors" or not Path(model).is_file():
        return SDXL_NATIVE, "SDXL's default"
    from sdxl.formats.checkpoint import SafetensorsFile

    try:
        cfg = json.loads(SafetensorsFile(model).metadata.get("sdxl.train.config", "{}"))
        native = {"resolution": int(cfg["resolution"]), "steps": int(cfg.get("sample_steps", 40)),
                  "cfg": float(cfg.get("sample_cfg", 5.0)), "refiner_switch": 0.8}
    except (ValueError, KeyError, TypeError, AttributeError):
        return SDXL_NATIVE, "SDXL's default"
    ok = 8 <= native["resolution"] <= 4096 and native["resolution"] % 8 == 0 and 1 <= native["steps"] <= 1000
    return (native, f"recorded in {model} by training") if ok else (SDXL_NATIVE, "SDXL's default")


def resolve_models(model: str | None, refiner: str | None, no_refiner: bool, vae: str | None = None,
                   loras: list[str] | tuple[str, ...] | None = None) -> Models:
    """Without a model, the embedded default (and its refiner unless one is given or no_refiner)."""
    if model is not None:
        native, source = native_settings(model)
        return Models(model, None if no_refiner else refiner, vae, tuple(loras or ()), native, source, False)
    from sdxl.default_model import default_model_paths

    info = default_model_paths()
    default_refiner = refiner is None and info.get("refiner") is not None and not no_refiner
    if default_refiner:
        refiner = str(info["refiner"])
    native = {k: info[k] for k in SDXL_NATIVE}
    return Models(str(info["base"]), None if no_refiner else refiner, vae, tuple(loras or ()), native,
                  "of the default model", default_refiner)


def device_and_dtype(device: str | None, dtype: str | None):
    """(device, torch dtype, why): the device and dtype asked for (fp32/bf16/fp16), or the best device and its
    default dtype, and the reason."""
    import torch

    from sdxl.pipeline import default_device, default_dtype

    try:
        dev = torch.device(device or default_device())
    except RuntimeError:
        raise SDXLError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type):
        raise SDXLError(f"--device {device}: {dev.type} is not available here; use cpu"
                        + (", cuda" if available["cuda"] else "") + (", mps" if available["mps"] else ""))
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise SDXLError(f"--device {device}: the CPU is one device; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SDXLError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype is not None:
        return str(dev), getattr(torch, DTYPES[dtype]), "as asked"
    chosen = default_dtype(dev)
    if dev.type != "cpu":
        why = f"the default on {dev.type}"
    elif chosen == torch.bfloat16:
        why = "this CPU has AMX or AVX512-BF16, where bf16 runs several times faster; --dtype fp32 for references"
    else:
        why = "this CPU lacks AMX and AVX512-BF16, where bf16 would be far slower"
    return str(dev), chosen, why


def dtype_name(dtype) -> str:
    """torch.float32 -> "fp32" (the name recipes record)."""
    return {v: k for k, v in DTYPES.items()}[str(dtype).removeprefix("torch.")]


def split_loras(prompt: str) -> tuple[str, tuple[tuple[str, float], ...]]:
    """A1111's `<lora:NAME:0.8>` tags taken out of a prompt: (the prompt without them, ((NAME, weight), ...))."""
    loras = []
    for name, weight in LORA_TAG.findall(prompt):
        try:
            loras.append((name.strip(), float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise SDXLError(f"<lora:{name}:{weight}>: the weight must be a number, e.g. <lora:{name}:0.8>") from None
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt)))
    return text.strip(" ,"), tuple(loras)


def lora_spec(spec: str) -> tuple[str, float]:
    """"FILE" or "FILE:WEIGHT" -> (FILE, weight); a file whose name holds ':' is taken whole."""
    path, _, weight = spec.rpartition(":") if not Path(spec).exists() and ":" in spec else (spec, "", "")
    try:
        return path, float(weight) if weight else 1.0
    except ValueError:
        raise SDXLError(f"--lora {spec}: the weight after ':' must be a number, e.g. style.safetensors:0.8") from None


def with_defaults(settings: dict, models: Models, init=None, mask=None) -> dict:
    """Settings completed from the model's native ones and the init image: size (rounded to 8, grown by the
    outpaint pads), steps, cfg, the default refiner's switch and the img2img strength."""
    s = dict(settings)
    if init is not None and "width" not in s and "height" not in s:
        s["width"], s["height"] = (v // 8 * 8 for v in init.size)
        if s.get("outpaint"):  # the canvas grows by the (rounded-up) pads
            left, top, right, bottom = (-(-p // 8) * 8 for p in s["outpaint"])
            s["width"], s["height"] = s["width"] + left + right, s["height"] + top + bottom
    s.setdefault("width", models.native["resolution"])
    s.setdefault("height", models.native["resolution"])
    s.setdefault("steps", models.native["steps"])
    s.setdefault("cfg", models.native["cfg"])
    if models.default_refiner and s.get("refiner_switch") is None and s.get("refiner_strength") is None:
        s["refiner_switch"] = models.native["refiner_switch"]
    if init is not None and "strength" not in s:
        s["strength"] = 0.75 if mask is None else 1.0
    return s


def build_request(settings: dict, models: Models, source: str, init=None, mask=None, latent=None):
    """One validated Request from settings (completed by `with_defaults`) and the images or latent it starts from."""
    from sdxl.request import Request

    req = Request.from_dict(with_defaults(settings, models, init, mask), source)
    req = replace(req, init_image=init, mask=mask, init_latent=latent)
    req.validate(has_refiner=models.refiner is not None)
    return req


def load_pipeline(models: Models, device, dtype, vae_tiling: bool | None = None, log=print,
                  memory_budget: str | None = None):
    """The Pipeline of `models` on device/dtype, with its LoRAs applied to the base (each reported through `log`);
    `memory_budget` ("6GB", "auto", "medvram", ...): the memory plan (sdxl.memory), logged in one line."""
    from sdxl.formats.lora import load_lora
    from sdxl.pipeline import Pipeline

    specs = [lora_spec(s) for s in models.loras]  # bad weights fail before the weights load
    plan = None
    if memory_budget is not None:
        from sdxl.memory import Sizes, make_plan

        plan = make_plan(memory_budget, Sizes.of_files(models.model, models.refiner), device, dtype)
        log(plan.line())
        if specs and plan.lazy(models.model):
            raise SDXLError(f"LoRAs need the model's weights resident; the memory plan ({plan.level}) releases them: "
                            "give a larger --memory-budget or leave it out")
    pipe = Pipeline.load(models.model, models.refiner, models.vae, device=device, dtype=dtype, vae_tiling=vae_tiling,
                         memory=plan)
    for path, multiplier in specs:
        report = load_lora(pipe.base, path, multiplier)
        log(f"LoRA {path}: {report.total} layers, weight {multiplier}")
    return pipe


@dataclass(frozen=True)
class Written:
    """One PNG written: where, its A1111 infotext and the seed of its image."""

    path: Path
    infotext: str
    seed: int


def write_images(req, images, models: Models, dtype: str, out: Path, latent=None, watermark: bool = True,
                 numbered: bool = False) -> list[Written]:
    """PNGs of one request's images, each with infotext and recipe, at `out` (or out-i for a batch; with
    `numbered`, always out-i), never replacing a file."""
    from sdxl.formats.png import a1111_parameters, recipe, save_png

    if watermark:
        from sdxl.watermark import add_watermark

        images = add_watermark(images)
    table = models.table()
    common = recipe(req, table, latent)  # file and image hashes: once per request, not per image
    written = []
    for i, im in enumerate(images):
        target = out if len(images) == 1 and not numbered else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        text = a1111_parameters(req, table, i)
        rec = common | {"index": i, "seed_of_image": req.seed + i, "dtype": dtype}
        written.append(Written(save_png(im, target, text, rec), text, req.seed + i))
    return written
