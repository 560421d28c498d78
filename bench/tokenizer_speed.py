"""Prompts/s of `sdxl.models.tokenizer` for one batch of 10k typical prompts, against transformers' CLIPTokenizer.

Run: python bench/tokenizer_speed.py   (appends a row under "## Tokenizer" in bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

from sdxl.models.tokenizer import MAX_LENGTH, PAD_CLIP_L, Tokenizer

RESULTS = Path(__file__).with_name("RESULTS.md")
HEADING = "## Tokenizer"
TABLE = "| date | machine | prompts | sdxl prompts/s | transformers prompts/s | ratio | command |\n|---|---|---|---|---|---|---|\n"

SUBJECTS = ["a portrait of an old fisherman", "a cat wearing a tiny wizard hat", "an astronaut riding a horse",
            "a cozy cabin in the snowy mountains", "a futuristic city skyline", "a bowl of ramen", "a red fox",
            "a medieval knight in shining armor", "a lighthouse on a cliff", "a young woman with freckles"]
SETTINGS = ["at golden hour", "in the rain", "on mars", "at night, neon lights", "in a misty forest",
            "underwater", "in a busy Tokyo street", "on a stormy sea", "in a sunlit studio"]
STYLES = ["oil painting", "photorealistic", "35mm film photo", "watercolor", "digital art", "studio ghibli style",
          "concept art", "cinematic still", "3D render, octane render", "ukiyo-e woodblock print"]
MODIFIERS = ["highly detailed", "8k", "sharp focus", "bokeh", "volumetric lighting", "dramatic lighting",
             "masterpiece", "best quality", "(intricate details:1.2)", "trending on artstation",
             "by greg rutkowski", "85mm, f/1.8", "soft colors", "hdr", "award winning", "ultra realistic"]


def prompts(n: int, seed: int = 0) -> list[str]:
    """`n` typical prompts: subject, setting, style and 2-8 modifiers (13-59 tokens, 34 on average)."""
    rng = random.Random(seed)
    return [", ".join([rng.choice(SUBJECTS), rng.choice(SETTINGS), rng.choice(STYLES), *rng.sample(MODIFIERS, rng.randint(2, 8))])
            for _ in range(n)]


def rates(encoders: list[Callable[[list[str]], object]], texts: list[str], repeats: int = 5) -> list[float]:
    """Best prompts/s of each `encode(texts)`, calls interleaved so that other jobs' load hits all alike."""
    best = [float("inf")] * len(encoders)
    for _ in range(repeats):
        for i, encode in enumerate(encoders):
            start = time.perf_counter()
            encode(texts)
            best[i] = min(best[i], time.perf_counter() - start)
    return [len(texts) / b for b in best]


def record(row: str) -> None:
    """Add `row` to the end of the Tokenizer section of RESULTS.md, creating what is missing."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if HEADING not in text:
        RESULTS.write_text(text.rstrip("\n") + f"\n\n{HEADING}\n\n{TABLE}{row}\n")
        return
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    end = len(text) if end == -1 else end + 1
    section = text[start:end].rstrip("\n") + f"\n{row}\n"
    RESULTS.write_text(text[:start] + section + ("\n" + text[end:] if end < len(text) else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    args = parser.parse_args()

    load = os.getloadavg()[0]  # the box is shared: other jobs' load before we start
    texts = prompts(args.n)
    tok = Tokenizer.default()
    encoders = [lambda t: tok(t, pad=PAD_CLIP_L)]
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        pass
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ref = CLIPTokenizer.from_pretrained(tok.write_files(tmp)[0].parent)
        kwargs = dict(max_length=MAX_LENGTH, truncation=True, padding="max_length", return_tensors="pt")
        encoders.append(lambda t: ref(t, **kwargs))
    ours, theirs = [*rates(encoders, texts), None][:2]

    command = "python bench/tokenizer_speed.py" + (f" --n {args.n}" if args.n != 10_000 else "")
    ratio = f"{ours / theirs:.2f}x" if theirs else "n/a"
    machine = f"{os.cpu_count()}-core CPU (load {load:.1f})"
    row = (f"| {datetime.date.today()} | {machine} | {args.n:,} | {ours:,.0f} | "
           f"{f'{theirs:,.0f}' if theirs else 'n/a'} | {ratio} | `{command}` |")
    print(row)
    if not args.no_write:
        record(row)


if __name__ == "__main__":
    main()
