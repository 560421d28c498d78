"""The `sdxl` command line. Bad input: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from sdxl.errors import SDXLError


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sdxl.formats.checkpoint import inspect

    info = inspect(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"format:        {info['format']}")
    print(f"architecture:  {info['architecture']}")
    print(f"dtype:         {info['dtype']}")
    print("components:")
    for name, c in info["components"].items():
        print(f"  {name:<16}{c['params']:>16,} parameters")
    for label in ("missing_keys", "unexpected_keys", "wrong_shapes"):
        keys = info[label]
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        print(f"{label.replace('_', ' ') + ':':<18}{len(keys)}{' (' + shown + ')' if keys else ''}")
    return 0


# --- generate --------------------------------------------------------------------------------

DEFAULTS = {"negative": "", "steps": None, "sampler": "euler", "scheduler": "sgm", "cfg": None, "width": None,
            "height": None, "batch": 1, "strength": None, "refiner_switch": None, "hires_strength": 0.5,
            "hires_upscale": "latent", "guidance_rescale": 0.0, "output": "sdxl.png", "aesthetic_score": 6.0,
            "negative_aesthetic_score": 2.5, "latent_index": None}


def _pair(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 1024,1024, got {text!r}") from None
    return a, b


def _quad(text: str) -> tuple[int, int, int, int]:
    try:
        v = tuple(int(p) for p in text.split(","))
        assert len(v) == 4
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"expected four integers LEFT,TOP,RIGHT,BOTTOM, got {text!r}") from None
    return v


def _image(path: str | None):
    if path is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise SDXLError(f"{path}: no such image file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise SDXLError(f"{path}: not a readable image ({type(e).__name__})") from None


def _request_from_args(args, model_info) -> "Request":
    """CLI flags (over a --from-png recipe, over the defaults) -> a Request."""
    from sdxl.formats.png import read_recipe, request_fields_from_recipe
    from sdxl.request import Request

    base = request_fields_from_recipe(read_recipe(args.from_png), Request) if args.from_png else {}
    given = {k: v for k, v in vars(args).items() if v is not None}
    merged = dict(base)
    flag_to_field = {"negative": "negative_prompt", "scheduler": "schedule", "prompt_2": "prompt_2",
                     "negative_2": "negative_prompt_2", "original_size": "original_size", "crop": "crop",
                     "target_size": "target_size", "negative_original_size": "negative_original_size",
                     "negative_crop": "negative_crop", "negative_target_size": "negative_target_size"}
    for flag in ("prompt", "negative", "prompt_2", "negative_2", "width", "height", "steps", "sampler", "scheduler",
                 "cfg", "guidance_rescale", "seed", "batch", "strength", "refiner_switch", "refiner_strength",
                 "refiner_steps", "outpaint", "hires_scale", "hires_upscale", "hires_strength", "hires_steps", "original_size",
                 "crop", "target_size", "negative_original_size", "negative_crop", "negative_target_size",
                 "aesthetic_score", "negative_aesthetic_score"):
        name = flag_to_field.get(flag, flag)
        if flag in given:
            merged[name] = given[flag]
        elif name not in merged and DEFAULTS.get(flag) is not None:
            merged[name] = DEFAULTS[flag]
    if args.guidance_interval is not None:
        merged["guidance_interval"] = tuple(args.guidance_interval)
    if merged.get("prompt") is None:
        raise SDXLError("no prompt: give one (sdxl generate \"a red circle\"), --prompts FILE or --from-png IMAGE")
    if "seed" not in merged:
        import secrets

        merged["seed"] = secrets.randbelow(2**32)
    init = _image(args.init_image)
    mask = _image(args.mask)
    native = model_info["resolution"]
    if init is not None and "width" not in merged:
        merged["width"], merged["height"] = (v // 8 * 8 for v in init.size)
        if merged.get("outpaint"):  # the canvas grows by the (rounded-up) pads
            l, t, r, b = (-(-p // 8) * 8 for p in merged["outpaint"])
            merged["width"], merged["height"] = merged["width"] + l + r, merged["height"] + t + b
    merged.setdefault("width", native)
    merged.setdefault("height", native)
    merged.setdefault("steps", model_info["steps"])
    merged.setdefault("cfg", model_info["cfg"])
    if init is not None:
        merged.setdefault("strength", 0.75 if mask is None else 1.0)
    return Request(**merged, init_image=init, mask=mask)


def _resolve_models(args: argparse.Namespace) -> tuple[dict, bool]:
    """Without --model, the embedded default (and its refiner, unless --refiner or --no-refiner) at its native
    settings; returns (native settings, whether the default refiner was chosen)."""
    if args.model is not None:
        return {"resolution": 1024, "steps": 40, "cfg": 5.0, "refiner_switch": 0.8}, False
    from sdxl.default_model import default_model_paths

    info = default_model_paths()
    args.model = str(info["base"])
    default_refiner = args.refiner is None and info.get("refiner") is not None and not args.no_refiner
    if default_refiner:
        args.refiner = str(info["refiner"])
    return info, default_refiner


def _device_and_dtype(args: argparse.Namespace):
    """--device and --dtype, or the best available device and its default dtype."""
    import torch

    from sdxl.pipeline import default_device, default_dtype

    device = args.device or default_device()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    return device, dtype or default_dtype(device)


def _cmd_generate(args: argparse.Namespace) -> int:
    import time

    import torch
    from tqdm import tqdm

    from sdxl.formats.png import a1111_parameters, next_free, recipe, save_png
    from sdxl.pipeline import Pipeline

    if args.from_png:  # the recipe's model files and dtype, unless given
        from sdxl.formats.png import read_recipe

        rec = read_recipe(args.from_png)
        models = rec.get("models", {})
        for k in ("model", "refiner", "vae"):
            if getattr(args, k, None) is None and models.get(k):
                setattr(args, k, models[k])
        args.lora = args.lora or [v for k, v in sorted(models.items()) if k.startswith("lora")] or None
        args.dtype = args.dtype or rec.get("dtype")
    info, default_refiner = _resolve_models(args)
    if default_refiner and args.refiner_switch is None and args.refiner_strength is None:
        args.refiner_switch = info["refiner_switch"]
    prompts = [args.prompt] if args.prompt is not None else []
    if args.prompts:
        try:
            prompts = [line.strip() for line in open(args.prompts, encoding="utf-8") if line.strip()]
        except OSError:
            raise SDXLError(f"{args.prompts}: cannot read the prompts file") from None
    rank, world = _distributed_rank()
    jobs = [(i, p) for i, p in enumerate(prompts or [None]) if i % world == rank]

    device, dtype = _device_and_dtype(args)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    start = time.perf_counter()
    first_args = argparse.Namespace(**vars(args))
    first_args.prompt = jobs[0][1] if jobs and jobs[0][1] is not None else args.prompt
    req0 = _request_from_args(first_args, info)  # validates the flags before loading anything big
    req0.validate(has_refiner=args.refiner is not None)
    tiling = {"on": True, "off": False}.get(args.vae_tiling)
    pipe = Pipeline.load(args.model, args.refiner, args.vae, device=device, dtype=dtype, vae_tiling=tiling)
    for spec in args.lora or []:
        from sdxl.formats.lora import load_lora

        path, _, weight = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
        try:
            multiplier = float(weight) if weight else 1.0
        except ValueError:
            raise SDXLError(f"--lora {spec}: the weight after ':' must be a number, e.g. style.safetensors:0.8") from None
        report = load_lora(pipe.base, path, multiplier)
        print(f"LoRA {path}: {report.total} layers, weight {multiplier}")
    init_latent = None
    if args.latent:
        init_latent = _load_latent(args.latent, args.latent_index)
    models = {"model": args.model, "refiner": args.refiner, "vae": args.vae}
    models |= {f"lora{i}": spec for i, spec in enumerate(args.lora or [])}
    steps_done = 0
    for k, prompt in jobs:
        a = argparse.Namespace(**vars(args))
        if prompt is not None:
            a.prompt = prompt
        req = _request_from_args(a, info)
        if args.prompts:
            req = replace(req, seed=req.seed + k * req.batch)
        if init_latent is not None:
            req = replace(req, init_latent=init_latent, width=init_latent.shape[-1] * pipe.latent_factor,
                          height=init_latent.shape[-2] * pipe.latent_factor)
        bar = tqdm(total=_total_steps(req), desc=f"seed {req.seed}", unit="step", disable=args.quiet)

        counted = [0]

        def tick(_info, bar=bar, counted=counted):
            bar.update(1)
            counted[0] += 1

        result = pipe.generate(req, callback=tick)
        steps_done += counted[0]
        bar.close()
        images = result.images
        if not args.no_watermark:
            from sdxl.watermark import add_watermark

            images = add_watermark(images)
        out = Path(args.output or DEFAULTS["output"])
        if args.prompts:
            out = out.with_name(f"{out.stem}-{k:04d}{out.suffix or '.png'}")
        for i, im in enumerate(images):
            target = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
            rec = recipe(req, models) | {"index": i, "seed_of_image": req.seed + i, "dtype": dtype_name}
            written = save_png(im, target, a1111_parameters(req, models, i), rec)
            print(f"wrote {written}")
        if args.save_latent:
            from safetensors.torch import save_file

            path = next_free(args.save_latent)
            meta = {"recipe": json.dumps(recipe(req, models)), "format": "sdxl latent (N, 4, H/8, W/8), scaled"}
            save_file({"latent": result.latents.contiguous().cpu()}, str(path), metadata=meta)
            print(f"wrote {path}")
    wall = time.perf_counter() - start
    print(f"{wall:.1f} s wall, {wall / max(1, steps_done):.2f} s/step, peak memory {_peak_memory(device)}")
    return 0


def _total_steps(req) -> int:
    """Model evaluations the progress bar counts: one callback per sampler step (all stages)."""
    from sdxl.sampling import schedules

    n = len(schedules.img2img_sigmas(schedules.get_sigmas(req.schedule, req.steps), req.strength)) - 1 \
        if (req.init_image is not None or req.init_latent is not None) and req.refiner_strength is None else req.steps
    if req.refiner_strength is not None:
        n = (0 if req.init_latent is not None else n) + len(schedules.img2img_sigmas(
            schedules.get_sigmas(req.schedule, req.refiner_steps or req.steps), req.refiner_strength)) - 1
    if req.hires_scale:
        n += len(schedules.img2img_sigmas(schedules.get_sigmas(req.schedule, req.hires_steps or req.steps),
                                          req.hires_strength)) - 1
    return n


def _load_latent(path: str, index: int | None):
    from sdxl.formats.checkpoint import SafetensorsFile

    f = SafetensorsFile(path)
    if "latent" not in f:
        raise SDXLError(f"{path}: holds no tensor named 'latent' (write one with --save-latent)")
    t = f["latent"].float()
    if t.ndim != 4 or t.shape[1] != 4:
        raise SDXLError(f"{path}: latent has shape {tuple(t.shape)}, expected (N, 4, H/8, W/8)")
    if index is not None:
        if not 0 <= index < t.shape[0]:
            raise SDXLError(f"--latent-index {index} is out of range: {path} holds {t.shape[0]} latents")
        t = t[index:index + 1]
    if not bool(t.isfinite().all()):
        raise SDXLError(f"{path}: the latent holds non-finite values")
    return t.clone()


def _distributed_rank() -> tuple[int, int]:
    """Under torchrun each rank takes every world-th prompt (RANK/WORLD_SIZE from the environment)."""
    import os

    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _peak_memory(device: str) -> str:
    import resource

    import torch

    if str(device).startswith("cuda"):
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (RSS)"


def _add_generate(sub) -> None:
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
    g.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (kohya or diffusers/PEFT .safetensors) to the base, repeatable; weight default 1")
    g.add_argument("--refiner", help="refiner checkpoint")
    g.add_argument("--no-refiner", action="store_true", help="with the default model: base only")
    g.add_argument("--refiner-switch", type=float, help="hand-off fraction of the schedule (ensemble of experts), e.g. 0.8")
    g.add_argument("--refiner-strength", type=float, help="SDEdit the base's result with the refiner at this strength, e.g. 0.25")
    g.add_argument("--refiner-steps", type=int, help="steps of the refiner's own schedule (SDEdit)")
    g.add_argument("--steps", type=int)
    g.add_argument("--sampler", help="euler, euler_ancestral, heun, dpm_2, dpm_2_ancestral, lms, dpmpp_2m, dpmpp_2m_sde, "
                                     "dpmpp_3m_sde, dpmpp_sde, dpmpp_2s_ancestral, ddim, uni_pc")
    g.add_argument("--scheduler", help="sgm (default), leading, trailing, karras, exponential, sgm_uniform, simple, ddim_uniform")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    g.add_argument("--guidance-rescale", type=float, help="guidance rescale phi (Lin et al. 2023), e.g. 0.7")
    g.add_argument("--guidance-interval", type=float, nargs=2, metavar=("START", "END"),
                   help="apply guidance only on this fraction of the steps, e.g. 0.0 0.8")
    g.add_argument("--seed", type=int, help="image i of a batch uses seed+i (default: random, printed and saved)")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--batch", type=int)
    g.add_argument("--init-image", help="img2img: start from this image")
    g.add_argument("--strength", type=float, help="img2img strength in [0, 1]")
    g.add_argument("--mask", help="inpainting mask (white = repaint), same size as the image")
    g.add_argument("--outpaint", type=_quad, metavar="L,T,R,B", help="outpainting: extend the init image by these pixels")
    g.add_argument("--hires-scale", type=float, help="hires fix: upscale by this factor, then img2img")
    g.add_argument("--hires-upscale", choices=("latent", "pixel"))
    g.add_argument("--hires-strength", type=float)
    g.add_argument("--hires-steps", type=int)
    g.add_argument("--original-size", type=_pair, help="micro-conditioning original size H,W (default: the output size)")
    g.add_argument("--crop", type=_pair, help="micro-conditioning crop top,left (default 0,0)")
    g.add_argument("--target-size", type=_pair, help="micro-conditioning target size H,W")
    g.add_argument("--negative-original-size", type=_pair)
    g.add_argument("--negative-crop", type=_pair)
    g.add_argument("--negative-target-size", type=_pair)
    g.add_argument("--aesthetic-score", type=float, help="refiner aesthetic score (default 6.0)")
    g.add_argument("--negative-aesthetic-score", type=float, help="refiner negative aesthetic score (default 2.5)")
    g.add_argument("--save-latent", help="also write the final latents to this safetensors file (tensor 'latent')")
    g.add_argument("--latent", help="start from a latent written by --save-latent (with --refiner-strength: refine it)")
    g.add_argument("--latent-index", type=int, help="which latent of that file")
    g.add_argument("--no-watermark", action="store_true", help="omit the invisible watermark")
    g.add_argument("-o", "--output", help="output PNG (never overwritten: a free name is chosen and printed)")
    g.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    g.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: fp16/bf16 on GPU, bf16 on CPUs with AMX, else fp32")
    g.add_argument("--vae-tiling", choices=("auto", "on", "off"), help="tile the VAE (auto: above 1024x1024 pixels)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_generate)


# --- eval ------------------------------------------------------------------------------------

def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 10,20,40, got {text!r}") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    from sdxl.lab import evaluate
    from sdxl.pipeline import Pipeline

    out = Path(args.out)
    evaluate.check_out(out, args.overwrite)  # before loading anything big
    bad = [k for k in args.experiments if k not in (1, 2, 3, 4)]
    if bad or not args.experiments:
        given = ",".join(map(str, args.experiments)) or "(none)"
        raise SDXLError(f"--experiments takes numbers from 1,2,3,4, got {given}")
    info, _ = _resolve_models(args)
    if args.no_refiner:
        args.refiner = None
    variants = Path(args.variants) if args.variants else Path("bench/variants")
    variants = variants if args.variants or variants.is_dir() else None
    settings = evaluate.Settings(resolution=args.resolution or info["resolution"], n=args.n, steps=args.steps,
                                 samplers=tuple(v for v in args.samplers.split(",") if v), native_steps=info["steps"],
                                 cfg=info["cfg"], refiner_switch=info["refiner_switch"], seed=args.seed,
                                 batch=args.batch, quiet=args.quiet)
    settings.validate()
    device, dtype = _device_and_dtype(args)
    pipe = Pipeline.load(args.model, args.refiner, device=device, dtype=dtype)
    models = {"model": args.model, "refiner": args.refiner, "dtype": str(dtype).removeprefix("torch."),
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
    e.add_argument("--refiner", help="refiner checkpoint")
    e.add_argument("--no-refiner", action="store_true", help="the base alone")
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
    e.add_argument("--device", help="cpu, cuda, mps (default: the best available)")
    e.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="default: as for generate")
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
    t.add_argument("--steps", type=int, default=1600)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
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
    d = sub.add_parser("detect-watermark",
                       help="read SDXL's invisible watermark: matched bits and the reference's verdict")
    d.add_argument("images", nargs="+")
    d.set_defaults(func=_cmd_detect_watermark)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdxl", description="Stable Diffusion XL: inspect checkpoints, generate, train.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    q = sub.add_parser("inspect", help="read a checkpoint's headers: format, architecture, dtype, parameters, key check")
    q.add_argument("path", help="a single-file .safetensors checkpoint or a diffusers folder")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_cmd_inspect)
    _add_generate(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_detect_watermark(sub)
    _add_judge(sub)
    _add_recipe(sub)
    _add_train_vae(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = lambda message, *args, **kw: f"sdxl: warning: {message}\n"
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except SDXLError as e:
        print(f"sdxl: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sdxl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
