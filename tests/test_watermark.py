"""sdxl.watermark: the reference's 48-bit dwtDct mark, written and read back with `invisible-watermark`.

Measured with invisible-watermark 0.2.0 / opencv-python 5.0.0.93 on scene() (512x512): 48/48 bits after marking,
28/48 before ("partial match"), PSNR 36.4 dB. Survived (48 bits): a PNG round trip, +10 brightness, a resize that
comes back to 512x512 (512 -> 600 -> 512), cutting rows off the bottom. Lost (29 bits or fewer, chance level):
a resize that stays at another size (600, 768, 1024 px: 21-28), cutting the top or left edge (even 8 px) or
the right one (the width sets the bit layout), a flip, a 90-degree rotation (27), JPEG quality 90 (29). Mixed:
a 2-degree rotation (38 here, 27 on a photo), JPEG 95 (48 here, 21 on a photo: PIL's default 4:2:0 JPEG halves
the chroma the mark lives in). The decoder reads a fixed 8x8-pixel grid of the U (blue-difference) channel, so a
marked image must keep its size and grid, and have colour texture: the same scene without texture reads 27/48
after marking; over 8 texture seeds, 35-48.
"""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from sdxl.errors import SDXLError
from sdxl.watermark import WATERMARK_BITS, add_watermark, detect_watermark, verdict


def scene(size: int = 512, texture: float = 10.0, seed: int = 0) -> Image.Image:
    """A deterministic landscape: sky gradient, hills, sun, a house, and 1/f colour texture like a photo's."""
    y = np.linspace(0, 1, size)[:, None, None]
    sky = np.array([90, 130, 220]) + y * [90, 70, 25]
    img = Image.fromarray(np.broadcast_to(sky, (size, size, 3)).round().astype(np.uint8))
    d, s = ImageDraw.Draw(img), size
    d.polygon([(0, .75 * s), (.3 * s, .5 * s), (.55 * s, .7 * s), (.8 * s, .45 * s), (s, .65 * s), (s, s), (0, s)],
              fill=(110, 120, 140))
    d.ellipse([.6 * s, .1 * s, .8 * s, .3 * s], fill=(235, 225, 200))
    d.rectangle([.1 * s, .8 * s, .35 * s, .95 * s], fill=(170, 90, 60))
    img = img.filter(ImageFilter.GaussianBlur(2))
    rng = np.random.default_rng(seed)
    f = np.hypot(np.fft.fftfreq(s)[:, None], np.fft.rfftfreq(s)[None, :])
    f[0, 0] = np.inf  # no DC
    noise = np.fft.irfft2((rng.normal(size=(3, *f.shape)) + 1j * rng.normal(size=(3, *f.shape))) / f, s=(s, s))
    noise = noise.transpose(1, 2, 0) / noise.std()  # (3, H, W) -> (H, W, 3)
    return Image.fromarray((np.asarray(img, np.float64) + texture * noise).round().clip(0, 255).astype(np.uint8))


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean()
    return 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def pair() -> tuple[Image.Image, Image.Image]:
    clean = scene()
    return clean, add_watermark([clean])[0]


def test_message_is_the_reference_constant():
    assert len(WATERMARK_BITS) == 48
    assert int("".join(map(str, WATERMARK_BITS)), 2) == 0xB3EC907BB19E
    assert WATERMARK_BITS == [int(b) for b in "101100111110110010010000011110111011000110011110"]


def test_verdict_thresholds_match_the_reference_script():
    got = {n: verdict(n) for n in (0, 27, 28, 33, 34, 35, 36, 48)}
    assert got == {0: "no watermark", 27: "no watermark", 28: "partial match", 33: "partial match",
                   34: "likely watermarked", 35: "likely watermarked", 36: "very likely watermarked",
                   48: "very likely watermarked"}


def test_marked_image_reads_back(pair):
    clean, marked = pair
    matches, text = detect_watermark(marked)
    assert matches >= 44 and text == "very likely watermarked"  # measured 48
    assert detect_watermark(clean)[0] <= 33  # measured 28, "partial match"
    assert marked.size == clean.size and marked.mode == "RGB"


def test_mark_changes_pixels_only_slightly(pair):
    clean, marked = pair
    assert psnr(clean, marked) > 35  # measured 36.4 dB; more colour texture costs more (the library swaps U details)


def test_saturated_colours_keep_their_value():
    # the library's uint8 YUV round trip alone turns (255, 0, 0) into (221, 17, 1): 21 dB on this image
    red = Image.new("RGB", (256, 256), (255, 0, 0))
    assert psnr(red, add_watermark([red])[0]) > 35  # measured 39.6 dB


def test_deterministic_and_keeps_alpha(pair):
    clean, marked = pair
    assert np.array_equal(np.asarray(add_watermark([clean])[0]), np.asarray(marked))
    rgba = clean.convert("RGBA")
    rgba.putalpha(77)
    out = add_watermark([rgba])[0]
    assert out.mode == "RGBA" and np.asarray(out)[..., 3].min() == 77
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(marked))


def test_survives_png_brightness_and_resize_back(pair, tmp_path):
    _, marked = pair
    marked.save(tmp_path / "m.png")
    assert detect_watermark(Image.open(tmp_path / "m.png"))[0] >= 44  # 48
    brighter = Image.fromarray((np.asarray(marked, np.int16) + 10).clip(0, 255).astype(np.uint8))
    assert detect_watermark(brighter)[0] >= 44  # 48
    there_and_back = marked.resize((600, 600), Image.BICUBIC).resize((512, 512), Image.BICUBIC)
    assert detect_watermark(there_and_back)[0] >= 44  # 48; at 600x600 itself: 28 (see the module docstring)


def test_small_images():
    tiny = Image.new("RGB", (128, 128), (10, 200, 30))
    assert add_watermark([tiny])[0] is tiny
    with pytest.raises(SDXLError, match=r"is 255x255; .* at least 256x256"):
        detect_watermark(Image.new("RGB", (255, 255)))
