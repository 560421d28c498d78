"""How fast `sdxl serve` answers progress polls while its worker is busy (issue 12: under 100 ms).

Starts `sdxl serve` as a subprocess (so the client does not share its interpreter), queues long jobs, and polls
the running job's state (`GET /v1/jobs/{id}`, and A1111's `GET /sdapi/v1/progress` where that API is mounted)
while the worker samples. Prints the latency percentiles of each. Not a test: wall times depend on the machine.

    python bench/serve_progress.py                      # the embedded default model
    python bench/serve_progress.py --models-dir DIR --polls 500 --device cuda
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, port: int, output: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "sdxl.cli", "serve", "--port", str(port), "--output-dir", output]
    for flag in ("models_dir", "device", "dtype"):
        if getattr(args, flag):
            argv += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    process = subprocess.Popen(argv)
    end = time.monotonic() + 300
    while time.monotonic() < end and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    sys.exit("the server did not start")


def poll(http: httpx.Client, path: str, n: int, busy) -> list[float]:
    """Latencies (ms) of n GETs of `path`, counted only while the worker is busy."""
    out = []
    while len(out) < n and busy():
        t = time.perf_counter()
        r = http.get(path)
        ms = (time.perf_counter() - t) * 1000
        if r.status_code == 404:
            return out
        r.raise_for_status()
        out.append(ms)
        time.sleep(0.01)
    return out


def report(name: str, ms: list[float]) -> None:
    if not ms:
        print(f"{name:<28} (not served)")
        return
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    print(f"{name:<28} n={len(ms):<5} p50 {q[49]:7.1f} ms  p95 {q[94]:7.1f} ms  max {max(ms):7.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir")
    p.add_argument("--device")
    p.add_argument("--dtype")
    p.add_argument("--polls", type=int, default=300, help="polls per endpoint")
    p.add_argument("--steps", type=int, default=200, help="steps of each queued job (keeps the worker busy)")
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as output:
        process = start(args, port, output)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
                body = {"prompt": "a red circle", "steps": args.steps, "width": args.size, "height": args.size}
                jobs = [http.post("/v1/jobs", json=body | {"seed": k}).json()["id"] for k in range(4)]
                while http.get(f"/v1/jobs/{jobs[0]}").json()["state"] == "queued":
                    time.sleep(0.05)
                busy = lambda: http.get(f"/v1/jobs/{jobs[-1]}").json()["state"] in ("queued", "running")
                report("GET /v1/jobs/{id}", poll(http, f"/v1/jobs/{jobs[0]}", args.polls, busy))
                report("GET /sdapi/v1/progress", poll(http, "/sdapi/v1/progress", args.polls, busy))
                print(f"(polled while the worker ran; {os.cpu_count()} CPUs)")
                for j in jobs:
                    http.delete(f"/v1/jobs/{j}")
        finally:
            process.kill()
            process.wait()


if __name__ == "__main__":
    main()
