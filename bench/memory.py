"""Peak memory per memory-planner level, and the quality cost of 8-bit UNet weights, on the full-size random files.

    python bench/memory.py generate [--budgets 8GB 6GB 2GB] [--size 1024] [--steps 2]
    python bench/memory.py quality [--latent 32]

generate: for each budget, in a fresh process, `load_pipeline` with that `--memory-budget` and a base+refiner
generation (refiner switch 0.5: one base and one refiner step at --steps 2, CFG 5 so batch 2 through each UNet);
the plan line, seconds to loaded and to the image, and the peak RSS (ru_maxrss: mapped file pages count too).
quality: the base UNet's output on fixed inputs (seeded noise, timestep 500, random text embeddings) with int8
and fp8 e4m3 weights (upcast per layer) against the same UNet with the file's fp16 weights computed in float32
(streamed from the file layer by layer, so it fits in memory); bf16 (resident) is shown for scale.
Random weights are Gaussian, without the outliers of trained weights: the 8-bit errors here are a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

START = time.perf_counter()
DATA = "/work/bench-data"
BASE, REFINER = f"{DATA}/sdxl_base_random_fp16.safetensors", f"{DATA}/sdxl_refiner_random_fp16.safetensors"


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def generate(base: str, refiner: str, budget: str, device: str, size: int, steps: int, dtype_name: str) -> dict:
    """One base+refiner generation under a memory budget; what it cost."""
    import torch

    from sdxl.request import Request
    from sdxl.session import DTYPES, load_pipeline, resolve_models

    dtype = getattr(torch, DTYPES[dtype_name])
    lines = []
    pipe = load_pipeline(resolve_models(base, refiner, False), device, dtype, log=lines.append, memory_budget=budget)
    loaded = time.perf_counter() - START
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    req = Request(prompt="a red boat on a lake", width=size, height=size, steps=steps, cfg=5.0, seed=0,
                  refiner_switch=0.5)
    image = pipe.generate(req).images[0]
    out = {"budget": budget, "plan": lines[0] if lines else "", "loaded_s": round(loaded, 1),
           "total_s": round(time.perf_counter() - START, 1), "peak_rss_gib": peak_rss_gib(),
           "image": f"{image.size[0]}x{image.size[1]}"}
    if device.startswith("cuda"):
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def unet_error(latent: int) -> dict:
    """Relative error (Frobenius) of the base UNet's output with 8-bit and bf16 weights vs fp32 compute."""
    import torch

    from sdxl import memory
    from sdxl.pipeline import Pipeline

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, latent, latent, generator=g)
    args = (x, torch.tensor([500.0]), torch.randn(1, 77, 2048, generator=g), torch.randn(1, 2816, generator=g))
    outs = {}
    for name, dtype, plan in (("fp32", torch.float32, memory.level_plan("stream", "cpu")),
                              ("int8", torch.float32, memory.level_plan("8bit", "cpu")),
                              ("fp8", torch.float32, memory.Plan(**{**memory.level_plan("8bit", "cpu").__dict__,
                                                                     "weights": "fp8"})),
                              ("bf16", torch.bfloat16, memory.level_plan("offload", "cpu"))):
        pipe = Pipeline.load(BASE, dtype=dtype, memory=plan)
        t = time.perf_counter()
        with torch.no_grad():
            outs[name] = pipe.base.unet(*args).float()
        print(f"{name}: UNet forward {time.perf_counter() - t:.1f} s, peak RSS so far {peak_rss_gib()} GiB", flush=True)
        del pipe
    ref = outs.pop("fp32")
    return {k: round(float((v - ref).norm() / ref.norm()), 5) for k, v in outs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("generate", "quality"))
    ap.add_argument("--budgets", nargs="+", default=["8GB", "6GB", "2GB"])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.what == "quality":
        print(json.dumps({"relative_error_vs_fp32": unet_error(a.latent), "latent": a.latent}))
        return
    if a.child:
        print(json.dumps(generate(BASE, REFINER, a.child, "cpu", a.size, a.steps, a.dtype)))
        return
    for budget in a.budgets:
        out = subprocess.run([sys.executable, __file__, "generate", "--child", budget, "--size", str(a.size),
                              "--steps", str(a.steps), "--dtype", a.dtype], capture_output=True, text=True)
        result = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr.strip()[-2000:]
        print(f"{result} | load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
