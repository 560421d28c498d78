"""Forward time of our SDXL base UNet vs diffusers' UNet2DConditionModel, same weights, same inputs, same run.

Usage: python bench/unet_vs_diffusers.py [--latent 32] [--batch 2] [--reps 3] [--dtype fp32] [--channels-last]
Random full-size weights, shared between both models (no copy). Timings alternate between the two models so
that machine noise hits both alike; the ratio is the result, not the absolute seconds.
"""

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from sdxl.formats.checkpoint import _unet_diffusers_config
from sdxl.models.conditioning import FourierEmbedder
from sdxl.formats.convert import to_ours, unet_table
from sdxl.models.unet import SDXL_BASE, UNet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--write", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    theirs = UNet2DConditionModel.from_config(_unet_diffusers_config(SDXL_BASE)).to(dtype).eval()
    ours = UNet(SDXL_BASE, device="meta")
    ours.load_state_dict(to_ours(unet_table(SDXL_BASE), theirs.state_dict()), strict=True, assign=True)
    ours.eval()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    theirs.to(memory_format=fmt)
    ours.to(memory_format=fmt)
    b, n = args.batch, args.latent
    x = torch.randn(b, 4, n, n, dtype=dtype).contiguous(memory_format=fmt)
    t = torch.full((b,), 500.0)
    ctx = torch.randn(b, 77, 2048, dtype=dtype)
    pooled = torch.randn(b, 1280, dtype=dtype)
    ids = torch.tensor([[n * 8, n * 8, 0, 0, n * 8, n * 8]] * b, dtype=torch.float32)
    y = torch.cat([pooled, FourierEmbedder(256)(ids).to(dtype)], 1)
    runs = {"ours": lambda: ours(x, t, ctx, y),
            "diffusers": lambda: theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample}
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for k, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    load = os.getloadavg()[0]
    line = (f"| {date.today()} | {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"load {load:.1f} | "
            f"base UNet, batch {b}, {n}x{n} latent, {args.dtype}{', channels-last' if args.channels_last else ''} | "
            f"{med['ours']:.2f} s | {med['diffusers']:.2f} s | {med['diffusers'] / med['ours']:.2f}x |")
    print(line)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        text = path.read_text() if path.exists() else "# Benchmark results\n"
        head = "## UNet forward vs diffusers"
        if head not in text:
            text += (f"\n{head}\n\nCommand: `python bench/unet_vs_diffusers.py --write [flags]` (median of reps, "
                     "alternating models in one run; random full-size weights shared by both).\n\n"
                     "| date | machine | case | ours | diffusers | speed-up |\n|---|---|---|---|---|---|\n")
        lines = text.split("\n")
        i = lines.index(head)
        j = i + 1
        while j < len(lines) and not lines[j].startswith("## "):
            j += 1
        while lines[j - 1] == "":
            j -= 1
        lines.insert(j, line)
        path.write_text("\n".join(lines) + ("\n" if not lines[-1] == "" else ""))


if __name__ == "__main__":
    main()
