"""Start-up of the full-size single file: ours vs diffusers' `from_single_file`, same file, fresh processes.

    python bench/load.py [--file /work/bench-data/sdxl_base_random_fp16.safetensors] [--rounds 2] [--dtype bf16]

Each round runs both, alternately, each in a fresh process, from a warm page cache (the file is read once first):
seconds from process start (before `import torch`) to the pipeline loaded, to the first UNet call of a 1024x1024
generation (the prompt encoded; the call is stopped there), the process's CPU seconds (user + system: less noisy than
wall time on a shared machine) and the peak RSS (which counts the mapped file's pages).
diffusers reads its configs from a local folder (no network): configs and tokenizers written by our writer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

START = time.perf_counter()
FILE = "/work/bench-data/sdxl_base_random_fp16.safetensors"


class FirstStep(Exception):
    pass


def stop_at_unet(unet) -> None:
    def hook(module, args):
        raise FirstStep

    unet.register_forward_pre_hook(hook)


def child(which: str, path: str, dtype_name: str, config: str) -> dict:
    import resource

    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if which == "ours":
        from sdxl.pipeline import Pipeline
        from sdxl.request import Request

        pipe = Pipeline.load(path, dtype=dtype)
        loaded = time.perf_counter() - START
        stop_at_unet(pipe.base.unet)
        run = lambda: pipe.generate(Request(prompt="a red boat", width=1024, height=1024, steps=1))  # noqa: E731
    else:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_single_file(path, config=config, torch_dtype=dtype,
                                                          local_files_only=True)
        pipe.unet.to(memory_format=torch.channels_last)  # as ours (and diffusers' own speed advice)
        loaded = time.perf_counter() - START
        stop_at_unet(pipe.unet)
        run = lambda: pipe("a red boat", width=1024, height=1024, num_inference_steps=1)  # noqa: E731
    try:
        with torch.no_grad():
            run()
    except FirstStep:
        pass
    first = time.perf_counter() - START
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"loaded_s": round(loaded, 2), "first_step_s": round(first, 2), "cpu_s": round(use.ru_utime + use.ru_stime, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def write_config(folder: str) -> None:
    """A diffusers folder without weights for the official base: model_index.json, configs, tokenizers."""
    from pathlib import Path

    from sdxl.formats import checkpoint as ck
    from sdxl.models.model import SDXL_BASE
    from sdxl.models.tokenizer import Tokenizer

    root = Path(folder)
    if (root / "model_index.json").exists():
        return
    parts = {"unet": ck._unet_diffusers_config(SDXL_BASE.unet), "vae": ck._vae_diffusers_config(SDXL_BASE.vae),
             "text_encoder": ck._text_diffusers_config(SDXL_BASE.conditioner.clip_l),
             "text_encoder_2": ck._text_diffusers_config(SDXL_BASE.conditioner.bigg)}
    for sub, cfg in parts.items():
        (root / sub).mkdir(parents=True, exist_ok=True)
        ck.write_json(root / sub / "config.json", cfg, mode="replace")
    ck._write_tokenizer(root / "tokenizer", Tokenizer.default(), "<|endoftext|>")
    ck._write_tokenizer(root / "tokenizer_2", Tokenizer.default(), "!")
    (root / "scheduler").mkdir(exist_ok=True)
    ck.write_json(root / "scheduler" / "scheduler_config.json", ck.SCHEDULER_CONFIG, mode="replace")
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
             "force_zeros_for_empty_prompt": True, "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"]}
    ck.write_json(root / "model_index.json", index, mode="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=FILE)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--only", choices=("ours", "diffusers"))
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "CONFIG"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], a.file, a.dtype, a.child[1])))
        return
    config = os.path.join(os.path.dirname(a.file), "sdxl_base_diffusers_config")
    write_config(config)
    with open(a.file, "rb") as f:  # warm the page cache
        while f.read(1 << 26):
            pass
    for r in range(a.rounds):
        for which in ("ours", "diffusers"):
            if a.only and which != a.only:
                continue
            out = subprocess.run([sys.executable, __file__, "--file", a.file, "--dtype", a.dtype, "--child", which,
                                  config], capture_output=True, text=True)
            result = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else out.stderr.strip()[-2000:]
            print(f"round {r} {which:9s} {result} | load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
