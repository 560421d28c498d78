"""Forward time of our SDXL base UNet vs diffusers' UNet2DConditionModel, same weights, same inputs, same run.

Usage: python bench/unet_vs_diffusers.py [--px 512 1024] [--dtype bf16 fp32] [--batch 2] [--reps 3] [--write]
                                        [--profile]

Random full-size weights, shared between both models (no copy), channels-last. Diffusers runs its best eager setup:
SDPA (its default processor), channels-last, `fuse_qkv_projections()`. Timings alternate between the models so that
machine noise hits both alike; the ratios are the result, not the absolute seconds. Per case it prints
- ours: equal numerics (fused self-attention QKV, the text's K/V kept across calls as during sampling);
- fast: `Pipeline(fast=2)`, DeepCache every other call: the mean of a full and a shallow call, and its relative
  error on fixed inputs (a shallow call vs the full call it replaces, a step apart; for scale, beside it the
  relative difference of our and diffusers' outputs, which is rounding alone);
- the machine's bf16 (or fp32) matmul limit, measured by a probe in the same run, and the fraction of it each
  model reaches (FLOPs counted by torch.utils.flop_counter on the meta device);
- with --profile, where our forward's time goes: the share of each kind of op (torch.profiler self time).
"""

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdxl.formats.checkpoint import _unet_diffusers_config
from sdxl.formats.convert import to_ours, unet_table
from sdxl.models.conditioning import FourierEmbedder
from sdxl.models.unet import SDXL_BASE, DeepCache, UNet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
HEAD = "## UNet forward vs diffusers"
COLUMNS = ("| date | machine, load | case | ours | diffusers | ours/diffusers | fast (DeepCache 2) | fast speed-up | "
           "fast rel. error (ours vs diffusers) | matmul limit | fraction ours / diffusers |\n|" + "---|" * 11)


def matmul_limit(dtype: torch.dtype, reps: int = 3) -> float:
    """The best FLOP/s of a few UNet-shaped matmuls (tokens x width @ width x 4 width) in `dtype`."""
    best = 0.0
    for m, k, n in ((8192, 640, 2560), (2048, 1280, 5120), (2048, 5120, 1280)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def unet_flops(inputs: tuple) -> int:
    """FLOPs of one base UNet forward on these input shapes (meta device: nothing is computed)."""
    meta = UNet(SDXL_BASE, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(*(t.to("meta") for t in inputs))
    return counter.get_total_flops()


def models(dtype: torch.dtype, theirs=None):
    """(ours, theirs) sharing random full-size weights in `dtype`; `theirs` is recast in place when given."""
    from diffusers import UNet2DConditionModel

    if theirs is None:
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # initialised in `dtype`: no float32 copy of 2.6 B weights first
        theirs = UNet2DConditionModel.from_config(_unet_diffusers_config(SDXL_BASE))
        torch.set_default_dtype(default)
    theirs.to(dtype).eval().to(memory_format=torch.channels_last)
    state = {k: v for k, v in theirs.state_dict().items() if ".to_qkv." not in k and ".to_kv." not in k}  # fused
    ours = UNet(SDXL_BASE, device="meta")
    ours.load_state_dict(to_ours(unet_table(SDXL_BASE), state), strict=True, assign=True)
    ours.eval().to(memory_format=torch.channels_last)
    ours.fuse_qkv()
    theirs.fuse_qkv_projections()
    return ours, theirs


def inputs(dtype: torch.dtype, batch: int, px: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = px // 8
    x = torch.randn(batch, 4, n, n, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(batch, 77, 2048, generator=g).to(dtype)
    pooled = torch.randn(batch, 1280, generator=g).to(dtype)
    ids = torch.tensor([[px, px, 0, 0, px, px]] * batch, dtype=torch.float32)
    y = torch.cat([pooled, FourierEmbedder(256)(ids).to(dtype)], 1)
    return x, ctx, pooled, ids, y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def fast_error(ours: UNet, x, ctx, y) -> float:
    """A DeepCache shallow call vs the full call at the same input: x at t=500, then one Euler step later."""
    t1, t2 = torch.full((x.shape[0],), 500.0), torch.full((x.shape[0],), 475.0)
    cache = DeepCache(2)
    eps = ours(x, t1, ctx, y, cache=cache)
    x2 = (x.float() - 0.05 * eps.float()).to(x.dtype)
    return rel(ours(x2, t2, ctx, y, cache=cache), ours(x2, t2, ctx, y))


def case(ours, theirs, dtype, batch: int, px: int, reps: int, limit: float) -> dict:
    x, ctx, pooled, ids, y = inputs(dtype, batch, px)
    t = torch.full((batch,), 500.0)
    cache = DeepCache(2)
    runs = {"ours": lambda: ours(x, t, ctx, y),
            "fast": lambda: (ours(x, t, ctx, y, cache=cache), ours(x, t, ctx, y, cache=cache)),
            "diffusers": lambda: theirs(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample}
    times = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(reps):
            for k, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - start) / (2 if k == "fast" else 1))
        err = fast_error(ours, x, ctx, y)
        noise = rel(runs["ours"](), runs["diffusers"]())
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = unet_flops((x, t, ctx, y))
    return med | {"err": err, "noise": noise, "flops": flops, "limit": limit, "load": os.getloadavg()[0]}


KINDS = (("attention", ("attention",)), ("linear", ("addmm", "::mm", "bmm", "linear")),
         ("convolution", ("conv",)), ("normalization", ("norm",)), ("activation", ("gelu", "silu")))


def breakdown(fn) -> dict[str, float]:
    """The share of one call's operator time (self CPU time of aten ops) per kind of op; the rest is "other"."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    times = {}
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            kind = next((k for k, names in KINDS if any(n in e.key for n in names)), "other")
            times[kind] = times.get(kind, 0) + e.self_cpu_time_total
    total = sum(times.values())
    return {k: v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def row(r: dict, dtype: str, batch: int, px: int) -> str:
    m = r["diffusers"]
    return (f"| {date.today()} | {platform.machine()} {os.cpu_count()} cores, {torch.get_num_threads()} threads, load "
            f"{r['load']:.1f} | batch {batch}, {px} px, {dtype} | {r['ours']:.2f} s | {m:.2f} s | {m / r['ours']:.2f}x | "
            f"{r['fast']:.2f} s | {m / r['fast']:.2f}x | {r['err']:.4f} ({r['noise']:.4f}) | {r['limit'] / 1e12:.3f} TFLOP/s | "
            f"{r['flops'] / r['ours'] / r['limit']:.0%} / {r['flops'] / m / r['limit']:.0%} |")


def write(lines: list[str]) -> None:
    """Add rows to the table with these columns in bench/RESULTS.md (made under HEAD if there is none)."""
    path = Path(__file__).with_name("RESULTS.md")
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    header = COLUMNS.split("\n")[0]
    if header not in text:
        text = text if HEAD in text else text + f"\n{HEAD}\n"
        sub = "Command: `python bench/unet_vs_diffusers.py --write`; see the script's docstring."
        text = text.replace(HEAD, f"{HEAD}\n\n{sub}\n\n{COLUMNS}", 1)
    out = text.split("\n")
    i = out.index(header) + 2
    while i < len(out) and out[i].startswith("| 2"):
        i += 1
    out[i:i] = lines
    path.write_text("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--px", type=int, nargs="+", default=[512])
    ap.add_argument("--dtype", choices=tuple(DTYPES), nargs="+", default=["bf16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="add the rows to bench/RESULTS.md")
    ap.add_argument("--profile", action="store_true", help="print where our forward's time goes, per kind of op")
    args = ap.parse_args()
    theirs, lines = None, []
    for name in args.dtype:
        dtype = DTYPES[name]
        ours, theirs = models(dtype, theirs)
        for px in args.px:
            limit = matmul_limit(dtype)
            r = case(ours, theirs, dtype, args.batch, px, args.reps, limit)
            r["limit"] = max(limit, matmul_limit(dtype))
            lines.append(row(r, name, args.batch, px))
            print(lines[-1], flush=True)
            if args.profile:
                x, ctx, _, _, y = inputs(dtype, args.batch, px)
                shares = breakdown(lambda m=ours: m(x, torch.full((args.batch,), 500.0), ctx, y))
                print(f"ours, {name}, {px} px: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()), flush=True)
        del ours
    if args.write:
        write(lines)


if __name__ == "__main__":
    main()
