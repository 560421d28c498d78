"""Which base training reaches a judge-readable model in the fewest steps: the recipe's base stage under a few
learning rates and loss weightings, trained at once on one GPU, each scored by the judge (base alone).

    PYTHONPATH=src python scripts/base_sweep.py --out DIR --steps 4500 --deadline EPOCH_SECONDS

DIR must hold the recipe's `data`, `vae.safetensors` and `init_base.safetensors` (stages data, vae, init). The
trainings read one shared latent cache (filled first by --fill processes) as the CPU recipe does. Prints one JSON
line per configuration and writes DIR/sweep.json. How the recipe's base settings were chosen (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from sdxl.lab import recipe

CONFIGS = {
    "lr3e-4": {},  # the recipe before this sweep
    "lr3e-4-minsnr5": {"min_snr_gamma": 5.0},
    "lr1e-3": {"lr": 1e-3},
    "lr1e-3-minsnr5": {"lr": 1e-3, "min_snr_gamma": 5.0},
    "lr2e-3-minsnr5": {"lr": 2e-3, "min_snr_gamma": 5.0},
    "lr1e-3-minsnr5-short": {"lr": 1e-3, "min_snr_gamma": 5.0, "steps": 0.6},  # steps: a fraction of --steps
}


def overrides(name: str, steps: int) -> dict:
    o = dict(CONFIGS[name])
    o["steps"] = round(steps * o.get("steps", 1.0))
    return o


def fill(out: Path, rank: int, world: int) -> None:
    """This process's share of the shared cache (latents and captions), as the trainer would write it."""
    from sdxl.models.tokenizer import Tokenizer
    from sdxl.train import data, loop

    cfg = recipe.train_config("base", out, 1.0, 0, cache=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loop.build_model(cfg, device)
    items, _ = data.scan(cfg.dataset, out)
    buckets = data.make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect)
    bucket_of = [data.nearest_bucket(it.size, buckets) for it in items]
    loop.build_cache(cfg, model, Tokenizer.default(), items, buckets, bucket_of, loop.Dist(rank, world, device))


def score(path: Path, n: int) -> dict:
    from sdxl.lab import evaluate
    from sdxl.lab.judge import Judge
    from sdxl.pipeline import Pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = Pipeline.load(path, device=device, dtype=torch.float32)
    s = evaluate.Settings(n=n, steps=(20,), samplers=("euler",), batch=64)
    scenes = evaluate.eval_scenes(n, 0)
    images = evaluate.generate(pipe, [sc.caption for sc in scenes], s.request(), s)
    return evaluate.accuracy(Judge.load(device=device), images, scenes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=4500)
    p.add_argument("--deadline", type=float, default=float("inf"))
    p.add_argument("--n", type=int, default=128, help="prompts the judge scores")
    p.add_argument("--fill", type=int, nargs=2, metavar=("RANK", "WORLD"), help=argparse.SUPPRESS)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--fillers", type=int, default=12)
    args = p.parse_args()
    if args.fill:
        return fill(args.out, *args.fill)
    if args.one:  # one configuration, in its own process
        start = time.perf_counter()
        path = recipe.run_training("base", args.out, 1.0, 2, cache=True, deadline=args.deadline,
                                   overrides=overrides(args.one, args.steps), folder=args.out / f"sweep-{args.one}")
        row = {"config": args.one, **overrides(args.one, args.steps), "trained_s": round(time.perf_counter() - start),
               **recipe.record(args.out, f"sweep-{args.one}"), **score(path, args.n)}
        print(json.dumps(row), flush=True)
        (args.out / f"sweep-{args.one}.json").write_text(json.dumps(row) + "\n")
        return
    me = [sys.executable, __file__, "--out", str(args.out), "--steps", str(args.steps), "--deadline",
          str(args.deadline), "--n", str(args.n)]
    start = time.perf_counter()
    fillers = [subprocess.Popen(me + ["--fill", str(r), str(args.fillers)]) for r in range(args.fillers)]
    if any(f.wait() for f in fillers):
        raise SystemExit("cache fill failed")
    print(f"cache filled in {time.perf_counter() - start:.0f} s", flush=True)
    runs = [subprocess.Popen(me + ["--one", name]) for name in CONFIGS]
    for r in runs:
        r.wait()
    rows = [json.loads((args.out / f"sweep-{n}.json").read_text()) for n in CONFIGS
            if (args.out / f"sweep-{n}.json").is_file()]
    (args.out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
