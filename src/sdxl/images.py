"""Reading the user's images, in one place: regular files only, Pillow's size limits, EXIF orientation, 8 bits.

Used for init images, masks, PNG recipes and the watermark detector (and next the server). Every failure is
an `SDXLError` naming the file.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from sdxl.errors import SDXLError

# Pillow's decompression-bomb limit (about 89M pixels); beyond it Pillow warns, at twice it raises. We refuse at it.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def regular_file(path: str | os.PathLike, what: str, noun: str = "image file") -> Path:
    """`path` if it is a regular file; FIFOs, devices and folders are refused (opening a FIFO would block)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SDXLError(f"{what} {path}: no such {noun}") from None
    except OSError as e:
        raise SDXLError(f"{what} {path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise SDXLError(f"{what} {path}: {kind}; give a regular {noun}")
    return Path(path)


@contextmanager
def opened(path: str | os.PathLike | bytes, what: str = "image", noun: str = "image file",
           max_pixels: int = MAX_PIXELS) -> Iterator[Image.Image]:
    """The image (a file, or the bytes of one) with its header and text chunks read, pixels not yet decoded;
    refused over max_pixels."""
    source = io.BytesIO(path) if isinstance(path, bytes) else regular_file(path, what, noun)
    path = _named(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise SDXLError(f"{what} {path}: its header claims more than {MAX_PIXELS} pixels (a decompression bomb?); "
                        "refused") from None
    except ValueError as e:  # e.g. a text chunk over PngImagePlugin.MAX_TEXT_CHUNK
        raise SDXLError(f"{what} {path}: not a readable image ({e})") from None
    except OSError:  # PIL.UnidentifiedImageError is an OSError
        raise SDXLError(f"{what} {path}: not a readable image") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise SDXLError(f"{what} {path}: {w}x{h} is more than {max_pixels} pixels; refused")
        yield im


def to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float images scaled to 8 bits (Pillow's convert would clip: 16-bit mid-grey -> white)."""
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit PNG/TIFF grey: 0..65535
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":  # float images: 0..1
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(np.nan_to_num(a) * 255.0), 0, 255).astype(np.uint8), "L")
    return im


def load_image(path: str | os.PathLike | bytes, what: str = "image", noun: str = "image file",
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A user's image (a file or its bytes), decoded: EXIF orientation applied, high bit depths scaled to 8 bits,
    file closed."""
    with opened(path, what, noun, max_pixels) as im:
        try:
            im.load()
            im = to_8bit(ImageOps.exif_transpose(im))
        except (OSError, ValueError, SyntaxError):
            raise SDXLError(f"{what} {_named(path)}: not a readable image (truncated or corrupt)") from None
        return im.copy()


def _named(path: str | os.PathLike | bytes) -> str | os.PathLike:
    """How a message names an image: its path, or "(N bytes)" for one sent as bytes (never the bytes)."""
    return f"({len(path)} bytes)" if isinstance(path, bytes) else path
