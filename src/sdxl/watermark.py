"""SDXL's invisible watermark: the reference's fixed 48-bit message, written and read with `invisible-watermark`'s dwtDct."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sdxl.errors import SDXLError

# sgm/inference/helpers.py: "A fixed 48-bit message that was choosen at random", most significant bit first.
WATERMARK_MESSAGE = 0xB3EC907BB19E
WATERMARK_BITS = [int(bit) for bit in f"{WATERMARK_MESSAGE:048b}"]

# scripts/demo/detect.py MATCH_VALUES: the verdict for at most this many matching bits.
VERDICTS = ((27, "no watermark"), (33, "partial match"), (35, "likely watermarked"), (48, "very likely watermarked"))


def _fits(width: int, height: int) -> bool:
    """The library's own limit (256*256 pixels in all), and one 4x4 block of its half-size wavelet band a side."""
    return width * height >= 256 * 256 and min(width, height) >= 8


def _bgr(image: Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8 BGR, the order cv2 and the library expect."""
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def add_watermark(images: list[Image.Image]) -> list[Image.Image]:
    """Write WATERMARK_BITS with dwtDct on uint8 BGR, the way detect_watermark reads it; images too small are returned as they are."""
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits", WATERMARK_BITS)
    out = []
    for image in images:
        if not _fits(*image.size):
            out.append(image)
            continue
        bgr = _bgr(image)
        # sgm's WatermarkEmbedder passes float32 0..255, where cv2 offsets U by 0.5 instead of 128: the mark then
        # lands where the uint8 detector does not look wherever U < 0 (yellow, red, green); a photo read back 20/48
        # bits that way, 48/48 this way.
        marked = encoder.encode(bgr.copy(), "dwtDct")
        # The library converts uint8 BGR -> YUV -> BGR, which clips saturated colours ((255, 0, 0) comes back
        # (221, 17, 1)); keep only its change to the pixels by subtracting that round trip without the mark.
        round_trip = cv2.cvtColor(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV), cv2.COLOR_YUV2BGR)
        bgr = np.clip(bgr.astype(np.int16) + marked - round_trip, 0, 255).astype(np.uint8)
        result = Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))
        if image.mode == "RGBA":
            result.putalpha(image.getchannel("A"))
        out.append(result)
    return out


def verdict(matches: int) -> str:
    """The reference's verdict for this many of the 48 bits matching."""
    return next(text for most, text in VERDICTS if matches <= most)


def detect_watermark(image: Image.Image, name: str | None = None) -> tuple[int, str]:
    """(bits matching WATERMARK_BITS, verdict) as the reference's scripts/demo/detect.py reads them."""
    from imwatermark import WatermarkDecoder

    width, height = image.size
    if not _fits(width, height):
        name = name or getattr(image, "filename", "") or "the image"
        raise SDXLError(f"{name} is {width}x{height}; the watermark can only be read from images of at least 256x256")
    bits = WatermarkDecoder("bits", len(WATERMARK_BITS)).decode(_bgr(image), "dwtDct")
    matches = sum(int(b) == w for b, w in zip(bits, WATERMARK_BITS))
    return matches, verdict(matches)


def detect_file(path: str | Path) -> tuple[int, str]:
    """`detect_watermark` of an image file, read through `sdxl.images` (regular files, size limits, EXIF)."""
    from sdxl.images import load_image

    return detect_watermark(load_image(path, "detect-watermark", "file"), str(path))
