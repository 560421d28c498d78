"""The quality cost of `--fast` (DeepCache) on the embedded default model: judge accuracy, the final latents'
relative error vs the full run, and the sampling time, per level, on the held-out prompts of `sdxl eval`
(prompt i with seed i, 128 px, 20 Euler steps, CFG 5, base + refiner at 0.8).

Usage: python bench/fast_quality.py [--n 64] [--levels 0 2 3] [--dtype bf16] [--write]
Writes bench/fast_grid.png (one row per level, the first 8 prompts) and, with --write, rows to bench/RESULTS.md.
"""

import argparse
import os
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

from sdxl.default_model import default_model_paths
from sdxl.lab.evaluate import Settings, accuracy, eval_scenes, image_grid
from sdxl.lab.judge import Judge
from sdxl.pipeline import Pipeline

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    info = default_model_paths()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    pipe = Pipeline.load(str(info["base"]), str(info["refiner"]), dtype=dtype)
    judge, scenes, s = Judge.load(), eval_scenes(args.n, 0), Settings(n=args.n, batch=16)
    req = s.request(refiner_switch=s.refiner_switch)
    prompts = [sc.caption for sc in scenes]
    rows, grid, full = [], [], None
    for level in args.levels:
        pipe.fast = level
        start, images, latents = time.perf_counter(), [], []
        for i in range(0, len(prompts), s.batch):
            chunk = tuple(prompts[i:i + s.batch])
            result = pipe.generate(replace(req, prompt=chunk, seed=i, batch=len(chunk)))
            images += result.images
            latents.append(result.latents)
        seconds = time.perf_counter() - start
        z = torch.cat(latents)
        full = z if full is None else full
        err = float((z - full).norm() / full.norm())
        acc = accuracy(judge, images, scenes)
        label = "full" if level < 2 else f"--fast {level}"
        rows.append(f"| {date.today()} | load {os.getloadavg()[0]:.1f} | {label} | {acc['accuracy']:.3f} | "
                    f"{acc['objects']:.3f} | {acc['background']:.3f} | {err:.3f} | {seconds:.1f} s |")
        print(rows[-1], flush=True)
        grid.append((label, images[:8]))
    image_grid(grid, label_width=70).save(HERE / "fast_grid.png")
    if args.write:
        from results import append_rows

        append_rows("## Fast mode (DeepCache) on the embedded default: quality",
                    f"Command: `python bench/fast_quality.py --write` ({args.n} held-out prompts, {args.dtype}; "
                    "images: bench/fast_grid.png)", "| date | machine | mode | accuracy | objects | background | "
                    "latent rel. error vs full | sampling time |\n|---|---|---|---|---|---|---|---|", rows)


if __name__ == "__main__":
    main()
