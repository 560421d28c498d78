"""Generation as the CLI and the server run it: model files resolved, a Pipeline loaded (with LoRAs), a Request
built from settings and run, PNGs written with infotext and recipe. No argparse and no HTTP here.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from sdxl.adapters.tags import file_loras, lora_free, request_loras, warn_stray_tags
from sdxl.errors import SDXLError

_IMPORTED = time.perf_counter()

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# a model whose file records no native settings gets SDXL's (SDXL report §2.3, sgm's sampling defaults)
SDXL_NATIVE = {"resolution": 1024, "steps": 40, "cfg": 5.0, "refiner_switch": 0.8}
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
    embeddings: str | None = None  # a folder of textual-inversion embeddings, named in prompts by file stem
    unet: str | None = None  # a UNet-only file replacing the model's UNet
    sampling: dict | None = None  # prediction and zero_terminal_snr as the model file says (checkpoint.sampling_settings)
    lora_dir: str | None = None  # where a prompt's <lora:NAME> tags are found

    def table(self) -> dict[str, str | None]:
        """The files as a recipe records them: model, refiner, vae, unet, lora0, lora1, ..."""
        return {"model": self.model, "refiner": self.refiner, "vae": self.vae, "unet": self.unet} | {
            f"lora{i}": spec for i, spec in enumerate(self.loras)}


_THREADS = {"why": "as set"}


def configure_threads(sample_s: float = 0.05) -> None:
    """Before torch is imported (OpenMP reads its settings once), unless OMP_NUM_THREADS is set: one thread per core
    of this process (always the same count, so the same command gives the same image on a busy machine too: the
    thread count changes how bf16 sums are split), and where some cores are busy now (the idle share of all CPUs
    in /proc/stat over `sample_s`), OMP_WAIT_POLICY=PASSIVE (unless set). A spinning OpenMP thread on a core that
    another process holds stalls every parallel region: on a busy 2-core machine 2 spinning threads took 37-116 s
    where 2 passive ones took 12-19 s, as fast as 1 thread (bench/RESULTS.md, "Threads"). A quiet machine keeps
    libgomp's spin-then-sleep wait."""
    if "torch" in sys.modules or "OMP_NUM_THREADS" in os.environ:  # a host process or the user has chosen
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        first = _cpu_times()
        time.sleep(sample_s)
        idle = _idle_cpus(first, _cpu_times())
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        idle = float(cores)
    os.environ["OMP_NUM_THREADS"] = str(cores)
    busy = round(idle) < cores
    if busy:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _THREADS["why"] = f"one per core, {idle:.1f} of {cores} idle" + (", passive wait" if busy else "")


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


def check_folder(flag: str, path: str | None, holds: str) -> None:
    """A folder flag's value (None: not given) must be a folder: one line naming the flag otherwise."""
    if path is not None and not Path(path).is_dir():
        raise SDXLError(f"{flag} {path}: not a folder; give the folder that holds {holds}")


def resolve_models(model: str | None, refiner: str | None, no_refiner: bool, vae: str | None = None,
                   loras: list[str] | tuple[str, ...] | None = None, embeddings: str | None = None,
                   unet: str | None = None, lora_dir: str | None = None) -> Models:
    """Without a model, the embedded default (and its refiner unless one is given or no_refiner); `unet`: a
    UNet-only file that replaces the model's; `lora_dir`: where a prompt's <lora:NAME> tags are found."""
    check_folder("--embeddings-dir", embeddings, "the embeddings")
    lora_dir = None if lora_dir is None else str(lora_dir)
    if model is not None:
        from sdxl.formats.checkpoint import sampling_settings

        native, source = native_settings(model)
        return Models(model, None if no_refiner else refiner, vae, tuple(loras or ()), native, source, False,
                      embeddings, unet, sampling_settings(model) | unet_sampling(unet), lora_dir)
    from sdxl.default_model import default_model_paths

    info = default_model_paths()
    default_refiner = refiner is None and info.get("refiner") is not None and not no_refiner
    if default_refiner:
        refiner = str(info["refiner"])
    native = {k: info[k] for k in SDXL_NATIVE}
    return Models(str(info["base"]), None if no_refiner else refiner, vae, tuple(loras or ()), native,
                  "of the default model", default_refiner, embeddings, unet, unet_sampling(unet) or None, lora_dir)


def unet_sampling(unet: str | None) -> dict:
    """The prediction and zero_terminal_snr a --unet file's own v_pred/ztsnr keys say (they override the
    checkpoint's, as sdxl.formats.checkpoint.load_unet applies them); {} without such keys."""
    if unet is None or not Path(unet).is_file():
        return {}
    from sdxl.formats.checkpoint import MARKERS, sampling_of
    from sdxl.formats.files import SafetensorsFile

    try:
        keys = SafetensorsFile(unet).shapes()
    except SDXLError:  # the load that follows says why
        return {}
    return sampling_of(keys) if any(k in keys for k in MARKERS) else {}


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


def with_defaults(settings: dict, models: Models, init=None, mask=None) -> dict:
    """Settings completed from the model's native ones and the init image: size (rounded to 8, grown by the
    outpaint pads), steps, cfg, a refiner's switch (the native 0.8 when a refiner is loaded and neither a switch
    nor a strength is given, as A1111's refiner_switch_at) and the img2img strength."""
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
    for key, value in (models.sampling or {}).items():  # prediction, zero_terminal_snr
        s.setdefault(key, value)
    if models.refiner is not None and s.get("refiner_switch") is None and s.get("refiner_strength") is None:
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
    request_loras(req, models)  # its LoRA tags read and found before anything loads
    warn_stray_tags(req)
    check_embeddings(req, models)
    return req


def check_embeddings(req, models: Models) -> None:
    """The embedding names of a Request's prompts checked against the embeddings folder (Embeddings.check)."""
    if models.embeddings is not None:
        from sdxl.adapters.embeddings import for_model

        texts = [lora_free(req.prompt), req.negative_prompt, req.prompt_2, req.negative_prompt_2]  # as encoded
        for_model(models.embeddings, models.model).check(t for v in texts for t in (v if isinstance(v, tuple) else [v]))


def load_pipeline(models: Models, device, dtype, vae_tiling: bool | None = None, log=print,
                  memory_budget: str | None = None, **speed):
    """The Pipeline of `models` on device/dtype, without LoRAs: each request applies its own set, --lora files and
    tags (`use_loras(pipe, request_loras(req, models))`), so a set is applied once. `memory_budget` ("6GB", "auto",
    "medvram", ...): the memory plan (sdxl.memory), logged in one line. `speed`: Pipeline's fast=, compile=."""
    from sdxl.adapters.apply import use_embeddings
    from sdxl.pipeline import Pipeline

    file_loras(models)  # bad weights fail before the weights load
    plan = None
    if memory_budget is not None:
        from sdxl.memory import Sizes, make_plan

        plan = make_plan(memory_budget, Sizes.of_files(models.model, models.refiner), device, dtype)
        log(plan.line())
        if speed.get("compile") and (plan.weights or plan.stream):  # dynamo recompiles each per-layer upcast
            log(f"--compile is off: the memory plan ({plan.level}) builds the UNet's weights layer by layer")
            speed["compile"] = False
        if models.unet and plan.lazy(models.model):
            raise SDXLError(f"--unet needs the UNet resident; the memory plan ({plan.level}) releases it: give a "
                            "larger --memory-budget or leave it out")
    pipe = Pipeline.load(models.model, models.refiner, models.vae, device=device, dtype=dtype, vae_tiling=vae_tiling,
                         unet=models.unet, memory=plan, **speed)
    use_embeddings(pipe, models.embeddings, log)
    return pipe


@dataclass(frozen=True)
class Written:
    """One PNG written: where, its A1111 infotext and the seed of its image."""

    path: Path
    infotext: str
    seed: int


def run_settings(pipe, memory_budget: str | None) -> dict:
    """What besides the Request and dtype changes a pipeline's numbers, as a recipe records it: `fast` (DeepCache's
    interval) and, where a memory plan stores the UNets' weights in 8 bits, `weights` with the `memory_budget` that
    chose it (plans that only release weights give the same image and are not recorded)."""
    memory = getattr(pipe, "memory", None)
    weights = memory.plan.weights if memory is not None else None
    return ({"fast": pipe.fast} if pipe.fast > 1 else {}) | (
        {"weights": weights, "memory_budget": memory_budget} if weights else {})


def write_images(req, images, models: Models, dtype: str, out: Path, latent=None, watermark: bool = True,
                 numbered: bool = False, embeddings=None, run: dict | None = None) -> list[Written]:
    """PNGs of one request's images, each with infotext and recipe, at `out` (or out-i for a batch; with
    `numbered`, always out-i), never replacing a file; `embeddings` (sdxl.adapters.embeddings.Embeddings): the
    textual-inversion embeddings the prompts could use, those used are named in the infotext. `run`: what besides
    the Request changed the numbers (`run_settings`), recorded in both."""
    from sdxl.formats.png import a1111_parameters, recipe, save_png

    if watermark:
        from sdxl.watermark import add_watermark

        images = add_watermark(images)
    table, loras = models.table(), request_loras(req, models)
    common = recipe(req, table, latent, loras, models.lora_dir)  # file and image hashes: once per request
    written = []
    for i, im in enumerate(images):
        target = out if len(images) == 1 and not numbered else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        text = a1111_parameters(req, table, i, embeddings, loras, run)
        rec = common | {"index": i, "seed_of_image": req.seed + i, "dtype": dtype} | (run or {})
        written.append(Written(save_png(im, target, text, rec), text, req.seed + i))
    return written
