"""Generation as the CLI and the server run it: model files resolved, a Pipeline loaded (with LoRAs), a Request
built from settings and run, PNGs written with infotext and recipe. No argparse and no HTTP here.
"""

from __future__ import annotations

import difflib
import json
import math
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
# A1111's extra-network tag for LoRAs, `<lora:ARG:ARG...>`, and its `lyco` alias (stable-diffusion-webui v1.10.1:
# modules/extra_networks.py re_extra_net, extensions-builtin/Lora/scripts/lora_script.py)
LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]+)>")
TAG_UNSAFE = re.compile(r"[:,<>]")  # not in a tag's NAME: A1111 drops ':' and ',' from `Lora hashes` names too


def tag_name(name: str) -> str:
    """A LoRA's name as a `<lora:NAME:W>` tag and `Lora hashes` write it (a file `we:ird` is `weird`); `find_lora`
    finds the file by it."""
    return TAG_UNSAFE.sub("", name)


TAG_LIKE = re.compile(r"<\s*\w+\s*:[^>]*>?")  # what a user may mean as a tag: `<LORA:x:1>`, `<hypernet:x>`, `<lora:x:1`
PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")  # model files in pickle formats: listed as refused, never loaded


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


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a generation: its name (a tag's NAME, or a --lora file's stem), file, and the multipliers of the
    text encoders and the UNet; `tag`: from a `<lora:...>` tag in the prompt, else from --lora."""

    name: str
    path: str | None = None  # None until the name is found in the LoRA folder
    te: float = 1.0
    unet: float = 1.0
    tag: bool = True


def lora_free(prompt: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """The text the encoders see: the prompt(s) without their `<lora:...>` tags, as A1111 takes them out before its
    prompt parser (modules/extra_networks.py parse_prompt); spaces left around them are tidied, which leaves the
    CLIP tokens unchanged."""
    if not isinstance(prompt, str):
        return tuple(map(lora_free, prompt))
    return re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", LORA_TAG.sub("", prompt))).strip()


def split_loras(prompt: str) -> tuple[str, tuple[LoraUse, ...]]:
    """A prompt's `<lora:...>` tags taken out: (the text the encoders see, a LoraUse per tag, not yet found)."""
    return lora_free(prompt), tuple(_lora_tag(m[1]) for m in LORA_TAG.finditer(prompt))


def _lora_tag(args: str) -> LoraUse:
    """`NAME[:TE[:UNET]]`, `te=`/`unet=` given by name, as A1111 reads a tag (extensions-builtin/Lora/
    extra_networks_lora.py and ExtraNetworkParams in modules/extra_networks.py, v1.10.1): the first number is the text
    encoders' multiplier (default 1), the second the UNet's (default: the first); an item with one `=` is named."""
    items = args.split(":")
    named = dict(i.split("=") for i in items if i.count("=") == 1)
    positional = [i for i in items if i.count("=") != 1]
    tag = f"<lora:{args}>"
    if not positional or not positional[0].strip():
        raise SDXLError(f"{tag}: no LoRA name; write <lora:NAME:0.8>")
    if bad := sorted(set(named) - {"te", "unet"}) or positional[3:]:
        raise SDXLError(f"{tag}: {bad[0]!r} is not supported; a tag takes NAME, a weight, a UNet weight, te=, unet=")
    te = lora_weight(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = lora_weight(named.get("unet", positional[2] if len(positional) > 2 else te), tag)
    return LoraUse(positional[0].strip(), None, te, unet)


# A1111 reads a LoRA weight with Python's float() and no limit (extensions-builtin/Lora/extra_networks_lora.py,
# v1.10.1), which takes `1_0`, `nan` and `inf`. One rule here: a decimal number, exponent allowed, |w| <=
# MAX_LORA_WEIGHT (beyond it a LoRA's change swamps the weights it is added to; sampling overflows).
MAX_LORA_WEIGHT = 10.0
_WEIGHT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def lora_weight(value, where: str) -> float:
    """A LoRA multiplier as --lora FILE:W, <lora:NAME:W:W>, the server's loras and recipes give it (text or a JSON
    number) -> float; anything else (`1_0`, nan, inf, 1e400, |w| > MAX_LORA_WEIGHT) is one line naming `where`."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    w = float(value) if number or isinstance(value, str) and _WEIGHT.fullmatch(value.strip()) else math.nan
    if not (math.isfinite(w) and abs(w) <= MAX_LORA_WEIGHT):
        raise SDXLError(f"{where}: the weight {value!r} must be a number from -{MAX_LORA_WEIGHT:g} to "
                        f"{MAX_LORA_WEIGHT:g}, e.g. 0.8")
    return w + 0.0  # -0.0 is 0


def lora_spec(spec: str, where: str | None = None) -> tuple[str, float]:
    """"FILE" or "FILE:WEIGHT" -> (FILE, weight); a file whose name holds ':' is taken whole; `where` names the
    spec in messages (default: `--lora SPEC`)."""
    where = where or f"--lora {spec!r}"
    path, sep, weight = spec.rpartition(":") if not Path(spec).exists() and ":" in spec else (spec, "", "")
    if not path.strip():
        raise SDXLError(f"{where}: no LoRA file given; write FILE or FILE:WEIGHT, e.g. style.safetensors:0.8")
    return path, lora_weight(weight, where) if sep else 1.0


def inside(path: Path, folder: Path) -> bool:
    """`path` resolves (symlinks followed) to a place inside `folder`."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def find_lora(name: str, folder: str | Path | None) -> Path:
    """The LoRA file a tag's NAME means, found as A1111 finds it (extensions-builtin/Lora/networks.py
    list_available_networks): the stem of a file anywhere under `folder`, else the `ss_output_name` alias in a
    file's metadata; where two files share a stem, their paths inside the folder (sub/NAME) tell them apart.
    Nothing outside the folder (no paths, no symlinks out), and pickles are refused."""
    if not name.strip():
        raise SDXLError("lora '': no LoRA name; give a name listed in loras, e.g. <lora:NAME:0.8>")
    if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
        raise SDXLError(f"lora {name!r}: give a name listed in loras, not a path")
    if folder is None:
        raise SDXLError(f"lora {name!r}: no LoRA folder to find it in (--lora-dir DIR; a server's loras/)")
    folder = Path(folder)
    if not folder.is_dir():
        raise SDXLError(f"lora {name!r}: the LoRA folder {folder} is " + ("not a folder" if folder.exists() else
                        "gone (moved or deleted)") + "; give --lora-dir DIR, the folder the LoRA is in now")
    files = [p for p in sorted(folder.rglob("*")) if p.suffix.lower() in (".safetensors",) + PICKLES
             and not p.name.startswith(".") and p.is_file() and inside(p, folder)]
    stem = {p: p.relative_to(folder).with_suffix("").as_posix() for p in files}
    hits = ([p for p in files if name in (p.stem, stem[p])]
            or [p for p in files if name in (tag_name(p.stem), tag_name(stem[p]))]
            or [p for p in files if p.suffix.lower() == ".safetensors" and _alias(p) == name])
    if len(hits) > 1:
        raise SDXLError(f"lora {name!r}: {len(hits)} files in loras ({folder}) have that name "
                        f"({', '.join(stem[p] for p in hits)}); write the one meant, e.g. <lora:{stem[hits[-1]]}:1>")
    if hits and (why := lora_problem(hits[0])):
        raise SDXLError(f"lora {name!r}: {why}")
    if hits:
        return hits[0]
    names = sorted({p.stem for p in files if not lora_problem(p)})
    close = difflib.get_close_matches(name, names, n=5)
    raise SDXLError(f"lora {name!r}: no such file in loras ({folder}); " + (
        f"close names: {', '.join(close)}" if close else f"choose one of: {', '.join(names[:20]) or '(none)'}"))


def lora_problem(path: Path) -> str | None:
    """Why a file in a LoRA folder cannot be used (a pickle; a header that is no adapter: sdxl.formats.lora
    adapter_problem), None when it can."""
    from sdxl.formats.lora import adapter_problem

    if path.suffix.lower() in PICKLES:
        return f"{path} is a pickle format, never loaded; convert it to .safetensors"
    return adapter_problem(path)


def _alias(path: Path) -> str | None:
    """The name kohya's sd-scripts recorded for a LoRA (metadata ss_output_name), which A1111 also accepts."""
    from sdxl.formats.files import SafetensorsFile

    try:
        return SafetensorsFile(path).metadata.get("ss_output_name")
    except SDXLError:
        return None


def file_loras(models: Models) -> tuple[LoraUse, ...]:
    """The --lora files (FILE or FILE:WEIGHT), named by their stems."""
    return tuple(LoraUse(Path(path).stem, path, w, w, False) for path, w in map(lora_spec, models.loras))


def request_loras(req, models: Models) -> tuple[LoraUse, ...]:
    """Every LoRA of a request, found: the --lora files, then its prompt's tags in models.lora_dir (all the prompts
    of a batch must carry the same tags: one set is applied to the batch)."""
    prompts = (req.prompt,) if isinstance(req.prompt, str) else req.prompt
    tagged = {split_loras(p)[1] for p in prompts}
    if len(tagged) > 1:
        raise SDXLError("prompt: the prompts of one batch carry different <lora:...> tags; one set of LoRAs applies "
                        "to a batch, so give them the same tags (or generate them separately)")
    return file_loras(models) + tuple(replace(u, path=str(find_lora(u.name, models.lora_dir))) for u in tagged.pop())


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
    for key, value in (models.sampling or {}).items():  # prediction, zero_terminal_snr
        s.setdefault(key, value)
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
    request_loras(req, models)  # its LoRA tags read and found before anything loads
    warn_stray_tags(req)
    check_embeddings(req, models)
    return req


def warn_stray_tags(req) -> None:
    """One warning for tag-like text the encoders will read as words: in the prompt anything but a `<lora:...>`/
    `<lyco:...>` tag (`<LORA:x:1>`, `<hypernet:x:1>`, `<lora:x:1` unclosed, `<lora:>`), and any tag in the negative
    and bigG prompts (LoRA tags are taken from the prompt only)."""
    def values(v):
        return [] if v is None else [v] if isinstance(v, str) else list(v)

    stray = [m[0] for p in values(req.prompt) for m in TAG_LIKE.finditer(p) if not LORA_TAG.fullmatch(m[0])]
    stray += [m[0] for v in (req.negative_prompt, req.prompt_2, req.negative_prompt_2) for p in values(v)
              for m in TAG_LIKE.finditer(p)]
    if stray:
        import warnings

        from sdxl.errors import first_few

        warnings.warn(f"{first_few(list(dict.fromkeys(stray)))}: not a LoRA tag, read as words; LoRA tags are "
                      "<lora:NAME:W> (lower case, closed) in the prompt only", stacklevel=2)


def check_embeddings(req, models: Models) -> None:
    """The embedding names of a Request's prompts checked against the embeddings folder (Embeddings.check)."""
    if models.embeddings is not None:
        from sdxl.formats.embeddings import for_model

        texts = [lora_free(req.prompt), req.negative_prompt, req.prompt_2, req.negative_prompt_2]  # as encoded
        for_model(models.embeddings, models.model).check(t for v in texts for t in (v if isinstance(v, tuple) else [v]))


def load_pipeline(models: Models, device, dtype, vae_tiling: bool | None = None, log=print,
                  memory_budget: str | None = None, **speed):
    """The Pipeline of `models` on device/dtype, without LoRAs: each request applies its own set, --lora files and
    tags (`use_loras(pipe, request_loras(req, models))`), so a set is applied once. `memory_budget` ("6GB", "auto",
    "medvram", ...): the memory plan (sdxl.memory), logged in one line. `speed`: Pipeline's fast=, compile=."""
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


def use_loras(pipe, loras: tuple[LoraUse, ...], log=print, runtime: bool = False) -> None:
    """Make `loras` the LoRAs on the pipeline's base without reloading it (`sdxl.adapters.use_adapters`: the set
    before is removed exactly; the same set again costs nothing); each newly applied one reported through `log`."""
    from sdxl.adapters import use_adapters

    memory = getattr(pipe, "memory", None)
    if loras and memory is not None and any(c.mode != "resident" for c in memory.components.values()):
        raise SDXLError(f"LoRAs need the model's weights resident; the memory plan ({memory.plan.level}) releases "
                        "them: give a larger --memory-budget or leave it out")
    applied = use_adapters(pipe.base, [(u.path, u.te, u.unet) for u in loras], runtime)
    for u, adapter in zip(loras, applied):
        weight = f"weight {u.unet}" if u.te == u.unet else f"weight {u.te} text encoders, {u.unet} UNet"
        log(f"LoRA {u.name} ({u.path}): {len(adapter.patches)} layers, {weight}")


def use_embeddings(pipe, folder: str | None, log=print) -> None:
    """The textual-inversion embeddings of `folder` (None: none) for the pipeline's prompts, checked against its
    encoders; the files refused are reported through `log` with the reason. Files are read again only when the
    folder changes (A1111 re-reads its embeddings folder when it changes, too)."""
    from sdxl.formats.embeddings import load_folder

    found = None
    if folder is not None:
        cond = pipe.base.conditioner.cfg
        found = load_folder(folder, (cond.clip_l.width, cond.bigg.width))
        if found is not pipe.tokenizer.embeddings:
            for name, why in found.skipped.items():
                log(f"embedding {name} skipped: {why}")
            log(f"embeddings {folder}: {', '.join(found.loaded) or 'none'} ({len(found.loaded)} loaded)")
    pipe.tokenizer = pipe.tokenizer.with_embeddings(found)


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
    `numbered`, always out-i), never replacing a file; `embeddings` (sdxl.formats.embeddings.Embeddings): the
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
