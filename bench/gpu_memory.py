"""Peak GPU memory per `--memory-budget` (4, 6, 8 GB cards simulated on a large GPU), base+refiner at 1024x1024.

    python bench/gpu_memory.py [--budgets 4GB 6GB 8GB 24GB] [--steps 4]      # on a GPU, about 5 minutes
    python bench/gpu_memory.py --device cpu --dry-run                          # smoke test: tiny model, 64 px

For each budget, in a fresh process: `torch.cuda.set_per_process_memory_fraction(budget / total)` so that the
allocator refuses more than the card would have, then `load_pipeline` with that budget and a generation (refiner
switch 0.5, CFG 5); prints the plan line, the peak allocated (`torch.cuda.max_memory_allocated`, from before
loading), the peak reserved, seconds to loaded and to the image, or the out-of-memory error. Weights come from
the full-size random files of bench/make_weights.py. UNTESTED ON A GPU so far (written with none lent): the dry
run checks the same code path on CPU with a tiny model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

START = time.perf_counter()
DATA = "/work/bench-data"
FILES = (f"{DATA}/sdxl_base_random_fp16.safetensors", f"{DATA}/sdxl_refiner_random_fp16.safetensors")


def child(budget: str, device: str, files: tuple[str, str], size: int, steps: int) -> dict:
    import torch

    from sdxl.memory import parse_budget
    from sdxl.request import Request
    from sdxl.session import load_pipeline, resolve_models

    dtype = torch.bfloat16 if device == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("cuda"):
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_budget(budget) / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    lines = []
    out = {"budget": budget}
    try:
        pipe = load_pipeline(resolve_models(*files, False), device, dtype, log=lines.append, memory_budget=budget)
        out["loaded_s"] = round(time.perf_counter() - START, 1)
        req = Request(prompt="a red boat on a lake", width=size, height=size, steps=steps, cfg=5.0, seed=0,
                      refiner_switch=0.5)
        pipe.generate(req)
        out["total_s"] = round(time.perf_counter() - START, 1)
    except torch.OutOfMemoryError as e:
        out["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
    out["plan"] = lines[0] if lines else ""
    if device.startswith("cuda"):
        out["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    else:
        import resource

        out["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    return out


def tiny_files(folder: str) -> tuple[str, str]:
    """A tiny random base and refiner as single files (the dry run's stand-ins for the full-size ones)."""
    from sdxl.formats import checkpoint as ck
    from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel

    paths = (os.path.join(folder, "tiny.safetensors"), os.path.join(folder, "tiny_refiner.safetensors"))
    for cfg, path in zip((TINY_BASE, TINY_REFINER), paths):
        ck.save_single_file(SDXLModel(cfg), path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=["4GB", "6GB", "8GB", "24GB"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--dry-run", action="store_true", help="a tiny model at 64 px (checks the script, not the GPU)")
    ap.add_argument("--child", nargs=3, metavar=("BUDGET", "BASE", "REFINER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.device, tuple(a.child[1:]), a.size, a.steps)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        files, size = (tiny_files(tmp), 64) if a.dry_run else (FILES, a.size)
        for budget in a.budgets:
            cmd = [sys.executable, __file__, "--device", a.device, "--steps", str(a.steps), "--size", str(size),
                   "--child", budget, *files]
            out = subprocess.run(cmd, capture_output=True, text=True)
            print(out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr.strip()[-2000:], flush=True)


if __name__ == "__main__":
    main()
