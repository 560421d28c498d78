"""Prompts as users of A1111 and ComfyUI write them: attention weights and prompts over 77 tokens.

Syntax (A1111 `prompt_parser.parse_prompt_attention`): `(text)` x1.1, `[text]` /1.1, `(text:1.3)` explicit weight,
`\\(` `\\)` `\\[` `\\]` `\\\\` literal brackets, `BREAK` starts a new 75-token window. Long prompts are split into
75-token windows, each encoded as its own 77-token sequence (BOS + 75 + EOS) and concatenated along the sequence axis.
A textual-inversion embedding's name (the tokenizer's `embeddings`, sdxl.adapters.embeddings) stands for its n
vectors, weighted like tokens, never split across windows (A1111 `FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sdxl.models.tokenizer import BOS, EOS, MAX_LENGTH, Tokenizer

WINDOW = MAX_LENGTH - 2  # 75 tokens between BOS and EOS
_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; `BREAK` comes back as its own run with weight -1."""
    runs: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for r in runs[start:]:
            r[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\") and len(tok) == 2:
            runs.append([tok[1], 1.0])
        elif tok == "(":
            round_open.append(len(runs))
        elif tok == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open and _is_number(weight):
            scale(round_open.pop(), float(weight))
        elif weight is not None and round_open:  # a malformed weight, e.g. (red:1.2.3): the text stays literal
            start = round_open.pop()
            runs.insert(start, ["(", 1.0])
            runs.append([tok, 1.0])
            square_open[:] = [i + (i >= start) for i in square_open]
        elif tok == ")" and round_open:
            scale(round_open.pop(), 1.1)
        elif tok == "]" and square_open:
            scale(square_open.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    runs.append(["BREAK", -1.0])
                runs.append([part, 1.0])
    for start in round_open:  # unclosed brackets still count, as in A1111
        scale(start, 1.1)
    for start in square_open:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for text_, w in (run for run in runs if run[0]):  # empty runs dropped
        if merged and merged[-1][1] == w and w != -1.0:
            merged[-1][0] += text_
        else:
            merged.append([text_, w])
    return [(t, w) for t, w in merged] or [("", 1.0)]


def _is_number(text: str) -> bool:
    """Whether a weight `_TOKEN` matched (`[+-]?[.\\d]+`, as A1111's modules/prompt_parser.py re_attention, so never
    `1e400`, `inf` or `nan`) is a number, not e.g. `1.2.3`."""
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class TokenWindows:
    """One prompt as 77-token windows: ids (n, 77), per-token weights (n, 77), and the embeddings placed in them as
    (window, position, Embedding): its vectors replace the token embeddings from `position` on (ids there are 0)."""

    ids: torch.Tensor
    weights: torch.Tensor
    fixes: tuple = ()

    @property
    def weighted(self) -> bool:
        return bool((self.weights != 1.0).any())


def tokenize(text: str, tokenizer: Tokenizer, pad: int, min_windows: int = 1) -> TokenWindows:
    """Weighted prompt -> 75-token windows with BOS/EOS/padding (pad: EOS for CLIP-L, 0 for bigG). As A1111's
    `tokenize_line`: BREAK and a full window close the current window; a last window stays only if it holds tokens,
    and there is always one. An embedding takes n positions (id 0), in the next window if they do not fit."""
    windows: list[tuple[list[int], list[float]]] = [([], [])]  # (ids, weights); the last one is being filled
    fixes = []
    embeddings = tokenizer.embeddings
    for run, weight in parse_weights(text):
        if weight == -1.0:  # BREAK
            windows.append(([], []))
            continue
        for piece in embeddings.split(run) if embeddings is not None else [run]:
            text = isinstance(piece, str)
            n = 1 if text else piece.vectors
            for i in tokenizer.ids(piece) if text else [0]:
                if len(windows[-1][0]) + n > WINDOW:
                    windows.append(([], []))
                if not text:
                    fixes.append((len(windows) - 1, 1 + len(windows[-1][0]), piece))  # 1 +: after BOS
                windows[-1][0].extend([i] * n)
                windows[-1][1].extend([weight] * n)
    if not windows[-1][0] and len(windows) > 1:
        windows.pop()
    windows += [([], [])] * (min_windows - len(windows))
    ids = [[BOS] + toks + [EOS] + [pad] * (WINDOW - len(toks)) for toks, _ in windows]
    weights = [[1.0] + ws + [1.0] * (WINDOW + 1 - len(ws)) for _, ws in windows]
    return TokenWindows(torch.tensor(ids), torch.tensor(weights), tuple(fixes))


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis: scale each token's embedding by its weight, then restore the original mean."""
    mean = z.float().mean()
    z = z * weights.to(z.dtype)[..., None]
    return z * (mean / z.float().mean()).to(z.dtype)
