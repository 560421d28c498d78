"""Files in and out: one safetensors reader and one atomic writer, used by every file the project reads or writes.

Reading: pickles are recognised by their first bytes and refused unread; everything else goes
through the `safetensors` library's own header validation (offsets contiguous, no overlap, no gap,
sizes matching shapes and dtypes) and is memory-mapped. Writing: a temporary file in the same
folder, flushed to disk, then moved into place — replacing (a run's own files) or never
replacing (a new file, or the next free name chosen at the moment of linking).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sdxl.errors import CheckpointError, SDXLError, first_few

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # the file's name for it, a key of DTYPES
    shape: tuple[int, ...]


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """What tells a file replaced or rewritten in place (inode, size, mtime in ns), for caches keyed on a file's
    version; None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def refuse_pickle(path: Path, head: bytes) -> None:
    """Pickles can run arbitrary code when loaded: recognise them by their first bytes and refuse.

    A safetensors header length of 640-1535 bytes also starts 0x80 0x02..0x05; its JSON's `{` at byte 8 tells them apart
    (anything else goes on to the safetensors validation, which refuses it: nothing is ever unpickled)."""
    if head[8:9] == b"{":
        return
    if head[:4] == b"PK\x03\x04" or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise CheckpointError(f"{path}: is a Python pickle (a PyTorch .ckpt/.pt/.bin file); pickles can run arbitrary "
                              "code and are never loaded here: use the .safetensors release of this model")


class SafetensorsFile(Mapping):
    """A safetensors file: validated by the safetensors library on opening, tensors memory-mapped when asked for."""

    def __init__(self, path: str | os.PathLike, fix: str | None = "re-download the file"):
        """`fix`: what the error for a corrupt file advises (None: nothing, the caller says it)."""
        self.path = Path(path)
        head, size = _head(self.path)
        refuse_pickle(self.path, head)
        if size < 8:
            raise CheckpointError(f"{self.path}: {size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head[:8], "little")
        if n > min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{self.path}: not a safetensors file, or truncated: its header length ({n} bytes) "
                                  f"exceeds the file ({size} bytes)")
        try:  # the library's validation of the header
            self.metadata: dict[str, str] = safe_open(str(self.path), framework="pt", device="cpu").metadata() or {}
        except SafetensorError as e:
            advice = f"; {fix}" if fix else ""
            raise CheckpointError(f"{self.path}: {_reason(str(e), self.path, n, size)}{advice}") from None
        self._data_start, self._map = 8 + n, None
        entries = _entries(self.path, n)  # validated above; sorted by name, as the library lists them
        self.offsets = {k: tuple(entries[k]["data_offsets"]) for k in sorted(entries)}
        self.infos = {k: TensorInfo(entries[k]["dtype"], tuple(entries[k]["shape"])) for k in self.offsets}
        odd = [f"{k} ({i.dtype})" for k, i in self.infos.items() if i.dtype not in DTYPES]
        if odd:
            raise CheckpointError(f"{self.path}: {len(odd)} tensor{'s' if len(odd) != 1 else ''} of a dtype not supported "
                                  f"here ({first_few(odd)}); supported: {', '.join(DTYPES)}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: i.shape for k, i in self.infos.items()}

    def dtypes(self) -> dict[str, torch.dtype]:
        return {k: DTYPES[i.dtype] for k, i in self.infos.items()}

    def __len__(self) -> int:
        return len(self.infos)

    def __iter__(self):
        return iter(self.infos)

    def __getitem__(self, key: str) -> torch.Tensor:
        """The tensor, a view of the file's private (copy-on-write) memory map: no read until used."""
        info = self.infos[key]
        start, end = self.offsets[key]
        if end == start:
            return torch.empty(info.shape, dtype=DTYPES[info.dtype])
        if self._map is None:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=end - start, offset=self._data_start + start)
        return raw.view(DTYPES[info.dtype]).view(info.shape)

    def release(self, keys) -> None:
        """Drop this process's pages of these tensors (madvise DONTNEED): they leave its resident memory and are
        read again from the file (the page cache) if used again. Views of them stay valid."""
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        for key in keys:
            start, end = (self._data_start + o for o in self.offsets[key])
            first = start // mmap.PAGESIZE * mmap.PAGESIZE
            last = min(-(-end // mmap.PAGESIZE) * mmap.PAGESIZE, len(self._map))
            if last > first:
                self._map.madvise(mmap.MADV_DONTNEED, first, last - first)


def _head(path: Path) -> tuple[bytes, int]:
    """The first 9 bytes and the size of a regular file; a clear error for anything else."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{path}: is a folder, not a .safetensors file")
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{path}: not a regular file (a pipe or device?)")
        with open(path, "rb") as f:
            return f.read(9), st.st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None


def _entries(path: Path, n: int) -> dict:
    """The tensor entries of a safetensors header `n` bytes long (raw JSON: not validated)."""
    with open(path, "rb") as f:
        return {k: h for k, h in json.loads(f.read(8 + n)[8:]).items() if k != "__metadata__"}


def _reason(error: str, path: Path, n: int, size: int) -> str:
    """The safetensors library's complaint in our words; it names no entry, so look for the culprit (message only)."""
    reason = error.removeprefix("Error while deserializing header: ")
    data = size - 8 - n
    try:
        entries = _entries(path, n)
        need = max((h["data_offsets"][1] for h in entries.values()), default=0)
        nbytes = {k: torch.empty(0, dtype=d).element_size() for k, d in DTYPES.items()}
        bad = [k for k, h in entries.items()
               if h["data_offsets"][1] - h["data_offsets"][0] != math.prod(h["shape"]) * nbytes.get(h["dtype"], -1)]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError):
        need, bad = None, []
    bad = bad or ["?"]
    if "not fully covered" in reason and need is not None and need > data:
        return f"truncated: the header describes {need} bytes of tensor data but the file holds {data}"
    if "not fully covered" in reason:
        return f"corrupt or padded: the header's tensors do not cover the file's {data} bytes of tensor data exactly"
    if "invalid offset" in reason:
        return f"corrupt safetensors header: {reason} (its data overlaps another tensor's or leaves a gap)"
    if "invalid shape, data type, or offset" in reason:
        return f"corrupt safetensors header: malformed tensor entr{'y' if len(bad) == 1 else 'ies'} ({first_few(bad)})"
    return f"corrupt safetensors header ({reason[:300]})"


# --- writing ---------------------------------------------------------------------------------------

def write_file(path: str | os.PathLike, write: Callable[[Path], object], mode: str = "new") -> Path:
    """`write(tmp)` into a temporary file beside `path`, fsync, then move it into place; returns the path written.

    mode "replace": `os.replace` (a run's own files, caches whose writers write the same bytes);
    "new": link to `path`, an error if it exists; "free": `path`, else stem-1.ext, stem-2.ext, ...:
    the first name that is free at the moment of linking, so a file created meanwhile is never replaced.
    """
    path = Path(path)
    if mode not in ("replace", "new", "free"):
        raise ValueError(f"write_file: unknown mode {mode!r}")
    if not path.parent.is_dir():
        raise SDXLError(f"{path.parent}: {'not a folder' if path.parent.exists() else 'no such folder'}")
    if mode == "new" and path.exists():
        raise SDXLError(f"{path}: already exists; choose another name (nothing was overwritten)")
    tmp = path.with_name(f".{path.name[:200]}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as to any new file
    except OSError as e:
        raise SDXLError(f"{path}: cannot write there ({e.strerror})") from None
    try:
        mode_bits = os.stat(tmp).st_mode & 0o777  # 0o666 less the umask, as for any new file
        write(tmp)
        os.chmod(tmp, mode_bits)  # writers that replace the file (the safetensors library: 0600) keep it
        fsync(tmp)
        out = _move(tmp, path, mode)
        fsync(path.parent)
        return out
    except OSError as e:
        raise SDXLError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  mode: str = "new") -> Path:
    """A safetensors file, written by the safetensors library through `write_file`."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_file(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), mode)


def write_json(path: str | os.PathLike, obj, mode: str = "new", indent: int = 2) -> Path:
    """A UTF-8 JSON file through `write_file`."""
    text = json.dumps(obj, indent=indent)
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode)


def _move(tmp: Path, path: Path, mode: str) -> Path:
    if mode == "replace":
        os.replace(tmp, path)
        return path
    for target in candidates(path):
        try:
            _link_new(tmp, target)
            return target
        except FileExistsError:
            if mode == "new":
                raise SDXLError(f"{path}: already exists; choose another name (nothing was overwritten)") from None
    raise SDXLError(f"{path}: no free name left beside it")


def candidates(path: str | os.PathLike, limit: int = 100_000):
    """`path`, then stem-1.ext, stem-2.ext, ...: the names a "free" write tries in turn."""
    path = Path(path)
    yield path
    for i in range(1, limit):
        yield path.with_name(f"{path.stem}-{i}{path.suffix}")


def _link_new(tmp: Path, target: Path) -> None:
    """Put `tmp` at `target` only if nothing is there: a hard link, or (file systems without them) an
    exclusively created placeholder that only this process then replaces."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(tmp, target)


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        pass
    finally:
        os.close(fd)
