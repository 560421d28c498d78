"""Training data: captioned images, aspect-ratio buckets, resize-and-crop, and an optional latent/text cache.

The SDXL report's recipe (§2.2-2.5, App. I; docs/training.md §3): every image goes to the bucket whose aspect
ratio is nearest its own (buckets: h, w multiples of 64 with h * w close to 1024^2, from 1:4
to 4:1); it is resized so its shortest side (relative to the bucket) fits, then cropped at
random; the model is told the file's real size (`original_size`), the crop offset
(`crop_coords_top_left`) and the bucket (`target_size`). Every batch comes from one bucket.

Order and randomness are pure functions of (seed, global batch number, position in the
batch), so a resumed run and a run on any number of processes see the same data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from sdxl.errors import SDXLError
from sdxl.formats.files import SafetensorsFile

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def stable_seed(*parts) -> int:
    """A 63-bit seed from any JSON-able parts, the same in every process and Python version."""
    return int.from_bytes(hashlib.sha256(json.dumps(parts).encode()).digest()[:8], "little") >> 1


@dataclass(frozen=True)
class Item:
    path: str
    caption: str
    size: tuple[int, int]  # (height, width) of the file as shown (EXIF rotation applied)
    aesthetic_score: float | None = None  # refiner only; from the manifest


# --- finding the images -------------------------------------------------------------------------

def _has_exif(im: Image.Image) -> bool:
    """Formats whose EXIF orientation we apply; reading a PNG's EXIF would decode the whole image."""
    return im.format in ("JPEG", "MPO", "WEBP", "TIFF")


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, after EXIF rotation; PIL errors propagate."""
    with Image.open(path) as im:
        w, h = im.size
        if _has_exif(im) and im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation: rotated by 90 degrees
            w, h = h, w
    return h, w


def scan(source: str, workdir: Path) -> tuple[list[Item], list[str]]:
    """Items of a folder (image + same-named .txt), a JSONL manifest ({"file", "caption"}) or "synthetic:N".

    Returns the readable items, sorted by path, and one "path: reason" line per file skipped.
    """
    if source.startswith("synthetic:"):
        root = make_synthetic(int(source.split(":", 1)[1]), workdir / f"synthetic-{source.split(':', 1)[1]}")
        entries = _folder_entries(root)
    elif source.endswith(".jsonl"):
        entries = _manifest_entries(Path(source))
    elif Path(source).is_dir():
        entries = _folder_entries(Path(source))
    elif not Path(source).exists():
        raise SDXLError(f"dataset {source!r}: no such folder or file")
    else:
        raise SDXLError(f"dataset {source!r}: not a folder, a .jsonl manifest or synthetic:N")
    items, skipped = [], []
    for path, caption, score in entries:
        if isinstance(caption, Exception):
            skipped.append(f"{path}: {caption}")
            continue
        if not Path(path).is_file():  # missing, a folder, or a FIFO/device (opening one would block)
            skipped.append(f"{path}: {'not a regular file' if Path(path).exists() else 'no such file'}")
            continue
        try:
            size = _image_size(path)
        except Exception as e:  # PIL raises many types on corrupt files; none may end a run
            skipped.append(f"{path}: unreadable ({type(e).__name__})")
            continue
        items.append(Item(str(path), caption, size, score))
    if not items:
        raise SDXLError(f"dataset {source!r}: no readable images ({len(skipped)} skipped)")
    return items, skipped


def _folder_entries(root: Path) -> list[tuple]:
    out = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace").strip() if txt.is_file() else ""
        out.append((path, caption, None))
    return out


def _manifest_entries(manifest: Path) -> list[tuple]:
    if not manifest.is_file():
        raise SDXLError(f"{manifest}: no such manifest")
    out = []
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            path = manifest.parent / rec["file"]
            score = rec.get("aesthetic_score")
            out.append((path, str(rec.get("caption", "")), None if score is None else float(score)))
        except (ValueError, KeyError, TypeError) as e:
            out.append((f"{manifest}:{n}", ValueError(f"bad manifest line ({type(e).__name__})"), None))
    return sorted(out, key=lambda e: str(e[0]))


# (w, h) sizes of the small synthetic sets: a spread of aspect ratios around 64 px
SYNTHETIC_SIZES = ((64, 64), (96, 48), (48, 96), (64, 80), (80, 64), (120, 40))


def make_synthetic(n: int, root: Path) -> Path:
    """n captioned scenes of the synthetic world (`sdxl.lab.world`) at small sizes of several aspects; deterministic."""
    from sdxl.lab.world import make_dataset

    if (root / "done").is_file():
        return root
    make_dataset(root, n, seed=1234, sizes=SYNTHETIC_SIZES, supersample=2)
    (root / "metadata.jsonl").unlink()  # the folder form (PNG + .txt) is what scan() reads here
    (root / "done").write_text("")
    return root


# --- buckets and crops --------------------------------------------------------------------------

def make_buckets(resolution: int, step: int = 64, max_aspect: float = 4.0) -> list[tuple[int, int]]:
    """(h, w) buckets: for each w a multiple of `step`, the largest such h with h * w <= resolution^2, and the
    transposes; aspect ratios within 1:max_aspect..max_aspect:1.

    With 1024, 64, 4.0 these are the report's 35 buckets (Appendix I; `pipeline.BUCKETS`) but 1024x960 and 960x1024.
    """
    area = resolution * resolution
    out = set()
    for w in range(step, area // step + 1, step):
        h = area // w // step * step
        if h and max(h / w, w / h) <= max_aspect:
            out |= {(h, w), (w, h)}
    return sorted(out, key=lambda hw: (hw[0] / hw[1], hw))


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (in log ratio)."""
    r = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - r))


def crop_box(size: tuple[int, int], bucket: tuple[int, int], rng: np.random.Generator | None
             ) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize the image to cover the bucket (shortest side fits), then crop: ((resized h, w), (top, left)).

    rng None: the centre crop.
    """
    (h, w), (bh, bw) = size, bucket
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    if rng is None:
        return (rh, rw), ((rh - bh) // 2, (rw - bw) // 2)
    return (rh, rw), (int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1)))


def load_crop(path: str, resized: tuple[int, int], top_left: tuple[int, int], bucket: tuple[int, int]) -> torch.Tensor:
    """The crop as (3, bh, bw) float32 in [-1, 1]."""
    with Image.open(path) as im:
        im = (ImageOps.exif_transpose(im) if _has_exif(im) else im).convert("RGB")
    (rh, rw), (top, left), (bh, bw) = resized, top_left, bucket
    if im.size != (rw, rh):
        im = im.resize((rw, rh), Image.LANCZOS)
    im = im.crop((left, top, left + bw, top + bh))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)  # (3, bh, bw)


# --- order: one bucket per batch ----------------------------------------------------------------

class BucketBatches:
    """The global batches of every epoch: each bucket shuffled and cut into batches of `global_batch`
    (a bucket's last batch is filled up from its start), then all batches shuffled. Pure in (seed, epoch)."""

    def __init__(self, bucket_of: list[int], global_batch: int, seed: int):
        self.members: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_of):
            self.members.setdefault(b, []).append(i)
        self.global_batch, self.seed = global_batch, seed
        self._cached: tuple[int, list] | None = None

    def __len__(self) -> int:
        """Global batches per epoch."""
        return sum(math.ceil(len(m) / self.global_batch) for m in self.members.values())

    def epoch(self, e: int) -> list[tuple[int, list[int]]]:
        """[(bucket, item indices)] in the order of epoch e."""
        if self._cached is not None and self._cached[0] == e:
            return self._cached[1]
        rng = np.random.default_rng(stable_seed(self.seed, "epoch", e))
        batches = []
        for b in sorted(self.members):
            order = [self.members[b][j] for j in rng.permutation(len(self.members[b]))]
            n = math.ceil(len(order) / self.global_batch) * self.global_batch
            order = [order[j % len(order)] for j in range(n)]
            batches += [(b, order[j:j + self.global_batch]) for j in range(0, n, self.global_batch)]
        batches = [batches[j] for j in rng.permutation(len(batches))]
        self._cached = (e, batches)
        return batches


class RankBatches:
    """This process's share of each global batch, from global batch `start` on, for ever (a DataLoader batch_sampler).

    Yields lists of keys (global batch number, position in the global batch, item index).
    """

    def __init__(self, plan: BucketBatches, rank: int, per_rank: int, start: int):
        self.plan, self.rank, self.per_rank, self.start = plan, rank, per_rank, start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        k = self.start
        while True:
            epoch, i = divmod(k, len(self.plan))
            _, items = self.plan.epoch(epoch)[i]
            first = self.rank * self.per_rank
            yield [(k, first + j, item) for j, item in enumerate(items[first:first + self.per_rank])]
            k += 1


# --- samples ------------------------------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """Key (batch number, position, item) -> one cropped image with its conditioning values.

    An image that fails to load is counted and replaced by the next image of its bucket, so a
    batch keeps its size and every process its step count.
    """

    def __init__(self, items: list[Item], buckets: list[tuple[int, int]], bucket_of: list[int], seed: int,
                 random_crop: bool, aesthetic_score: float):
        self.items, self.buckets, self.bucket_of = items, buckets, bucket_of
        self.seed, self.random_crop, self.aesthetic_score = seed, random_crop, aesthetic_score
        self.members: dict[int, list[int]] = {}  # bucket -> its items
        self.place: list[int] = []  # item -> its position among its bucket's members
        for i, b in enumerate(bucket_of):
            self.place.append(len(self.members.setdefault(b, [])))
            self.members[b].append(i)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        k, pos, index = key
        members = self.members[self.bucket_of[index]]
        start, failed = self.place[index], []
        for j in range(len(members)):
            i = members[(start + j) % len(members)]
            try:
                return self._sample(i, self.bucket_of[index], k, pos) | {"failed": failed}
            except Exception as e:  # a corrupt file must not end the run; PIL raises many types
                failed.append(str(e) if isinstance(e, SDXLError)  # a corrupt cache file names itself
                              else f"{self.items[i].path}: unreadable ({type(e).__name__})")
        # not raised here: from a DataLoader worker it would arrive wrapped in the worker's traceback
        return {"error": f"every image of bucket {self.buckets[self.bucket_of[index]]} is unreadable "
                         f"({len(failed)} tried, e.g. {failed[0]})", "failed": failed, "key": (k, pos)}

    def _sample(self, i: int, b: int, k: int, pos: int) -> dict:
        item, bucket = self.items[i], self.buckets[b]
        rng = np.random.default_rng(stable_seed(self.seed, "crop", k, pos)) if self.random_crop else None
        resized, top_left = crop_box(item.size, bucket, rng)
        return {"pixels": load_crop(item.path, resized, top_left, bucket), "caption": item.caption,
                "original_size": item.size, "crop_coords_top_left": top_left, "target_size": bucket,
                "aesthetic_score": self.aesthetic_score if item.aesthetic_score is None else item.aesthetic_score,
                "key": (k, pos)}


def collate(samples: list[dict]) -> dict:
    """Stack one bucket's samples; sizes become (B, 2) float tensors, as `Conditioner.encode_micro` takes them.
    A sample that could not be read at all makes the batch {"error": message} (the training loop raises it)."""
    errors = [s["error"] for s in samples if "error" in s]
    if errors:
        return {"error": errors[0]}
    out = {"key": [s["key"] for s in samples], "failed": [f for s in samples for f in s["failed"]],
           "caption": [s["caption"] for s in samples]}
    for name in ("original_size", "crop_coords_top_left", "target_size"):
        out[name] = torch.tensor([s[name] for s in samples], dtype=torch.float32)  # (B, 2)
    out["aesthetic_score"] = torch.tensor([[s["aesthetic_score"]] for s in samples], dtype=torch.float32)  # (B, 1)
    for name in ("pixels", "mean", "std", "crossattn", "pooled"):
        if name in samples[0]:
            out[name] = torch.stack([s[name] for s in samples])
    return out


# --- the cache: VAE posterior and text embeddings, computed once --------------------------------
# Two kinds of file, each named by everything its contents depend on, so trainings that share a VAE encoder share
# latents (the base, its continuation and the refiner) and trainings that share text encoders share captions:
#   latents/<key>.safetensors  mean, std of one fixed crop (key: image file, bucket, crop seed, VAE encoder weights)
#   text/<key>.safetensors     crossattn, pooled of one caption (key: caption, text encoder weights)

class CachedDataset(ImageDataset):
    """Samples read from the cache: latent posterior (mean, std) of one fixed crop per image, and text embeddings."""

    def __init__(self, items, buckets, bucket_of, seed, random_crop, aesthetic_score, files: list[Path],
                 text_files: list[Path]):
        super().__init__(items, buckets, bucket_of, seed, random_crop, aesthetic_score)
        self.files, self.text_files = files, text_files

    def _sample(self, i: int, b: int, k: int, pos: int) -> dict:
        item = self.items[i]
        f = SafetensorsFile(self.files[i], fix="delete it: it is rebuilt")
        latent, meta = {name: f[name] for name in ("mean", "std")}, f.metadata
        f = SafetensorsFile(self.text_files[i], fix="delete it: it is rebuilt")
        text = {name: f[name] for name in ("crossattn", "pooled")}
        return {**latent, **text, "caption": item.caption, "original_size": item.size,
                "crop_coords_top_left": tuple(json.loads(meta["crop_coords_top_left"])),
                "target_size": self.buckets[b], "key": (k, pos),
                "aesthetic_score": self.aesthetic_score if item.aesthetic_score is None else item.aesthetic_score}


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A hash of tensors' names, dtypes and bytes: what a cache made with these weights is named by."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(state[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def cache_file(cache_dir: Path, item: Item, bucket: tuple[int, int], random_crop: bool, seed: int,
               fingerprint: str) -> Path:
    """Where an image's latents live: named by the file, its crop and the VAE encoder (`fingerprint`)."""
    st = os.stat(item.path)
    key = stable_seed(os.path.abspath(item.path), st.st_mtime_ns, st.st_size, bucket, random_crop, seed, fingerprint)
    return cache_dir / "latents" / f"{key:016x}.safetensors"


def text_cache_file(cache_dir: Path, caption: str, fingerprint: str) -> Path:
    """Where a caption's embeddings live: named by the caption and the text encoders (`fingerprint`)."""
    return cache_dir / "text" / f"{stable_seed(caption, fingerprint):016x}.safetensors"


def _save_atomic(tensors: dict, f: Path, metadata: dict | None = None) -> None:
    from sdxl.formats.files import write_tensors

    write_tensors(f, tensors, metadata, mode="replace")  # concurrent writers of one file (ranks, runs) write the same bytes


@torch.no_grad()
def fill_cache(items: list[Item], buckets, bucket_of: list[int], files: list[Path], encode, seed: int,
               random_crop: bool, rank: int, world: int) -> list[str]:
    """Write this process's share (every world-th item) of missing latent files; returns the unreadable ones.

    `encode(pixels (1, 3, h, w)) -> {"mean", "std"}` runs the frozen VAE encoder.
    An unreadable image gets a `.bad` marker beside its would-be file so that every process skips it.
    """
    for folder in {f.parent for f in files}:
        folder.mkdir(parents=True, exist_ok=True)
    failed = []
    for i in range(rank, len(items), world):
        item, f = items[i], files[i]
        if f.is_file() or f.with_suffix(".bad").is_file():
            continue
        bucket = buckets[bucket_of[i]]
        rng = np.random.default_rng(stable_seed(seed, "crop", os.path.abspath(item.path))) if random_crop else None
        resized, top_left = crop_box(item.size, bucket, rng)
        try:
            pixels = load_crop(item.path, resized, top_left, bucket)
        except Exception as e:  # PIL raises many types on corrupt files
            failed.append(f"{item.path}: unreadable ({type(e).__name__})")
            f.with_suffix(".bad").write_text(failed[-1])
            continue
        _save_atomic(encode(pixels[None]), f, {"path": item.path, "crop_coords_top_left": json.dumps(top_left)})
    return failed


@torch.no_grad()
def fill_text_cache(captions: list[str], files: list[Path], encode, rank: int, world: int) -> None:
    """Write this process's share of the missing caption files (each distinct caption once).
    `encode(caption) -> {"crossattn", "pooled"}` runs the frozen text encoders."""
    for folder in {f.parent for f in files}:
        folder.mkdir(parents=True, exist_ok=True)
    every = sorted({(str(f), c) for c, f in zip(captions, files)})  # shared out before looking: all ranks agree
    for path, caption in every[rank::world]:
        if not Path(path).is_file():
            _save_atomic(encode(caption), Path(path))
