"""The quality cost of `--fast` (DeepCache) and of the memory planner's 8-bit UNet weights on the embedded default
model: judge accuracy, the final latents' relative error vs the full run, and the sampling time, per mode, on the
held-out prompts of `sdxl eval` (prompt i with seed i, 128 px, 20 Euler steps, CFG 5, base + refiner at 0.8).

Usage: python bench/fast_quality.py [--n 64] [--modes full fast2 fast3 int8 fp8] [--dtype bf16] [--write]
Modes: full; fastN = `--fast N`; int8 / fp8 = the 8bit level of `--memory-budget` (UNet weights stored in 8 bits,
one scale per output channel, upcast per layer; fp8 e4m3 is what the planner picks on GPUs).
Writes bench/fast_grid.png (one row per mode, the first 8 prompts) and, with --write, rows to bench/RESULTS.md.
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


def load(files: tuple[str, str], dtype: torch.dtype, mode: str) -> Pipeline:
    """The default model's pipeline for a mode (see the module docstring)."""
    if mode in ("int8", "fp8"):
        from sdxl import memory

        plan = replace(memory.level_plan("8bit", "cpu"), weights=mode)
        return Pipeline.load(*files, dtype=dtype, memory=plan)
    return Pipeline.load(*files, dtype=dtype, fast=int(mode.removeprefix("fast")) if mode != "full" else 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["full", "fast2", "fast3", "int8", "fp8"])
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    info = default_model_paths()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    files = str(info["base"]), str(info["refiner"])
    judge, scenes, s = Judge.load(), eval_scenes(args.n, 0), Settings(n=args.n, batch=16)
    req = s.request(refiner_switch=s.refiner_switch)
    prompts = [sc.caption for sc in scenes]
    rows, grid, full = [], [], None
    for mode in args.modes:
        pipe = load(files, dtype, mode)
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
        label = f"--fast {pipe.fast}" if pipe.fast > 1 else f"UNet weights {mode}" if mode in ("int8", "fp8") else mode
        rows.append(f"| {date.today()} | load {os.getloadavg()[0]:.1f} | {label} | {acc['accuracy']:.3f} | "
                    f"{acc['objects']:.3f} | {acc['background']:.3f} | {err:.3f} | {seconds:.1f} s |")
        print(rows[-1], flush=True)
        grid.append((label, images[:8]))
    image_grid(grid, label_width=70).save(HERE / "fast_grid.png")
    if args.write:
        from results import append_rows

        append_rows("## Fast mode (DeepCache) and 8-bit weights on the embedded default: quality",
                    f"Command: `python bench/fast_quality.py --write` ({args.n} held-out prompts, {args.dtype}; "
                    "images: bench/fast_grid.png)", "| date | machine | mode | accuracy | objects | background | "
                    "latent rel. error vs full | sampling time |\n|---|---|---|---|---|---|---|---|", rows)


if __name__ == "__main__":
    main()
