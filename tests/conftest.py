import torch


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
