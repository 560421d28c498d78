"""The `sdxl` command line. Bad input: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import fields, replace
from pathlib import Path

from sdxl.errors import SDXLError
from sdxl.adapters.apply import use_loras
from sdxl.adapters.tags import request_loras
from sdxl.session import (DTYPES, Models, build_request, check_embeddings, check_folder, configure_threads,
                          device_and_dtype, dtype_name, load_pipeline, process_seconds, resolve_models, run_settings,
                          threads_note, write_images)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is an SDXLError (one line, exit 2 from main) instead of usage text + SystemExit."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # -inf, -1e5 and -5,-5 are values, not flags (argparse knows only -5 and -.5): `--cfg -inf` is range-checked
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)[\w.,+-]*$", re.IGNORECASE)

    def error(self, message: str):
        raise SDXLError(f"{message} (see {self.prog} --help)")


def _integers(count: int | None, what: str, separators: str = ","):
    """An argparse type: integers split at any of `separators`, exactly `count` of them (None: any, blanks skipped)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in re.split(f"[{separators}]", text.lower()) if count or v.strip())
            if count is None or len(values) == count:
                return values
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return parse


_pair = _integers(2, "two integers like 1024,1024", ",x")
_quad = _integers(4, "four integers LEFT,TOP,RIGHT,BOTTOM")
_ints = _integers(None, "comma-separated integers like 10,20,40")


def _interval(text: str) -> int:
    """--fast N: 1 (off) to 10."""
    if not text.isdigit() or not 1 <= int(text) <= 10:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 (off) to 10, got {text!r}")
    return int(text)


def _add_device_flags(p: argparse.ArgumentParser, dtype_help: str = "default: as for generate") -> None:
    p.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help=dtype_help)


def _add_memory_flags(parser: argparse.ArgumentParser) -> None:
    p = parser.add_mutually_exclusive_group()  # one budget: --medvram --lowvram together is a mistake
    p.add_argument("--memory-budget", help="plan memory for this much: 4GB, 6GB, 8GB, ... or auto (free RAM, or free "
                   "VRAM on a GPU): text encoders and UNets released after use, 8-bit UNet weights, streaming; "
                   "the plan is printed in one line")
    for level, budget in (("medvram", "8GB"), ("lowvram", "4GB")):
        p.add_argument(f"--{level}", action="store_const", const=level, dest="memory_budget",
                       help=f"A1111's level: --memory-budget {budget}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sdxl.formats.checkpoint import inspect

    info = inspect(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    for label in ("format", "architecture", "dtype"):
        print(f"{label + ':':<15}{info[label]}")
    if s := info.get("sampling"):  # a single file's v_pred/ztsnr keys
        print(f"{'prediction:':<15}{s['prediction']}" + (", zero terminal SNR" if s["zero_terminal_snr"] else ""))
    print("components:")
    for name, c in info["components"].items():
        print(f"  {name:<16}{c['params']:>16,} parameters")
    for label in ("missing_keys", "unexpected_keys", "wrong_shapes"):
        keys = info[label]
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        print(f"{label.replace('_', ' ') + ':':<18}{len(keys)}{' (' + shown + ')' if keys else ''}")
    return 0


def _add_inspect(sub) -> None:
    q = sub.add_parser("inspect", help="read a checkpoint's headers: format, architecture, dtype, parameters, key "
                                       "check")
    q.add_argument("path", help="a single-file .safetensors checkpoint or a diffusers folder")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_cmd_inspect)


# --- generate --------------------------------------------------------------------------------

OUTPUT = "sdxl.png"
# generate's flags whose Request field has another name; every other flag named like a field sets that field
FLAG_FIELDS = {"negative": "negative_prompt", "negative_2": "negative_prompt_2", "scheduler": "schedule"}


def _warn_hash(thing: str, have: str, want: str, png: str, made: str = "with") -> None:
    """A replayed file (or image) whose hash is not the one the PNG records: a warning naming it."""
    if have != want:
        warnings.warn(f"{thing} has hash {have} but {png} was made {made} hash {want}; the image will differ")


def _generate_models(args: argparse.Namespace, rec) -> Models:
    """Flags over the recipe's model files; the recipe's hashes checked against the files used now."""
    from sdxl.formats.png import file_hash, local_path, model_files, replay_lora

    check_folder("--lora-dir", args.lora_dir, "the LoRAs")  # the recipe's own folder is checked where it is used
    recorded = {k: local_path(v) for k, v in rec.models.items()}
    given = {"model": args.model, "refiner": args.refiner, "vae": args.vae, "unet": args.unet}
    if empty := next((k for k, v in given.items() if v is not None and not v.strip()), None):  # else read as unset
        raise SDXLError(f"--{empty} '': no file given; give the file, or leave --{empty} out")
    for key, path in recorded.items():
        missing = key in given and given[key] is None and not Path(path).exists()
        if missing and not (key == "refiner" and args.no_refiner):
            raise SDXLError(f"{args.from_png} was made with {key} {path}, which is not on this machine; give "
                            f"--{key} PATH" + (" or --no-refiner" if key == "refiner" else ""))
    files = {k: v or recorded.get(k) for k, v in given.items()}
    lora_dir = args.lora_dir or rec.lora_dir
    keys = sorted((k for k in recorded if k.startswith("lora")), key=lambda k: int(k[4:]))
    loras = args.lora or [replay_lora(recorded[k], lora_dir, f"{args.from_png}: {k}") for k in keys]
    m = resolve_models(**files, no_refiner=args.no_refiner, loras=loras, embeddings=args.embeddings_dir,
                       lora_dir=lora_dir)
    changed = [(f"{key} {path}", file_hash(path)[:10], rec.hashes[key]) for key, path in model_files(m.table()).items()
               if rec.hashes.get(key)]  # every file, a LoRA's with or without a weight
    for thing, have, want in changed + _replayed_embeddings(args, m):
        _warn_hash(thing, have, want, args.from_png)
    return m


def _replayed_embeddings(args: argparse.Namespace, m: Models) -> list[tuple[str, str, str]]:
    """--from-png of an image whose infotext names textual-inversion embeddings (`TI hashes`): each must load from
    --embeddings-dir (else the names would be read as plain words: another image); (what, hash, recorded)."""
    if not args.from_png:
        return []
    from sdxl.adapters.embeddings import Embeddings, for_model, recorded_hashes
    from sdxl.images import opened

    with opened(args.from_png, "--from-png") as im:
        recorded = recorded_hashes(str(im.info.get("parameters", "")))
    found = for_model(m.embeddings, m.model) if m.embeddings and recorded else Embeddings({}, {})
    missing, changed = found.replay(recorded)
    if missing:
        reasons = "; ".join(f"{n}: {r}" for n, r in missing.items())
        why = f"that --embeddings-dir {m.embeddings} does not load ({reasons})" if m.embeddings else \
            f"({', '.join(missing)})"
        raise SDXLError(f"{args.from_png} was made with textual-inversion embeddings {why}; give the folder that "
                        "holds them with --embeddings-dir DIR")
    return [(f"embedding {e.name} {e.path}", e.hash, want) for e, want in changed]


def _read_prompts(args: argparse.Namespace) -> list[str | None]:
    """The prompt argument, or the lines of --prompts (UTF-8), or [None] (the recipe's prompt)."""
    if not args.prompts:
        return [args.prompt]
    if args.prompt is not None:
        raise SDXLError("a prompt and --prompts FILE were both given: put the prompt in the file, or drop --prompts")
    from sdxl.images import regular_file

    path = regular_file(args.prompts, "--prompts", "file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SDXLError(f"--prompts {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save the file as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()] or [None]


def _settings(args: argparse.Namespace, rec, models: Models, init) -> dict:
    """Request settings: flags over a --preset over the recipe (None: no --from-png); the model's native settings
    fill the rest, in build_request."""
    from sdxl.presets import preset_settings
    from sdxl.request import NOT_SETTINGS, Request

    names = {f.name for f in fields(Request)} - set(NOT_SETTINGS)  # --init-image and --mask are files
    flags = {FLAG_FIELDS.get(k, k): v for k, v in vars(args).items() if v is not None}
    given = {k: v for k, v in flags.items() if k in names}
    preset = preset_settings(args.preset, models.native["resolution"]) if args.preset else {}
    if {"width", "height"} & given.keys():  # a size given replaces the preset's as a whole (sdxl.presets)
        preset = {k: v for k, v in preset.items() if k not in ("width", "height")}
    s = (rec.settings if rec else {}) | preset | given
    if init is None and "width" not in s and "height" not in s and models.native_from != "SDXL's default":
        size = models.native["resolution"]
        print(f"size {size}x{size}: the native resolution {models.native_from}")
    return s


def _replayed_latent(args: argparse.Namespace, rec) -> tuple[str, int | None] | None:
    """--latent FILE and --latent-index, or the saved latent the recipe records (its hash must still match)."""
    if args.latent_index is not None and not (args.latent or rec.latent):
        raise SDXLError("--latent-index picks one latent of a --latent file; give --latent FILE too, or drop it")
    if args.latent or not rec.latent:
        return (args.latent, args.latent_index) if args.latent else None
    from sdxl.formats.png import file_hash

    path, index = rec.latent["file"], rec.latent["index"]
    where = f"{args.from_png} was made from the saved latent {path} (index {index})"
    if not Path(path).is_file():
        raise SDXLError(f"{where}, which is not there; pass that file with --latent")
    if (have := file_hash(path)[:10]) != rec.latent["hash"]:
        raise SDXLError(f"{where}, which has changed since (hash {have}, recorded {rec.latent['hash']}); "
                        "replaying would give another image")
    return path, index if args.latent_index is None else args.latent_index


def _load_latent(path: str, index: int | None):
    """A latent written by --save-latent: its shape checked from the header (limits named) before reading it."""
    from sdxl.formats.checkpoint import SafetensorsFile
    from sdxl.request import MAX_BATCH, MAX_SIDE

    f = SafetensorsFile(path)
    if "latent" not in f:
        raise SDXLError(f"{path}: holds no tensor named 'latent' (write one with --save-latent)")
    shape = f.shapes()["latent"]
    if not f.dtypes()["latent"].is_floating_point:
        raise SDXLError(f"{path}: latent is {f.dtypes()['latent']}, expected floating point (as --save-latent writes)")
    if len(shape) != 4 or shape[1] != 4 or not shape[0]:
        raise SDXLError(f"{path}: latent has shape {tuple(shape)}, expected (N, 4, H/8, W/8) with N >= 1")
    if shape[0] > MAX_BATCH or max(shape[2:]) > MAX_SIDE // 8:
        raise SDXLError(f"{path}: latent of shape {tuple(shape)} is over the limit of {MAX_BATCH} latents of "
                        f"{MAX_SIDE // 8}x{MAX_SIDE // 8} ({MAX_SIDE} pixels a side)")
    if index is not None and not 0 <= index < shape[0]:
        raise SDXLError(f"--latent-index {index} is out of range: {path} holds {shape[0]} latents")
    t = f["latent"].float()
    t = t if index is None else t[index:index + 1]
    if not bool(t.isfinite().all()):
        raise SDXLError(f"{path}: the latent holds non-finite values")
    return t.clone()


def _requests(args: argparse.Namespace, rec, models: Models, latent) -> list:
    """One Request per prompt, built once from flags over the recipe over the native settings, all validated
    before anything big is loaded. --prompts: prompt k uses seed + k * batch. Each prompt's `<lora:...>` tags
    stay in it and are found in --lora-dir; a replayed PNG's LoRA whose file changed since is a warning."""
    from sdxl.formats.png import image_hash, lora_hash
    from sdxl.images import load_image
    from sdxl.request import NOT_SETTINGS as FLAGS

    images = {k: load_image(getattr(args, k), FLAGS[k]) if getattr(args, k) else None for k in ("init_image", "mask")}
    for key, want in (rec.inputs or {}).items():  # an img2img/inpainting PNG's images must be given again
        if images[key] is None:
            raise SDXLError(f"{args.from_png} was made from {'an init image' if key == 'init_image' else 'a mask'} "
                            f"(hash {want}); give it again "
                            f"with {FLAGS[key]}")
        _warn_hash(f"{FLAGS[key]} {getattr(args, key)}", image_hash(images[key]), want, args.from_png,
                   "from one with")
    settings = _settings(args, rec, models, images["init_image"])
    prompts = _read_prompts(args)
    if prompts[0] is None and settings.get("prompt") is None:
        if args.from_png:
            raise SDXLError(f"{args.from_png}: its recipe holds no prompt; give one (sdxl generate \"a red circle\" "
                            f"--from-png {args.from_png})")
        raise SDXLError("no prompt: give one (sdxl generate \"a red circle\"), --prompts FILE or --from-png IMAGE")
    first = build_request(settings | ({"prompt": prompts[0]} if prompts[0] is not None else {}), models, "generate",
                          images["init_image"], images["mask"], latent)
    reqs = [replace(first, prompt=p or first.prompt, seed=first.seed + k * first.batch) for k, p in enumerate(prompts)]
    for req in reqs:
        req.validate(has_refiner=models.refiner is not None)
        check_embeddings(req, models)
        for u in request_loras(req, models):
            if want := (rec.lora_hashes or {}).get(u.name):
                _warn_hash(f"LoRA {u.name}: {u.path}", lora_hash(u.path), want, args.from_png)
    return reqs


def _check_outputs(args: argparse.Namespace) -> None:
    """The output paths, checked before the work: a writable folder (missing ones are made), a name that fits."""
    import errno
    import os
    import tempfile

    # room for a free name's and the batch's suffixes (files.write_file "free") and the temporary name
    room = len(".-0000-00-000.tmp-0000000")
    targets = [("-o", Path(args.output or OUTPUT), ".png")]
    targets += [("--save-latent", Path(args.save_latent), ".safetensors")] if args.save_latent else []
    for flag, target, want in targets:
        longest = max((len(os.fsencode(p)) for p in target.parts), default=0)  # "." has no parts
        most = os.pathconf(target.anchor or ".", "PC_NAME_MAX")
        if longest + room > most:
            raise SDXLError(f"{flag} {target}: a name of {longest} bytes is too long here (at most {most - room}, "
                            "leaving room for numbered names)")
        if target.is_dir():
            raise SDXLError(f"{flag} {target} is a folder; give a file name such as "
                            f"{(target / OUTPUT).with_suffix(want)}")
        if target.exists() and not target.is_file():
            raise SDXLError(f"{flag} {target} is not a regular file (a device or pipe); give a file name")
        if target.suffix.lower() != want:
            why = "(it carries the infotext) " if want == ".png" else ""
            raise SDXLError(f"{flag} {target}: the file written is {want[1:].upper()} {why}so its name must end in "
                            f"{want}, e.g. {target.with_suffix(want).name}")
        folder = next((p for p in target.parents if p.exists()), target.parents[-1])  # the nearest that exists
        if not folder.is_dir():
            raise SDXLError(f"{flag} {target}: {folder} is a file, not a folder")
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            why = "read-only" if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else e.strerror
            raise SDXLError(f"{flag} {target}: cannot write in {folder} ({why}); choose another folder") from None


def _write(args: argparse.Namespace, k: int, req, result, models: Models, dtype: str, latent, embeddings,
           run: dict) -> None:
    """The PNGs (infotext and recipe) and, with --save-latent, the latents of one request."""
    out = Path(args.output or OUTPUT)
    if args.prompts:
        out = out.with_name(f"{out.stem}-{k:04d}{out.suffix or '.png'}")
    for w in write_images(req, result.images, models, dtype, out, latent, watermark=not args.no_watermark,
                          embeddings=embeddings, run=run):
        print(f"wrote {w.path}")
    if args.save_latent:
        from sdxl.formats.files import write_tensors
        from sdxl.formats.png import recipe

        Path(args.save_latent).parent.mkdir(parents=True, exist_ok=True)
        meta = {"recipe": json.dumps(recipe(req, models.table(), latent, request_loras(req, models), models.lora_dir)),
                "format": "sdxl latent (N, 4, H/8, W/8), scaled"}
        print(f"wrote {write_tensors(args.save_latent, {'latent': result.latents}, meta, mode='free')}")


def _cmd_generate(args: argparse.Namespace) -> int:
    import os
    import time

    from tqdm import tqdm

    from sdxl.formats.png import Recipe, read_recipe

    rec = read_recipe(args.from_png) if args.from_png else Recipe({}, {}, {})
    models = _generate_models(args, rec)
    device, dtype, why = device_and_dtype(args.device, args.dtype or rec.dtype)
    latent = _replayed_latent(args, rec)  # (file, index) or None
    init_latent = _load_latent(*latent) if latent else None
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    reqs = list(enumerate(_requests(args, rec, models, init_latent)))[rank::world]  # torchrun: every world-th prompt
    _check_outputs(args)
    start = time.perf_counter()
    budget = args.memory_budget or rec.memory_budget  # a recipe's run settings, flags first
    pipe = load_pipeline(models, device, dtype, {"on": True, "off": False}.get(args.vae_tiling),
                         fast=args.fast or rec.fast, compile=args.compile, memory_budget=budget)
    run = run_settings(pipe, budget)
    if args.from_png and rec.weights != run.get("weights"):
        warnings.warn(f"{args.from_png} was made with UNet weights in {rec.weights or 'full precision'}, this run "
                      f"has them in {run.get('weights') or 'full precision'} (--memory-budget); the image will differ")
    steps = []
    for k, req in reqs:
        if init_latent is not None:  # the size in pixels needs the VAE's factor, known once it is loaded
            size = (init_latent.shape[-1] * pipe.latent_factor, init_latent.shape[-2] * pipe.latent_factor)
            if (args.width or size[0], args.height or size[1]) != size:
                raise SDXLError(f"--latent {latent[0]} is {size[0]}x{size[1]} pixels; --width/--height cannot change "
                                "it (drop them, or upscale with --hires-scale)")
            req = replace(req, width=size[0], height=size[1])
            req.validate(has_refiner=models.refiner is not None)
        use_loras(pipe, request_loras(req, models))
        with tqdm(total=pipe.plan(req).total_steps, desc=f"seed {req.seed}", unit="step", disable=args.quiet) as bar:
            result = pipe.generate(req, callback=lambda info: (bar.update(1), steps.append(1)))
        _write(args, k, req, result, models, dtype_name(dtype), latent, pipe.tokenizer.embeddings, run)
    wall = time.perf_counter() - start
    compiled = f", compiling {pipe.compile_seconds:.1f} s of it" if args.compile else ""
    print(f"{wall:.1f} s wall{compiled} ({process_seconds():.1f} s since the process started, {threads_note()}), "
          f"{wall / max(1, len(steps)):.2f} s/step, peak memory {_peak_memory(device)}, {dtype_name(dtype)} ({why})")
    return 0


def _peak_memory(device: str) -> str:
    import resource

    import torch

    if str(device).startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (RSS)"


def _add_image_flags(g: argparse.ArgumentParser) -> None:
    """generate's img2img, inpainting, hires-fix and micro-conditioning flags."""
    g.add_argument("--init-image", help="img2img: start from this image")
    g.add_argument("--strength", type=float, help="img2img strength in [0, 1]")
    g.add_argument("--mask", help="inpainting mask (white = repaint), same size as the image")
    g.add_argument("--mask-blur", type=int, metavar="PX", help="blur of the pasted-back mask edge (default 4)")
    g.add_argument("--outpaint", type=_quad, metavar="L,T,R,B",
                   help="outpainting: extend the init image by these pixels")
    g.add_argument("--hires-scale", type=float, help="hires fix: upscale by this factor, then img2img")
    g.add_argument("--hires-upscale", choices=("latent", "pixel"))
    g.add_argument("--hires-strength", type=float)
    g.add_argument("--hires-steps", type=int)
    g.add_argument("--original-size", type=_pair,
                   help="micro-conditioning original size H,W (default: the output size)")
    g.add_argument("--crop", type=_pair, help="micro-conditioning crop top,left (default 0,0)")
    g.add_argument("--target-size", type=_pair, help="micro-conditioning target size H,W")
    for flag in ("--negative-original-size", "--negative-crop", "--negative-target-size"):
        g.add_argument(flag, type=_pair)
    g.add_argument("--aesthetic-score", type=float, help="refiner aesthetic score (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=float, help="refiner negative aesthetic score (default 2.5)")


def _add_run_flags(g: argparse.ArgumentParser) -> None:
    """generate's device, precision, memory (sdxl.memory plans it) and speed flags."""
    _add_device_flags(g, "default: bf16 on GPUs that support it, else fp16; on CPUs bf16 where a quick matmul probe "
                         "finds it faster than fp32 (CPUs with AMX or AVX512-BF16; cached per CPU model), else fp32. "
                         "The summary line prints the choice and why; use fp32 to compare with fp32 references")
    g.add_argument("--vae-tiling", choices=("auto", "on", "off"),
                   help="run the VAE in row bands: less memory, the same image (auto: from 1024x1024 pixels a batch)")
    _add_memory_flags(g)
    g.add_argument("--fast", type=_interval, nargs="?", const=2, default=0, metavar="N",
                   help="reuse the UNet's deep features N-1 UNet calls in N (DeepCache; N=2 if omitted): about 2x "
                        "faster per step at N=2; details change and objects can move (bench/RESULTS.md); recorded "
                        "in the PNG and replayed")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: the first step compiles (minutes for SDXL; cached in "
                        "~/.cache/sdxl/inductor); the summary line gives the compile time")


def _add_generate(sub) -> None:
    from sdxl.presets import PRESETS
    from sdxl.request import MAX_BATCH, MAX_SIDE, MAX_STEPS, PREDICTIONS
    from sdxl.sampling import names

    g = sub.add_parser("generate", help="make images: txt2img, img2img, inpainting, refiner, hires fix",
                       description="Generate images. Without --model, the embedded small default model is used.")
    g.add_argument("prompt", nargs="?", help="the prompt (A1111 weighting: (word:1.2), (word), [word]; BREAK)")
    g.add_argument("--negative", help="negative prompt (empty: zero embedding for the base, as the reference)")
    g.add_argument("--prompt-2", help="a separate prompt for the OpenCLIP bigG encoder")
    g.add_argument("--negative-2", help="a separate negative prompt for bigG")
    g.add_argument("--prompts", help="a file of prompts, one a line (under torchrun each rank takes its share)")
    g.add_argument("--from-png", help="reproduce an image written by sdxl generate (flags given override its recipe)")
    g.add_argument("--model", help="checkpoint: single-file .safetensors or diffusers folder")
    g.add_argument("--vae", help="a standalone VAE replacing the checkpoint's")
    g.add_argument("--unet", help="a UNet-only file replacing the checkpoint's (official or diffusers names, e.g. "
                                  "SDXL-Lightning's); its shapes must be the model's")
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (kohya or diffusers/PEFT .safetensors) to the base, repeatable; weight default 1")
    g.add_argument("--lora-dir", help="the folder where a prompt's <lora:NAME:WEIGHT> tags are found by file name, "
                                      "subfolders included, as in A1111 (default for --from-png: the one recorded)")
    g.add_argument("--embeddings-dir", metavar="DIR", help="textual-inversion embeddings (SDXL .safetensors): a "
                   "file's name in a prompt stands for its vectors, e.g. (NAME:1.2) (default: none)")
    refiner = g.add_mutually_exclusive_group()  # --refiner FILE --no-refiner: contradictory
    refiner.add_argument("--refiner", help="refiner checkpoint")
    refiner.add_argument("--no-refiner", action="store_true", help="with the default model: base only")
    g.add_argument("--refiner-switch", type=float,
                   help="hand-off fraction of the schedule (ensemble of experts), e.g. 0.8")
    g.add_argument("--refiner-strength", type=float,
                   help="SDEdit the base's result with the refiner at this strength, e.g. 0.25")
    g.add_argument("--refiner-steps", type=int, help="steps of the refiner's own schedule (SDEdit)")
    g.add_argument("--preset", choices=tuple(PRESETS), help="a few-step model's published sampler, scheduler, "
                   "steps, CFG scale (and size): turbo (SDXL-Turbo), lightning-4step/-8step (SDXL-Lightning), "
                   "hyper-8step (Hyper-SD LoRA), lcm (LCM-LoRA); flags given override it")
    g.add_argument("--steps", type=int, help=f"sampling steps, at most {MAX_STEPS} (default: the model's native)")
    g.add_argument("--sampler", help=f"{names.sampler_help()} (default euler)")
    g.add_argument("--scheduler", help=f"{names.schedule_help()} (default sgm)")
    g.add_argument("--eta", type=float, help="fresh noise per step, 0..1, of the samplers that add it: ancestral, SDE, "
                   "ddim (default 0) and tcd (its gamma, default 0.3); default: the sampler's own (1 for the others)")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    g.add_argument("--prediction", choices=PREDICTIONS,
                   help="what the UNet predicts (default: as the checkpoint says by its v_pred key, else epsilon)")
    g.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction,
                   help="the UNet was trained with zero terminal SNR (Lin et al. 2024; default: as its ztsnr key says)")
    g.add_argument("--guidance-rescale", type=float, help="guidance rescale phi (Lin et al. 2023), e.g. 0.7")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("START", "END"),
                   help="apply guidance only on this fraction of the steps, e.g. 0.0 0.8")
    g.add_argument("--seed", type=int, help="image i of a batch uses seed+i (default or -1: random, printed and saved)")
    g.add_argument("--width", type=int, help=f"a multiple of 8, at most {MAX_SIDE} (default: the model's native)")
    g.add_argument("--height", type=int, help=f"a multiple of 8, at most {MAX_SIDE}")
    g.add_argument("--batch", type=int, help=f"images per prompt, at most {MAX_BATCH}")
    _add_image_flags(g)
    g.add_argument("--save-latent", help="also write the final latents to this safetensors file (tensor 'latent')")
    g.add_argument("--latent", help="start from a latent written by --save-latent (with --refiner-strength: refine it)")
    g.add_argument("--latent-index", type=int, help="which latent of that file")
    g.add_argument("--no-watermark", action="store_true", help="omit the invisible watermark")
    g.add_argument("-o", "--output", help="output PNG (never overwritten: a free name is chosen and printed)")
    _add_run_flags(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no seed line (the seed is saved)")
    g.set_defaults(func=_cmd_generate)


def generate_help() -> dict[str, str]:
    """Request field -> the help of the generate flag that sets it (the server documents its API with them)."""
    sub = _Parser().add_subparsers()
    _add_generate(sub)
    flags = {a.dest: a.help for a in sub.choices["generate"]._actions if a.help}
    return {FLAG_FIELDS.get(k, k): v for k, v in flags.items()}


# --- serve -----------------------------------------------------------------------------------

def _cmd_serve(args: argparse.Namespace) -> int:
    import os
    import socket

    import uvicorn

    from sdxl.serve.app import create_app, worker_devices
    from sdxl.serve.config import ServeConfig
    from sdxl.serve.jobs import check_database, claim

    if args.api_auth is not None and ":" not in args.api_auth:
        raise SDXLError("--api-auth takes USER:PASS")
    config = ServeConfig(args.host, args.port, args.models_dir and Path(args.models_dir), Path(args.output_dir),
                         args.api_auth, args.insecure, args.device, args.dtype, tuple(args.allow_host or ()),
                         workers=args.workers, memory_plan=args.memory_budget)
    worker_devices(args.device, args.workers)  # a bad --workers is one line before the server starts
    if args.memory_budget is not None:  # a bad budget, too
        from sdxl.memory import parse_budget

        parse_budget(args.memory_budget)
    if config.exposed() and not config.api_auth:
        print(f"sdxl: warning: --host {args.host} serves every machine that can reach this one, without a password",
              file=sys.stderr)
        if not args.insecure:
            raise SDXLError(f"refusing to serve on {args.host} without --api-auth USER:PASS "
                            "(or add --insecure if the network is trusted)")
    if args.models_dir and not Path(args.models_dir).is_dir():
        raise SDXLError(f"--models-dir {args.models_dir}: " + ("not a folder" if Path(args.models_dir).exists()
                        else "no such folder") + "; give the folder that holds checkpoints/, loras/, ...")
    device_and_dtype(args.device, args.dtype)  # an unavailable device is one line here, not a traceback at start
    try:  # the port is free (uvicorn's own failure comes after the banner, with a traceback)
        socket.create_server((args.host, args.port)).close()
    except OSError as e:
        raise SDXLError(f"--port {args.port} on {args.host}: {e.strerror}; give a free --port (or stop the server "
                        "using it)") from None
    try:  # --output-dir made if missing, and not in use by another server (checked again when the server starts)
        config.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SDXLError(f"--output-dir {config.output_dir}: cannot create it ({e.strerror})") from None
    if (fd := claim(config.output_dir)) is not None:
        os.close(fd)
    check_database(config.database)
    print(f"serving on http://{args.host}:{args.port} (models: {args.models_dir or 'the embedded default'}; "
          f"images and jobs: {args.output_dir})", file=sys.stderr)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


def _port(text: str) -> int:
    if not text.strip().isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="an HTTP server: job queue, native API, A1111 API, web page",
                       description="Serve generation over HTTP. Without --models-dir, the embedded default model.")
    s.add_argument("--models-dir", help="folder with checkpoints/ (or Stable-diffusion/), loras/ (or Lora/), "
                                        "embeddings/, vae/")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=7860, help="default 7860")
    s.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP Basic auth")
    s.add_argument("--output-dir", default="outputs", help="where images and the job database go (default outputs)")
    s.add_argument("--insecure", action="store_true", help="allow a non-local --host without --api-auth")
    s.add_argument("--allow-host", action="append", metavar="NAME",
                   help="also accept requests whose Host is NAME (e.g. a reverse proxy's public name); repeatable. "
                        "Others are refused (403) against DNS rebinding")
    _add_device_flags(s)
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="workers taking jobs from the one queue in order (default 1); each its own GPU when there "
                        "are several (cuda:0..N-1), else they share the device (on CPU, its cores)")
    _add_memory_flags(s)
    s.set_defaults(func=_cmd_serve)


# --- eval ------------------------------------------------------------------------------------

def _cmd_eval(args: argparse.Namespace) -> int:
    from sdxl.lab import evaluate
    from sdxl.pipeline import Pipeline

    out = Path(args.out)
    evaluate.check_out(out, args.overwrite)  # before loading anything big
    if not args.experiments or not set(args.experiments) <= {1, 2, 3, 4}:
        given = ",".join(map(str, args.experiments)) or "(none)"
        raise SDXLError(f"--experiments takes numbers from 1,2,3,4, got {given}")
    m = resolve_models(args.model, args.refiner, args.no_refiner)
    info = m.native
    variants = Path(args.variants or "bench/variants")
    variants = variants if args.variants or variants.is_dir() else None
    settings = evaluate.Settings(resolution=args.resolution or info["resolution"], n=args.n, steps=args.steps,
                                 samplers=tuple(v for v in args.samplers.split(",") if v), native_steps=info["steps"],
                                 cfg=info["cfg"], refiner_switch=info["refiner_switch"], seed=args.seed,
                                 batch=args.batch, quiet=args.quiet)
    settings.validate()
    device, dtype, _ = device_and_dtype(args.device, args.dtype)
    pipe = Pipeline.load(m.model, m.refiner, device=device, dtype=dtype)
    models = {"model": m.model, "refiner": m.refiner, "dtype": str(dtype).removeprefix("torch."),
              "device": str(device)}
    _, table = evaluate.run(pipe, settings, sorted(set(args.experiments)), variants, out, models)
    print(table)
    print(f"\nwrote {out / 'results.json'} and the image grids", file=sys.stderr)
    return 0


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="measure the SDXL report's claims on a model: prompt accuracy, crop, size, aspect",
                       description="Evaluate a model of the synthetic world with the judge; prints a markdown table, "
                                   "writes OUT/results.json and image grids. Without --model, the default model "
                                   "at its native settings.")
    e.add_argument("--model", help="base checkpoint (default: the embedded default model)")
    refiner = e.add_mutually_exclusive_group()
    refiner.add_argument("--refiner", help="refiner checkpoint")
    refiner.add_argument("--no-refiner", action="store_true", help="the base alone")
    e.add_argument("--variants", help="folder of UNet-only files full, no-crop, no-size, no-size-drop-small "
                                      ".safetensors for experiments 2-3 (default: bench/variants if it exists)")
    e.add_argument("--n", type=int, default=64, help="held-out prompts (default 64)")
    e.add_argument("--steps", type=_ints, default=(10, 20, 40), help="step counts of experiment 1 (default 10,20,40)")
    e.add_argument("--samplers", default="euler,dpmpp_2m", help="samplers of experiment 1 (default euler,dpmpp_2m); "
                                                                "experiments 2-4 use the first")
    e.add_argument("--experiments", type=_ints, default=(1, 2, 3, 4), help="which to run (default 1,2,3,4)")
    e.add_argument("--out", default="eval-out", help="folder for results.json and grids (default eval-out)")
    e.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out")
    e.add_argument("--seed", type=int, default=0, help="selects the prompts and the noise (prompt i: seed + i)")
    e.add_argument("--batch", type=int, default=16, help="prompts per sampling run (default 16)")
    e.add_argument("--resolution", type=int, help="native square size (default: the default model's, else 1024)")
    _add_device_flags(e)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_eval)


# --- train -----------------------------------------------------------------------------------

def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from sdxl.train import config, train

    cfg = config.load(args.config, args.set or [])
    final = train(cfg, output=args.output, resume=args.resume, quiet=args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"wrote {final}")
    return 0


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train or fine-tune (full UNet or LoRA) from a TOML config; torchrun for DDP/FSDP",
                       description="Train an SDXL-family model. Checkpoints go to --output (DIR/step-*, DIR/latest); "
                                   "the result is DIR/final.safetensors.")
    t.add_argument("config", help="TOML file of settings (see examples/train_tiny.toml)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, TOML syntax: --set lr=1e-4 --set unet.model_channels=128 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in --output from DIR/latest")
    t.add_argument("-o", "--output", help="run folder (default: the config's output)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)


# --- lab and tools: judge, recipe, train-vae, detect-watermark ----------------------------------

def _command_line(command: str, flags: dict) -> str:
    """The command with the flags that determine its result, as typed to repeat it (recorded in what it writes)."""
    return " ".join([command, *(f"--{k.replace('_', '-')} {v}" for k, v in flags.items())])


def _cmd_judge_train(args: argparse.Namespace) -> int:
    from sdxl.lab.judge import ASSETS, train_and_evaluate

    out = args.out or str(ASSETS / "judge")
    command = _command_line("sdxl judge train", {"steps": args.steps, "seed": args.seed, "pool": args.pool, "out": out})
    results = train_and_evaluate(out, args.steps, args.seed, args.batch, args.lr, args.pool, args.heldout, command)
    for name, r in results.items():
        print(f"held-out {name}:", json.dumps({k: round(v, 4) for part in r.values() for k, v in part.items()}))
    print(f"saved {Path(out).with_suffix('.safetensors')}")
    return 0


def _add_judge(sub) -> None:
    j = sub.add_parser("judge", help="the synthetic world's judge (a small CNN that reads images back into scenes)")
    jsub = j.add_subparsers(dest="judge_command", metavar="ACTION", required=True)
    t = jsub.add_parser("train", help="train the judge, read fresh scenes, save .safetensors + .json")
    for flag, kind, default in ("--steps", int, 1600), ("--seed", int, 0), ("--batch", int, 64), ("--lr", float, 2e-3):
        t.add_argument(flag, type=kind, default=default)
    t.add_argument("--pool", type=int, default=20000, help="scenes rendered for training")
    t.add_argument("--heldout", type=int, default=2000, help="fresh scenes to evaluate on")
    t.add_argument("--out", help="path without suffix: writes .safetensors and .json (default: the shipped judge, "
                                 "sdxl/assets/judge)")
    t.set_defaults(func=_cmd_judge_train)


def _cmd_recipe(args: argparse.Namespace) -> int:
    import time

    from sdxl.lab.recipe import DEFAULT_STAGES, RecipeRun, run

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else DEFAULT_STAGES
    settings = RecipeRun(Path(args.out), stages, args.scale, args.jobs, args.workers, args.cache,
                         args.assets and Path(args.assets), args.variants_dir and Path(args.variants_dir),
                         args.deadline, args.variant)
    started = time.perf_counter()
    run(settings, _command_line("sdxl recipe", {"out": args.out, "stages": ",".join(stages), "scale": args.scale,
                                                "jobs": args.jobs, "workers": args.workers, "cache": args.cache}))
    print(f"recipe stages {','.join(stages)} done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


def _add_recipe(sub) -> None:
    import math

    r = sub.add_parser("recipe", help="make the embedded default model: world data, VAE, base, refiner, eval variants")
    r.add_argument("--out", default="runs/default", help="working folder (resumable: finished stages are kept)")
    r.add_argument("--stages", help="comma-separated stage names (default: those that make the default model; "
                                    "sdxl/lab/recipe.py's STAGES lists them all, as does an unknown name's error)")
    r.add_argument("--scale", type=float, default=1.0, help="multiply every step and image count (tests: 0.001)")
    r.add_argument("--jobs", type=int, default=1, help="trainings run at once (base, refiner, variants)")
    r.add_argument("--workers", type=int, default=0, help="data-loading processes per training")
    r.add_argument("--cache", default="auto",
                   help="cache latents and text embeddings (one crop per image); auto: only without a GPU")
    r.add_argument("--assets", help="where export writes the default model (default OUT/assets; the shipped one is "
                                    "src/sdxl/assets, never overwritten unless named here)")
    r.add_argument("--variants-dir",
                   help="where export-variants writes (default OUT/variants; eval reads bench/variants)")
    r.add_argument("--deadline", type=float, default=math.inf,
                   help="epoch seconds: trainings stop there and keep their latest checkpoint (time-boxed runs)")
    r.add_argument("--variant", default="", help=argparse.SUPPRESS)  # one variant, in a --jobs child process
    r.set_defaults(func=_cmd_recipe)


def _cmd_train_vae(args: argparse.Namespace) -> int:
    import typing

    from sdxl.train.config import coerce, parse_value
    from sdxl.train.vae import VAETrainConfig, train_vae

    hints = {k: tp for k, tp in typing.get_type_hints(VAETrainConfig).items() if k not in ("dataset", "vae")}
    settings = {}
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or key.strip() not in hints:
            raise SDXLError(f"--set {item!r}: expected KEY=VALUE, KEY one of {', '.join(hints)}")
        settings[key.strip()] = coerce(parse_value(text), hints[key.strip()], f"--set {key.strip()}")
    train_vae(VAETrainConfig(args.dataset, **settings), args.out, quiet=args.quiet)
    return 0


def _add_train_vae(sub) -> None:
    v = sub.add_parser("train-vae", help="train a small SDXL-family VAE (reconstruction + a little KL)")
    v.add_argument("--dataset", required=True, help="a folder of images or a .jsonl manifest")
    v.add_argument("--out", required=True, help="the VAE file to write (.safetensors; never overwritten)")
    v.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a VAETrainConfig setting (sdxl/train/vae.py), TOML syntax: --set steps=1500 "
                        "--set decoder_only=true (repeatable)")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    v.set_defaults(func=_cmd_train_vae)


def _cmd_detect_watermark(args: argparse.Namespace) -> int:
    from sdxl.watermark import WATERMARK_BITS, detect_file

    for path in args.images:
        matches, text = detect_file(path)
        print(f"{path}: {matches}/{len(WATERMARK_BITS)} bits match: {text}")
    return 0


def _add_detect_watermark(sub) -> None:
    d = sub.add_parser("detect-watermark", help="read SDXL's invisible watermark: matched bits and the reference's "
                                                "verdict")
    d.add_argument("images", nargs="+")
    d.set_defaults(func=_cmd_detect_watermark)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sdxl", description="Stable Diffusion XL: inspect checkpoints, generate, train.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_inspect, _add_generate, _add_serve, _add_train, _add_eval, _add_detect_watermark, _add_judge,
                _add_recipe, _add_train_vae):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    configure_threads()  # before torch is imported: OpenMP reads its settings once
    warnings.formatwarning = lambda message, *args, **kw: f"sdxl: warning: {message}\n"
    for stream in (sys.stdout, sys.stderr):  # file names with bytes that are not UTF-8 are printed, not a traceback
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return args.func(args)
    except SDXLError as e:
        print(f"sdxl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdxl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
