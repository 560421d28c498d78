"""The CLIP byte-level BPE tokenizer shared by both SDXL text encoders (docs/architecture.md §4).

Ports openai/CLIP `simple_tokenizer.py` onto the `tokenizers` library with the normalisation of transformers'
`CLIPTokenizer` (what diffusers uses): NFC, lower case, split on whitespace. open_clip (the reference for bigG) differs
on some text: it also runs ftfy.fix_text and html.unescape twice (HTML entities, curly quotes, ligatures, full-width
forms, mojibake, control characters), Python's lower() writes a word-final sigma as "ς", and it BPEs a literal
"<|endoftext|>" in the prompt instead of reading it as the EOS token."""

from __future__ import annotations

import copy
import functools
import gzip
import json
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import BPE

from sdxl.errors import SDXLError

BOS = 49406  # <|startoftext|>
EOS = 49407  # <|endoftext|>
PAD_CLIP_L = EOS  # CLIP-L (transformers) pads with EOS
PAD_BIGG = 0  # OpenCLIP bigG pads with 0 ("!")
MAX_LENGTH = 77  # BOS + 75 tokens + EOS
VOCAB_SIZE = 49408

_BOS_TEXT, _EOS_TEXT = "<|startoftext|>", "<|endoftext|>"
# simple_tokenizer.py: specials | contractions | letter runs | single digits | other non-space runs
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_SPECIAL_PIECE = r"\A<\|(?=(?:start|end)oftext\|>\z)|(?<=\A<\|startoftext|\A<\|endoftext)\|>\z"  # "<|", "..", "|>"


@functools.cache
def _byte_units() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in vocabulary order (simple_tokenizer.py `bytes_to_unicode`)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]
    return [chr(b) for b in bs] + [chr(256 + i) for i in range(len(rest))]


class Tokenizer:
    """CLIP BPE: text -> ids, and batches of prompts -> (N, 77) LongTensors. `embeddings`: textual-inversion
    embeddings whose names a prompt may use (sdxl.models.prompts), as diffusers adds their tokens to its tokenizer."""

    embeddings = None  # sdxl.adapters.embeddings.Embeddings | None

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        if len(vocab) != VOCAB_SIZE or vocab.get(_BOS_TEXT) != BOS or vocab.get(_EOS_TEXT) != EOS:
            raise SDXLError(f"tokenizer vocabulary has {len(vocab)} tokens (BOS {vocab.get(_BOS_TEXT)}, EOS "
                            f"{vocab.get(_EOS_TEXT)}); expected the CLIP vocabulary of {VOCAB_SIZE} with BOS {BOS}, "
                            f"EOS {EOS}")
        self.vocab, self.merges = vocab, merges
        tok = _RustTokenizer(BPE(vocab, merges, unk_token=_EOS_TEXT, continuing_subword_prefix="",
                                 end_of_word_suffix="</w>", fuse_unk=False))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (_BOS_TEXT, _EOS_TEXT)])
        # transformers' CLIPTokenizer also maps whitespace runs to " " (the split drops them anyway) and re-splits every
        # piece with GPT-2's regex, which only changes pieces equal to a special token (a case variant such as
        # "<|EndOfText|>"): _SPECIAL_PIECE does that alone, 1.5x faster.
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.Split(Regex(_SPECIAL_PIECE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        self._tok = tok

    @classmethod
    @functools.cache
    def default(cls) -> Tokenizer:
        """The CLIP vocabulary shipped in `sdxl/assets` (from open_clip_torch, MIT), built once."""
        gz = resources.files("sdxl").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
        lines = gzip.decompress(gz).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # simple_tokenizer.py: 48,894 merges
        units = _byte_units()
        tokens = [*units, *(u + "</w>" for u in units), *("".join(m) for m in merges), _BOS_TEXT, _EOS_TEXT]
        return cls({t: i for i, t in enumerate(tokens)}, merges)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """Load a diffusers/transformers `vocab.json` + `merges.txt` pair."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        return cls(vocab, merges)

    def write_files(self, directory: str | Path) -> tuple[Path, Path]:
        """Write `vocab.json` and `merges.txt` (the diffusers `tokenizer/` layout) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        vocab_json, merges_txt = directory / "vocab.json", directory / "merges.txt"
        vocab_json.write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        merges_txt.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        return vocab_json, merges_txt

    def with_embeddings(self, embeddings) -> Tokenizer:
        """This tokenizer (shared, not copied) knowing `embeddings` (sdxl.adapters.embeddings.Embeddings)."""
        tok = copy.copy(self)
        tok.embeddings = embeddings
        return tok

    def __len__(self) -> int:
        return len(self.vocab)

    def ids(self, text: str) -> list[int]:
        """BPE ids of `text`: no BOS/EOS, no truncation."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def __call__(self, texts: list[str] | str, pad: int) -> torch.LongTensor:
        """BOS + ids[:75] + EOS, padded with `pad` to 77: shape (N, 77)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = MAX_LENGTH - 2
        encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        rows = [[BOS, *ids, EOS, *[pad] * (n - len(ids))] for ids in (e.ids[:n] for e in encodings)]
        return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(rows), MAX_LENGTH))  # (N, 77)
