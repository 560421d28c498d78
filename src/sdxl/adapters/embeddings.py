"""Textual-inversion embeddings for SDXL, named in prompts by their file stem as A1111 names them.

Forms read (A1111 modules/textual_inversion/textual_inversion.py `create_embedding_from_data`, diffusers
loaders/textual_inversion.py and examples/textual_inversion/textual_inversion_sdxl.py, kohya sd-scripts
sdxl_train_textual_inversion.py; files named, commits not pinned):
- one safetensors file with `clip_l` (n, 768) and `clip_g` (n, 1280): kohya's and A1111's SDXL form; a 1-D
  tensor is one vector;
- diffusers' textual_inversion_sdxl.py pair: NAME.safetensors {token: (n, 768)} beside NAME_2.safetensors
  {token: (n, 1280)}.
Refused, with the reason: pickles (.pt/.bin/.ckpt: never unpickled), SD 1.x and SD 2.x embeddings (one 768- or
1024-wide tensor, e.g. kohya's `emb_params`), widths other than this model's encoders, different vector counts,
non-finite values or values beyond +-`MAX_MAGNITUDE`, tensors besides clip_l and clip_g, more than `MAX_VECTORS`
vectors (they must fit one 75-token window), and names a prompt can never use (`BREAK`, brackets, colons).
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from sdxl.errors import SDXLError, first_few
from sdxl.formats.files import SafetensorsFile, file_stamp

MAX_VECTORS = 75  # one prompt window (sdxl.models.prompts.WINDOW): A1111 never splits an embedding across windows
MAX_ELEMENTS = MAX_VECTORS * 4096  # per tensor, checked before reading: no text encoder is wider than 4096
MAX_MAGNITUDE = 1000.0  # larger values overflow the text encoders (1e30: its square in LayerNorm is inf even in fp32)
PICKLES = (".pt", ".bin", ".ckpt", ".pth", ".pkl")
# the single-encoder embeddings of other Stable Diffusion versions, by token width
OTHER_MODELS = {768: "an SD 1.x embedding (one 768-wide tensor, CLIP ViT-L only)",
                1024: "an SD 2.x embedding (one 1024-wide tensor, OpenCLIP ViT-H)"}
Widths = tuple[int, int]  # token widths of (CLIP-L, bigG): (768, 1280) for SDXL
SDXL_WIDTHS: Widths = (768, 1280)


class EmbeddingError(SDXLError):
    """An embedding file that cannot be used with this model."""


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding: `clip_l` (n, W_l) and `clip_g` (n, W_g) float32 vectors, and what its file records."""

    name: str
    path: Path
    clip_l: torch.Tensor
    clip_g: torch.Tensor
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def vectors(self) -> int:
        return self.clip_l.shape[0]

    @property
    def shape(self) -> int:
        """A1111's `shape`: the width of one vector over both encoders (2048 for SDXL)."""
        return self.clip_l.shape[1] + self.clip_g.shape[1]

    @property
    def hash(self) -> str:
        """A1111's `shorthash`: the file's sha256, first 12 hex digits (the CLIP-L file's, for a diffusers pair)."""
        from sdxl.formats.png import file_hash

        return file_hash(self.path)[:12]

    def as_dict(self) -> dict:
        """A1111's /sdapi/v1/embeddings entry."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name, "shape": self.shape, "vectors": self.vectors}


def _tensors(path: Path, widths: Widths) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A small safetensors file's tensors (float32, checked: at most 2-D) and metadata; pickles refused unread."""
    if path.suffix.lower() in PICKLES:
        raise EmbeddingError(f"{path}: {path.suffix} is a Python pickle, never loaded here (it can run code); "
                             "use the .safetensors release of this embedding")
    f = SafetensorsFile(path, fix=None)
    shapes = f.shapes()
    if len(shapes) > 4 or any(len(s) not in (1, 2) or not 0 < math.prod(s) <= MAX_ELEMENTS for s in shapes.values()):
        listed = first_few(f"{k} {list(s)}" for k, s in shapes.items())
        raise EmbeddingError(f"{path}: holds {len(shapes)} tensors ({listed}); a textual-inversion embedding for "
                             f"this model holds clip_l (n, {widths[0]}) and clip_g (n, {widths[1]}), n from 1 to "
                             f"{MAX_VECTORS}")
    if bad := [k for k, d in f.dtypes().items() if not d.is_floating_point]:
        raise EmbeddingError(f"{path}: tensor {bad[0]} is not floating point")
    return {k: f[k].float().reshape(-1, s[-1]) for k, s in shapes.items()}, f.metadata


def _one_encoder(path: Path, key: str, t: torch.Tensor, widths: Widths) -> EmbeddingError:
    """The error for a file with one tensor and no partner: what it is for, by its width."""
    width = t.shape[-1]
    what = OTHER_MODELS.get(width, f"one {width}-wide tensor {key!r}")
    if width == widths[1] and width not in OTHER_MODELS:
        what = "only the bigG half of an SDXL embedding (diffusers writes the CLIP-L half beside it, NAME.safetensors)"
    elif width == widths[0]:
        what += f" (or the CLIP-L half of a diffusers SDXL pair whose {path.stem}_2{path.suffix} is missing)"
    return EmbeddingError(f"{path}: {what}; SDXL embeddings hold clip_l (n, {widths[0]}) and clip_g "
                          f"(n, {widths[1]}): use the SDXL version of this embedding")


def load_embedding(path: str | Path, widths: Widths = SDXL_WIDTHS, partner: str | Path | None = None) -> Embedding:
    """An embedding file (with `partner`: a diffusers pair, `path` CLIP-L and `partner` bigG), checked against the
    model's token widths; the name is the file stem. Raises EmbeddingError naming the problem."""
    path = Path(path)
    if why := _unusable(path.stem):
        raise EmbeddingError(f"{path}: {why}")
    t, meta = _tensors(path, widths)
    if "clip_l" in t and "clip_g" in t:
        if extra := [k for k in t if k not in ("clip_l", "clip_g")]:
            raise EmbeddingError(f"{path}: holds {first_few(extra)} besides clip_l and clip_g, which no embedding "
                                 "form has: refused rather than guessed at")
        clip_l, clip_g = t["clip_l"], t["clip_g"]
    elif len(t) == 1 and partner is not None:
        other, _ = _tensors(Path(partner), widths)
        if len(other) != 1:
            raise EmbeddingError(f"{partner}: holds {len(other)} tensors; the bigG half of a diffusers pair holds one")
        clip_l, clip_g = next(iter(t.values())), next(iter(other.values()))
    elif len(t) == 1:
        raise _one_encoder(path, *next(iter(t.items())), widths)
    else:
        raise EmbeddingError(f"{path}: holds {first_few(t)}, not clip_l and clip_g: not an SDXL embedding")
    got = (clip_l.shape[1], clip_g.shape[1])
    if got != tuple(widths):
        raise EmbeddingError(f"{path}: vectors {got[0]} (clip_l) and {got[1]} (clip_g) wide, but this model's "
                             f"encoders take {widths[0]} and {widths[1]}: an embedding for another model")
    if not clip_l.shape[0] == clip_g.shape[0] or not 1 <= clip_l.shape[0] <= MAX_VECTORS:
        raise EmbeddingError(f"{path}: {clip_l.shape[0]} clip_l and {clip_g.shape[0]} clip_g vectors; an embedding "
                             f"has the same number for both, from 1 to {MAX_VECTORS}")
    if not bool(clip_l.isfinite().all() and clip_g.isfinite().all()):
        raise EmbeddingError(f"{path}: holds non-finite values (NaN/Inf); re-download or retrain it")
    if (top := max(clip_l.abs().max().item(), clip_g.abs().max().item())) > MAX_MAGNITUDE:
        raise EmbeddingError(f"{path}: holds values up to {top:.3g}, beyond +-{MAX_MAGNITUDE:g} (the text encoders "
                             "would give non-finite values): a broken file; re-download or retrain it")
    step = meta.get("step", "")
    return Embedding(path.stem, path, clip_l.clone(), clip_g.clone(), int(step) if step.isdigit() else None,
                     meta.get("sd_checkpoint"), meta.get("sd_checkpoint_name"))


@dataclass(frozen=True, eq=False)
class Embeddings:
    """The embeddings of a folder: `loaded` by name, `skipped` name -> the reason. Names match whole words of a
    prompt, ignoring case (A1111 matches the name's lower-cased tokens); an embedding wins over ordinary text."""

    loaded: Mapping[str, Embedding]
    skipped: Mapping[str, str]

    @functools.cached_property
    def _pattern(self) -> re.Pattern | None:
        return _whole_words(self.loaded)

    @functools.cached_property
    def _by_lower(self) -> dict[str, Embedding]:
        return {name.lower(): e for name, e in self.loaded.items()}

    def split(self, text: str) -> list[str | Embedding]:
        """Text -> its pieces: plain text, and the embeddings its words name."""
        if self._pattern is None:
            return [text]
        parts = self._pattern.split(text)  # text, name, text, name, ..., text
        return [self._by_lower[p.lower()] if i % 2 else p for i, p in enumerate(parts) if p]

    def used(self, texts: Iterable[str | None]) -> list[Embedding]:
        """The embeddings named in `texts` as the prompt parser reads them (sdxl.models.prompts.tokenize), each
        once, in order of first use."""
        found = {e.name: e for run in _runs(texts) for e in self.split(run) if isinstance(e, Embedding)}
        return list(found.values())

    def infotext(self, texts: Iterable[str | None]) -> str | None:
        """A1111's `TI hashes` value for the embeddings `texts` use: "name: hash, ..." (modules/sd_hijack_clip.py)."""
        return ", ".join(f"{_infotext_name(e.name)}: {e.hash}" for e in self.used(texts)) or None

    def check(self, texts: Iterable[str | None]) -> None:
        """Prompts `texts` checked before they run: a word naming a refused file is an EmbeddingError naming the file
        and why (not read as plain words); an embedding named like an ordinary word (one CLIP token, e.g. "white")
        gets one warning that the word is taken as the embedding, as A1111 takes it."""
        from sdxl.models.tokenizer import Tokenizer

        texts = list(texts)
        refused = {n.lower(): why for n, why in self.skipped.items()
                   if n.lower() not in self._by_lower and _unusable(n) is None}  # a same-named file loaded: no error
        if pattern := _whole_words(refused):
            if hit := next((m.group(1) for run in _runs(texts) if (m := pattern.search(run))), None):
                raise EmbeddingError(f"the prompt names the embedding {hit!r}, which was refused: "
                                     f"{refused[hit.lower()]}")
        vocab = Tokenizer.default().vocab
        for e in self.used(texts):
            if all(f"{word}</w>" in vocab for word in e.name.lower().split()):
                warnings.warn(f"the prompt word {e.name!r} is taken as the embedding {e.path}, not as the word (as "
                              "A1111 does); rename the file to use the word", stacklevel=2)

    def replay(self, recorded: Mapping[str, str]) -> tuple[dict[str, str], list[tuple[Embedding, str]]]:
        """An image's `TI hashes` (name -> hash, `recorded_hashes`) against this folder: ({name: why} of those not
        loaded, [(embedding, recorded hash)] of those whose file has another hash)."""
        by_name = {_infotext_name(n).lower(): e for n, e in self.loaded.items()}
        skipped = {_infotext_name(n).lower(): why for n, why in self.skipped.items()}
        missing = {n: skipped.get(n.lower(), "not in the folder") for n in recorded if n.lower() not in by_name}
        changed = [(by_name[n.lower()], h) for n, h in recorded.items()
                   if n.lower() in by_name and by_name[n.lower()].hash != h]
        return missing, changed


def _whole_words(names: Iterable[str]) -> re.Pattern | None:
    """A pattern finding `names` as whole words, ignoring case, the longest first ("neg_v2" before "neg")."""
    names = sorted(names, key=len, reverse=True)
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)", re.I) if names else None


def _runs(texts: Iterable[str | None]) -> list[str]:
    """The plain-text runs of prompts as the prompt parser splits them (no brackets, weights or BREAK)."""
    from sdxl.models.prompts import parse_weights

    return [run for t in texts if t for run, weight in parse_weights(t) if weight != -1.0]


def _unusable(name: str) -> str | None:
    """Why a prompt can never name an embedding called `name` (the parser reads part of it as syntax), or None."""
    from sdxl.models.prompts import parse_weights

    if parse_weights(name) != [(name, 1.0)]:
        return (f"the prompt parser reads the name {name!r} as syntax (BREAK, brackets, ':' weights or '\\' "
                "escapes), so no prompt can use it; rename the file")
    return None


def _infotext_name(name: str) -> str:
    """A name as `TI hashes` writes it: without ':' and ',' (A1111 modules/sd_hijack_clip.py)."""
    return name.replace(":", "").replace(",", "")


def recorded_hashes(infotext: str) -> dict[str, str]:
    """The `TI hashes` of an A1111 infotext: name -> hash (12 hex digits); {} when there are none."""
    last = infotext.rstrip("\n").rsplit("\n", 1)[-1]  # the `Key: value` pairs (modules/processing.py)
    if not (found := re.search(r'(?:^|, )TI hashes: ("(?:[^"\\]|\\.)*"|[^,]*)', last)):
        return {}
    try:
        value = json.loads(found.group(1)) if found.group(1).startswith('"') else found.group(1)
    except ValueError:
        value = found.group(1).strip('"')
    return dict(pair.rsplit(": ", 1) for pair in value.split(", ") if ": " in pair)


def embedding_files(folder: str | Path) -> list[Path]:
    """Embedding files in a folder and its subfolders (as A1111 walks it), sorted; hidden files left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SDXLError(f"--embeddings-dir {folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in (".safetensors",) + PICKLES)


def for_model(folder: str | Path, model: str | Path) -> Embeddings:
    """The folder's embeddings checked against `model`'s encoders (the same object the pipeline gets)."""
    return load_folder(folder, checkpoint_widths(model))


def load_folder(folder: str | Path, widths: Widths = SDXL_WIDTHS) -> Embeddings:
    """Every embedding of a folder, checked against the model's widths; read again only when a file changes."""
    files = embedding_files(folder)
    stamp = tuple((str(p), file_stamp(p)) for p in files)
    return _load_folder(tuple(files), tuple(widths), stamp)


@functools.lru_cache(maxsize=4)
def _load_folder(files: tuple[Path, ...], widths: Widths, _stamp: tuple) -> Embeddings:
    loaded, skipped, taken = {}, {}, set()
    for path in files:
        if path in taken:
            continue
        partner = path.with_name(f"{path.stem}_2{path.suffix}")
        partner = partner if partner in files and _single_tensor(path) and _single_tensor(partner) else None
        try:
            e = load_embedding(path, widths, partner)
        except SDXLError as err:
            skipped[path.stem] = str(err)
            continue
        taken.add(partner)
        same = next((n for n in loaded if n.lower() == e.name.lower()), None)
        if same is not None:
            skipped[e.name] = f"{path}: the same name as {loaded[same].path} (names are matched ignoring case)"
        else:
            loaded[e.name] = e
    return Embeddings(loaded, skipped)


def _single_tensor(path: Path) -> bool:
    try:
        return path.suffix.lower() == ".safetensors" and len(SafetensorsFile(path, fix=None)) == 1
    except SDXLError:
        return False


def checkpoint_widths(path: str | Path) -> Widths:
    """The token widths of a checkpoint's encoders from its header (a single file) or config (a diffusers folder)."""
    from sdxl.formats.checkpoint import config_from_shapes

    path = Path(path)
    if path.is_dir():
        try:
            return tuple(int(json.loads((path / sub / "config.json").read_text())["hidden_size"])
                         for sub in ("text_encoder", "text_encoder_2"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SDXLError(f"{path}: cannot read its text encoders' config.json ({type(e).__name__}: {e})") from None
    cond = config_from_shapes(SafetensorsFile(path).shapes(), str(path)).conditioner
    return (cond.clip_l.width, cond.bigg.width) if cond is not None and cond.clip_l is not None else SDXL_WIDTHS
