import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses tests start (servers, torchrun)

# `sdxl generate` flags for a tiny model: 2 steps at 64x64 in fp32, quiet, no watermark
FAST = ["--steps", "2", "--width", "64", "--height", "64", "--no-watermark", "-q", "--dtype", "fp32"]


def run(capsys, *argv) -> tuple[int, str, str]:
    """`sdxl *argv` in this process: (exit code, stdout, stderr)."""
    from sdxl.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def draft_and_refine(capsys, base, refiner, folder, strength: float, out):
    """`generate` 2 drafts (seed 1) saving their latent, then refine draft 1 from it (seed 2) into `out`:
    ((exit code, stdout, stderr) of the refinement, the latent file)."""
    lat = folder / "draft.safetensors"
    run(capsys, "generate", "a boat", "--model", base, "--seed", 1, "--batch", 2, "--save-latent", lat,
        "-o", folder / "draft.png", *FAST)
    return run(capsys, "generate", "a boat", "--model", base, "--refiner", refiner, "--latent", lat, "--latent-index", 1,
               "--refiner-strength", strength, "--seed", 2, "-o", out, *FAST), lat


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Perturb every parameter (weights, biases, norm affines) so that no path is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Official single-file key -> shape (copied from shared/reference: generated from the reference modules)."""
    from pathlib import Path

    out = {}
    for line in (Path(__file__).parent / "reference" / f"{name}_single_file_keys.tsv").read_text().splitlines():
        key, shape, _ = line.split("\t")
        out[key] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a shared
    2-core machine small tensors run several times faster, and the 2-process training test needs both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_checkpoints(folder):
    """A tiny random base and refiner saved as single files: (tiny.safetensors, tiny_refiner.safetensors)."""
    from sdxl.formats import checkpoint as ck
    from sdxl.models.model import TINY_BASE, TINY_REFINER, SDXLModel

    torch.manual_seed(0)
    base = ck.save_single_file(randomize(SDXLModel(TINY_BASE), 0, 0.05), folder / "tiny.safetensors")
    ref = ck.save_single_file(randomize(SDXLModel(TINY_REFINER), 1, 0.05), folder / "tiny_refiner.safetensors")
    return base, ref
