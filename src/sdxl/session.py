"""Generation as the CLI and the server run it: model files resolved, a Pipeline loaded (with LoRAs), a Request
built from settings and run, PNGs written with infotext and recipe. No argparse and no HTTP here.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sdxl.errors import SDXLError

_IMPORTED = time.perf_counter()

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


_THREADS = {"why": "as set"}


def configure_threads(sample_s: float = 0.05) -> None:
    """Before torch is imported (OpenMP reads its settings once): unless set, OMP_WAIT_POLICY=PASSIVE and
    OMP_NUM_THREADS = the idle cores this process may use, at least 1 (the idle share of all CPUs in /proc/stat over
    `sample_s`, rounded). A spinning OpenMP thread on a core another process holds stalls every parallel region at its
    barrier: on a busy 2-core machine 2 threads took 72 s where 1 thread or 2 passive ones took 17 s
    (bench/RESULTS.md, "Threads")."""
    if "torch" in sys.modules:  # a host process (tests, a notebook) has chosen already
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        first = _cpu_times()
        time.sleep(sample_s)
        idle = _idle_cpus(first, _cpu_times())
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        idle = float(cores)
    os.environ["OMP_NUM_THREADS"] = str(max(1, min(cores, round(idle))))
    _THREADS["why"] = f"{idle:.1f} of {cores} cores idle"


def _cpu_times() -> list[int]:
    """The aggregate "cpu" line of /proc/stat: jiffies per state (user nice system idle iowait ...)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def _idle_cpus(before: list[int], after: list[int]) -> float:
    """CPUs idle between two /proc/stat samples: the idle + iowait share of the elapsed jiffies times the CPU count."""
    delta = [b - a for a, b in zip(before, after)]
    return (delta[3] + delta[4]) / sum(delta) * (os.cpu_count() or 1)


def threads_note() -> str:
    """How many threads torch uses and why, for the summary line."""
    import torch

    return f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}: {_THREADS['why']}"


def process_seconds() -> float:
    """Seconds since this process started (interpreter start-up and imports included), from /proc; else since
    this module was imported."""
    try:
        start = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        return float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


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
        why = "a matmul probe found bf16 faster than fp32 on this CPU; --dtype fp32 for references"
    else:
        why = "a matmul probe found bf16 slower than fp32 on this CPU (no AVX512-BF16/AMX)"
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


def load_pipeline(models: Models, device, dtype, vae_tiling: bool | None = None, log=print, **speed):
    """The Pipeline of `models` on device/dtype, with its LoRAs applied to the base (each reported through `log`);
    `speed`: Pipeline's fast= and compile=."""
    from sdxl.formats.lora import load_lora
    from sdxl.pipeline import Pipeline

    specs = [lora_spec(s) for s in models.loras]  # bad weights fail before the weights load
    pipe = Pipeline.load(models.model, models.refiner, models.vae, device=device, dtype=dtype, vae_tiling=vae_tiling,
                         **speed)
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
