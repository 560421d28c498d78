"""Write full-size random SDXL base and refiner single-file checkpoints (fp16, official names and shapes) for benchmarks.

    python bench/make_weights.py [--out /work/bench-data] [--only base|refiner]

Names and shapes are our configs' (`SDXL_BASE`, `SDXL_REFINER`), checked against the released files' key lists in
tests/reference or /work/shared/reference when present. Values: weights N(0, 1/fan_in) so activations stay finite
through every layer, 1-d weights (norm scales) 1, biases 0; seeded, so every run writes the same bytes.
The file is streamed tensor by tensor (a few hundred MB of RAM) to a temporary name, then renamed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from sdxl.formats.checkpoint import expected_shapes
from sdxl.models.model import SDXL_BASE, SDXL_REFINER

CONFIGS = {"base": (SDXL_BASE, "sdxl_base_1.0_single_file_keys.tsv"),
           "refiner": (SDXL_REFINER, "sdxl_refiner_1.0_single_file_keys.tsv")}
NAMES = {"base": "sdxl_base_random_fp16.safetensors", "refiner": "sdxl_refiner_random_fp16.safetensors"}


def random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """fp16: N(0, 1/fan_in) for matrices and kernels, 1 for other weights, 0 for biases and scalars."""
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return (torch.randn(shape, generator=gen) * fan_in ** -0.5).half()
    fill = 1.0 if key.endswith("weight") else 0.0
    return torch.full(shape, fill, dtype=torch.float16)


def check_against_reference(shapes: dict, tsv: str) -> None:
    for folder in (Path(__file__).parent.parent / "tests" / "reference", Path("/work/shared/reference")):
        if (folder / tsv).is_file():
            ref = {line.split("\t")[0]: tuple(json.loads(line.split("\t")[1]))
                   for line in (folder / tsv).read_text().splitlines() if line}
            ref = {k: v for k, v in ref.items() if not k.endswith("position_ids")}
            assert ref == shapes, f"our shapes differ from {tsv}: {set(ref) ^ set(shapes)}"
            return
    print(f"note: {tsv} not found; shapes not cross-checked", file=sys.stderr)


def write(path: Path, shapes: dict, seed: int) -> None:
    """A safetensors file written by hand (header, then each tensor's bytes in order): nothing held but one tensor."""
    header, offset = {"__metadata__": {"format": "pt", "note": "random weights for benchmarks"}}, 0
    for k, s in shapes.items():
        n = math.prod(s) * 2
        header[k] = {"dtype": "F16", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    gen = torch.Generator().manual_seed(seed)
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for k, s in shapes.items():
            f.write(random_tensor(k, s, gen).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="/work/bench-data")
    p.add_argument("--only", choices=sorted(CONFIGS))
    p.add_argument("--force", action="store_true", help="rewrite files that exist")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (name, (cfg, tsv)) in enumerate(CONFIGS.items()):
        path = out / NAMES[name]
        if (a.only and a.only != name) or (path.exists() and not a.force):
            continue
        shapes = expected_shapes(cfg)
        check_against_reference(shapes, tsv)
        t = time.perf_counter()
        write(path, shapes, seed=i)
        print(f"{path}: {len(shapes)} tensors, {path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
