"""User-facing errors: the CLI prints `str(err)` as one line and exits with code 2."""

from __future__ import annotations


def first_few(keys, n: int = 3) -> str:
    """The first `n` keys, comma-separated, with ", ..." when there are more."""
    keys = list(keys)
    return ", ".join(map(str, keys[:n])) + (", ..." if len(keys) > n else "")


class SDXLError(Exception):
    """Bad input from the user: a one-line message naming the problem and the fix."""


class CheckpointError(SDXLError):
    """A checkpoint file or folder that cannot be loaded as asked."""

    @classmethod
    def keys(cls, name: str, missing: list[str], unexpected: list[str], shapes: list[str] = ()) -> "CheckpointError":
        parts = []
        for label, ks in (("missing", missing), ("unexpected", unexpected), ("wrong shape", list(shapes))):
            if ks:
                parts.append(f"{len(ks)} {label} tensor{'s' if len(ks) != 1 else ''} ({first_few(ks)})")
        return cls(f"{name}: {'; '.join(parts)}; is this an SDXL checkpoint of the expected kind?")
