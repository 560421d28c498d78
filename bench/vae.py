"""VAE decode and encode at large sizes: our whole-tensor and banded runs vs diffusers' AutoencoderKL untiled and
with `enable_tiling()`; peak RSS and time per case, and each output's distance from diffusers' untiled one.

Usage: flock /tmp/heavy.lock python bench/vae.py [--sizes 1024 1536 2048] [--ops decode encode] [--dtypes bf16 fp32]
       [--cases ours diffusers ours-banded diffusers-tiled] [--band MiB] [--no-channels-last] [--write]
Full-size SDXL VAE config, random weights (seed 0) built by diffusers and converted to ours, so both hold the same
weights. Each case runs once in a fresh process (its peak RSS is its own: VmHWM, reset after loading); cases of one
size alternate between ours and diffusers. Inputs are smooth (bicubic-upsampled noise), as latents and images are.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss(field: str) -> int:
    """VmRSS or VmHWM of this process, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def smooth(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(*shape[:2], shape[2] // 8, shape[3] // 8, generator=g)
    return torch.nn.functional.interpolate(n, size=shape[2:], mode="bicubic").clamp(-1, 1)


def models(case: str, dtype: torch.dtype):
    """diffusers' AutoencoderKL (seed 0), or ours loaded from its converted weights."""
    from diffusers import AutoencoderKL as Theirs

    from sdxl.formats.checkpoint import _vae_diffusers_config
    from sdxl.formats.convert import to_ours, vae_table
    from sdxl.models.vae import SDXL_VAE, AutoencoderKL

    torch.manual_seed(0)
    theirs = Theirs.from_config(_vae_diffusers_config(SDXL_VAE)).eval()
    if case.startswith("diffusers"):
        return theirs.to(dtype)
    ours = AutoencoderKL(SDXL_VAE, device="meta")
    ours.load_state_dict(to_ours(vae_table(SDXL_VAE), theirs.state_dict()), strict=True, assign=True)
    return ours.to(dtype).eval()


def run_case(case: str, op: str, size: int, dtype_name: str, band_mib: int, channels_last: bool, out: str) -> dict:
    """One case in this process: time, peak RSS, RSS after loading; the output saved to `out`."""
    dtype, fmt = DTYPES[dtype_name], torch.channels_last if channels_last else torch.contiguous_format
    vae = models(case, dtype).to(memory_format=fmt)
    x = smooth((1, 3, size, size) if op == "encode" else (1, 4, size // 8, size // 8), 1).to(dtype)
    x = x.contiguous(memory_format=fmt)
    band = band_mib << 20 if case == "ours-banded" else None
    if case == "diffusers-tiled":
        vae.enable_tiling()
    if case.startswith("diffusers"):
        fn = (lambda: vae.encode(x).latent_dist.mean) if op == "encode" else (lambda: vae.decode(x).sample)
    else:
        fn = (lambda: vae.encode(x, band).mean) if op == "encode" else (lambda: vae.decode(x, band))
    loaded = rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    with torch.no_grad():
        y = fn()
    seconds = time.perf_counter() - start
    peak = rss("VmHWM")
    torch.save(y.float(), out)
    return {"seconds": seconds, "peak": peak, "loaded": loaded}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 1536, 2048])
    ap.add_argument("--ops", nargs="+", default=["decode", "encode"], choices=("decode", "encode"))
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    ap.add_argument("--cases", nargs="+", default=["ours", "diffusers", "ours-banded", "diffusers-tiled"])
    ap.add_argument("--band", type=int, default=64, help="our band size, MiB")
    ap.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="both models")
    ap.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # case op size dtype out: run one case here
    args = ap.parse_args()
    if args.one:
        case, op, size, dtype, out = args.one
        print(json.dumps(run_case(case, op, int(size), dtype, args.band, args.channels_last, out)))
        return
    rows = [f"{date.today()}, {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads), "
            f"channels-last {args.channels_last}, band {args.band} MiB: `python bench/vae.py {' '.join(sys.argv[1:])}`",
            "", "| case | op | px | dtype | load | seconds | peak RSS GiB | over loaded GiB | max abs diff / max abs |",
            "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            for op in args.ops:
                for size in args.sizes:
                    rows += measure(args, tmp, op, size, dtype)
    print("\n".join(rows))
    if args.write:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write("\n" + "\n".join(rows) + "\n")


def measure(args, tmp: str, op: str, size: int, dtype: str) -> list[str]:
    """Table rows for the cases of one op, size and dtype, each in a fresh process."""
    results, outs = {}, {}
    for case in args.cases:
        out = f"{tmp}/{case}.pt"
        load = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--band", str(args.band), "--one", case, op, str(size), dtype, out,
               "--channels-last" if args.channels_last else "--no-channels-last"]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        results[case] = dict(json.loads(line), load=load)
        outs[case] = torch.load(out)
        print(case, op, size, dtype, results[case], flush=True)
    refs = [c for c in ("diffusers", "ours") if c in outs] or args.cases[:1]  # the reference outputs

    def diff(case: str) -> str:
        return ", ".join(f"{((outs[case] - outs[c]).abs().max() / outs[c].abs().max()).item():.1e} vs {c}"
                         for c in refs if c != case)

    return [f"| {case} | {op} | {size} | {dtype} | {r['load']:.1f} | {r['seconds']:.1f} | "
            f"{r['peak'] / 2**30:.2f} | {(r['peak'] - r['loaded']) / 2**30:.2f} | {diff(case)} |"
            for case, r in results.items()]


if __name__ == "__main__":
    main()
