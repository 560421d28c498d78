"""GPU benchmark in one go (well under 10 minutes on a recent GPU): our SDXL base UNet vs diffusers' on the same
random full-size weights, a 30-step CFG denoising loop at 1024 px (batch 2 = uncond + cond), fp16 and bf16.

Usage: python bench/gpu.py [--steps 30] [--px 1024] [--dtypes fp16 bf16] [--compile] [--write]
       python bench/gpu.py --smoke      # tiny config on the CPU: checks the script, measures nothing
Prints per dtype: it/s of diffusers (SDPA, channels-last, fused QKV: its best eager setup), ours (equal numerics),
ours --fast (DeepCache 2) and, with --compile, ours compiled (compile time printed); the ratio to diffusers; and
the fraction of the GPU's matmul peak each reaches (peak measured by a probe in the same run, FLOPs counted by
torch.utils.flop_counter on the meta device). Not yet run on a GPU (written and checked with --smoke on a CPU).
"""

import argparse
import time
from datetime import date

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdxl.formats.checkpoint import _unet_diffusers_config
from sdxl.formats.convert import to_ours, unet_table
from sdxl.models import unet as U
from sdxl.models.conditioning import FourierEmbedder

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul in `dtype`."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps + 2):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def build(cfg: U.UNetConfig, device: str, dtype: torch.dtype):
    """(ours, theirs) sharing random weights, channels-last, diffusers with fused QKV projections."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(device):
        theirs = UNet2DConditionModel.from_config(_unet_diffusers_config(cfg)).to(dtype).eval()
    theirs.to(memory_format=torch.channels_last)
    ours = U.UNet(cfg, device="meta")
    ours.load_state_dict(to_ours(unet_table(cfg), theirs.state_dict()), strict=True, assign=True)
    ours.eval().to(memory_format=torch.channels_last)
    ours.fuse_qkv()
    theirs.fuse_qkv_projections()
    return ours, theirs


def inputs(cfg: U.UNetConfig, device: str, dtype: torch.dtype, px: int):
    """Latent (2, 4, px/8, px/8), text context, pooled text, micro-conditioning ids and our vector y."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, px // 8, px // 8, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=g).to(device, dtype)
    pooled = torch.randn(2, cfg.adm_in_channels - 6 * 256, generator=g).to(device, dtype)
    ids = torch.tensor([[px, px, 0, 0, px, px]] * 2, dtype=torch.float32, device=device)
    return x, ctx, pooled, ids, torch.cat([pooled, FourierEmbedder(256)(ids).to(dtype)], 1)


def loop(fn, steps: int, device: str) -> float:
    """it/s of `steps` calls of fn(step) after one warm-up call."""
    fn(0)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        fn(i)
    sync(device)
    return steps / (time.perf_counter() - start)


def run(cfg, device: str, dtype: torch.dtype, px: int, steps: int, compile: bool) -> dict:
    ours, theirs = build(cfg, device, dtype)
    x, ctx, pooled, ids, y = inputs(cfg, device, dtype, px)
    ts = torch.linspace(999, 0, steps, device=device)
    t = lambda i: ts[i].expand(2)  # noqa: E731
    cond = {"encoder_hidden_states": ctx, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    cache = U.DeepCache(2)
    runs = {"diffusers": lambda i: theirs(x, t(i), **cond).sample,
            "ours": lambda i: ours(x, t(i), ctx, y),
            "ours --fast": lambda i: ours(x, t(i), ctx, y, cache=cache)}
    out = {}
    with torch.no_grad():
        for name, fn in runs.items():
            out[name] = loop(fn, steps, device)
        if compile:
            start = time.perf_counter()
            ours.compile()
            ours(x, t(0), ctx, y)
            out["compile_s"] = time.perf_counter() - start
            out["ours compiled"] = loop(lambda i: ours(x, t(i), ctx, y), steps, device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        U.UNet(cfg, device="meta")(*(v.to("meta") for v in (x, t(0), ctx, y)))
    out["flops"] = counter.get_total_flops()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--px", type=int, default=1024)
    ap.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp16", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also time ours under torch.compile")
    ap.add_argument("--smoke", action="store_true", help="tiny config, 64 px, 2 steps, fp32 on the CPU")
    ap.add_argument("--write", action="store_true", help="add the rows to bench/RESULTS.md")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    cfg, px, steps, dtypes = ((U.TINY_BASE, 64, 2, ["fp32"]) if args.smoke
                              else (U.SDXL_BASE, args.px, args.steps, args.dtypes))
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke test)"
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        peak = matmul_peak(device, dtype, 256 if args.smoke else 8192)
        r = run(cfg, device, dtype, px, steps, args.compile)
        base = r.get("diffusers")
        for k in ("diffusers", "ours", "ours --fast", "ours compiled"):
            if k in r:
                ratio = f"{r[k] / base:.2f}x" if base else "-"
                frac = "-" if k == "ours --fast" else f"{r['flops'] * r[k] / peak:.0%}"
                extra = f" (compiling {r['compile_s']:.0f} s)" if k == "ours compiled" else ""
                rows.append(f"| {date.today()} | {gpu} | {px} px, {steps} steps, batch 2, {name} | {k}{extra} | "
                            f"{r[k]:.2f} it/s | {ratio} | {peak / 1e12:.0f} TFLOP/s | {frac} |")
                print(rows[-1], flush=True)
    if args.write and not args.smoke:
        from results import append_rows

        append_rows("## GPU: UNet denoising loop (bench/gpu.py)", "Command: `python bench/gpu.py --write`",
                    "| date | GPU | case | model | it/s | vs diffusers | matmul peak (probe) | fraction of peak |\n"
                    "|---|---|---|---|---|---|---|---|", rows)


if __name__ == "__main__":
    main()
