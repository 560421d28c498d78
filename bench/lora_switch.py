"""Switching LoRA sets on a loaded full-size SDXL UNet (sdxl.adapters) vs loading the UNet again.

    flock /tmp/heavy.lock python bench/lora_switch.py --base /work/bench-data/sdxl_base_random_fp16.safetensors

Two random kohya LoRAs (rank 16 on every attention projection of the UNet, as sd-scripts' default minus the
feed-forward and proj layers) are written next to the run; then, in one process: load the UNet (bf16), apply A,
switch to B, remove; merged and at run time. Prints one Markdown row per figure, with `uptime`'s load.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from sdxl.adapters.apply import remove_adapters, use_adapters
from sdxl.formats.checkpoint import load_single_file
from sdxl.formats.files import SafetensorsFile, write_tensors
from sdxl.adapters.lora import sites

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(model, shapes: dict, path: Path, seed: int, rank: int = 16) -> Path:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for s in sites(model.cfg):
        if s.component == "unet" and s.path.endswith(TARGETS):
            rows, cols = shapes[s.path + ".weight"][:2]
            out[f"{s.kohya}.lora_down.weight"] = torch.randn(rank, cols, generator=g, dtype=torch.float16) * 0.01
            out[f"{s.kohya}.lora_up.weight"] = torch.randn(rows, rank, generator=g, dtype=torch.float16) * 0.01
            out[f"{s.kohya}.alpha"] = torch.tensor(float(rank))
    return write_tensors(path, out, {}, mode="new")


def timed(what: str, fn) -> None:
    start = time.perf_counter()
    fn()
    print(f"| {what} | {time.perf_counter() - start:.1f} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    args = ap.parse_args()
    print(f"uptime: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    holder = {}
    timed("load the UNet (bf16)", lambda: holder.update(m=load_single_file(args.base, "cpu", torch.bfloat16, ("unet",))))
    model, shapes = holder["m"], SafetensorsFile(args.base).shapes()
    with tempfile.TemporaryDirectory() as tmp:
        a, b = (random_lora(model, shapes, Path(tmp) / f"{n}.safetensors", i) for i, n in enumerate("ab"))
        for runtime in (False, True):
            mode = "runtime" if runtime else "merged"
            timed(f"{mode}: apply A", lambda: use_adapters(model, [(a, 1.0, 1.0)], runtime))
            timed(f"{mode}: switch A -> B", lambda: use_adapters(model, [(b, 1.0, 1.0)], runtime))
            timed(f"{mode}: remove", lambda: remove_adapters(model))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB, load {os.getloadavg()}")


if __name__ == "__main__":
    main()
