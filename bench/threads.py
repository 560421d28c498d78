"""Whole-process time of the embedded default (`sdxl generate`) and the tiny training example per thread setting,
on the machine as it is ("quiet") and with CPU hogs (`python -c 'while 1: pass'`) holding all cores but one ("busy").

Usage: python bench/threads.py [--reps 2] [--train-steps 20] [--only generate|train] [--write]
Settings: "2 threads" etc. (OMP_NUM_THREADS=N, OMP_WAIT_POLICY unset: torch's default with N cores), "N passive" (the same
with OMP_WAIT_POLICY=PASSIVE: waiting threads sleep instead of spinning), and "auto" (nothing set: `sdxl`'s own
choice, `sdxl.session.configure_threads`). Runs alternate between settings so that machine noise hits all alike; the machine
load (1-minute average, before the hogs start) is printed with each row.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOG = [sys.executable, "-c", "while 1: pass"]


def workloads(tmp: str, steps: int) -> dict[str, list[str]]:
    sdxl = [sys.executable, "-m", "sdxl.cli"]
    return {"generate": sdxl + ["generate", "a red circle", "-q", "-o", f"{tmp}/g.png"],
            "train": sdxl + ["train", str(ROOT / "examples/train_tiny.toml"), "--output", f"{tmp}/run",
                             "--set", f"steps={steps}", "--set", "checkpoint_every=1000"]}


def settings(cores: int) -> dict[str, dict[str, str]]:
    out = {"auto": {}, "1 thread": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": ""}}
    out[f"{cores} threads"] = {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": ""}
    out[f"{cores} passive"] = {"OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": "PASSIVE"}
    return out


def timed(cmd: list[str], env: dict[str, str], tmp: str) -> float:
    for p in Path(tmp).glob("*"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    start = time.perf_counter()
    subprocess.run(cmd, env=os.environ | {"PYTHONPATH": str(ROOT / "src")} | env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(name: str, cmd: list[str], busy: bool, reps: int, cores: int, tmp: str) -> list[str]:
    load = os.getloadavg()[0]
    hogs = [subprocess.Popen(HOG) for _ in range(cores - 1)] if busy else []
    try:
        times = {k: [] for k in settings(cores)}
        for _ in range(reps):
            for k, env in settings(cores).items():
                times[k].append(timed(cmd, env, tmp))
    finally:
        for h in hogs:
            h.kill()
    state = f"busy ({cores - 1} hog{'s' if cores > 2 else ''})" if busy else "as is"
    return [f"| {date.today()} | {cores} cores, load {load:.1f} | {name} | {state} | {k} | "
            f"{statistics.median(v):.1f} s | {min(v):.1f}-{max(v):.1f} s |" for k, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--only", choices=("generate", "train"))
    ap.add_argument("--write", action="store_true", help="add the rows to bench/RESULTS.md")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd in workloads(tmp, args.train_steps).items():
            if args.only in (None, name):
                for busy in (False, True):
                    rows += measure(name, cmd, busy, args.reps, cores, tmp)
                    print("\n".join(rows[-len(settings(cores)):]), flush=True)
    if args.write:
        from results import append_rows

        append_rows("## Threads: whole-process time", "Command: `python bench/threads.py --write` (see its docstring)",
                    "| date | machine | workload | machine state | setting | median | range |\n|---|---|---|---|---|---|---|",
                    rows)


if __name__ == "__main__":
    main()
