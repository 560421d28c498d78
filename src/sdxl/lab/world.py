"""A synthetic world of captioned images: coloured shapes on a plain background.

No pretrained weights can be downloaded, so the project trains its default model here and
measures it with `judge.py`. A `Scene` is a background colour and 1-3 objects (shape,
colour, size, centre); its caption is what a user would type:

    "a green star in the top left on a white background"
    "two red circles and a blue square at the bottom on a yellow background"

Vocabulary: shapes circle, square, triangle, star, diamond, cross; colours red, orange,
yellow, green, blue, purple, white, black (objects never take the background's colour).
Caption grammar (small and fixed, `parse_caption` reads it back): objects of the same colour
and shape form a group; a group of one names its region of the 3x3 grid ("in the top
left", "at the top", "in the center", ...), a group of several states its count ("two",
"three") and no region; a quarter of scenes name no regions at all. Groups are joined
with ", " and " and ", and the caption ends with " on a <colour> background".

Geometry is resolution-free: centres are fractions of width and height, sizes are the
radius of the circumscribing circle as a fraction of the shorter side, so a scene renders
at any size and aspect ratio with undistorted shapes. Every sampled object lies wholly
inside the frame (margin `MARGIN`) at every aspect ratio, and objects do not overlap;
`scene_border_cut` (geometry, also for a crop box) and `border_cut` (pixels, for generated
images) tell when one is cut by the border. `label_map` is the ground-truth segmentation.
`make_dataset` writes PNG + caption pairs at a spread of sizes and aspect ratios
(`DATASET_SIZES`) for a trainer that resizes and crops them.
Everything is deterministic for a seed: scenes come from `random.Random`, pixels from PIL.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "diamond": "diamonds", "cross": "crosses"}
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
REGION_PHRASES = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
                  "left": "on the left", "center": "in the center", "right": "on the right",
                  "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right"}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}

MIN_SIZE, MAX_SIZE = 0.10, 0.16  # circumradius / shorter side
JITTER = 0.04  # centre offset from its cell's centre, fraction of width or height
MARGIN = 0.03  # every sampled object stays this far (fraction of the shorter side) inside the frame

# original (width, height) of dataset images: small 64-128 px and large 256-512 px, aspect 1:2 .. 2:1
DATASET_SIZES = (
    (64, 64), (96, 96), (128, 128), (128, 64), (64, 128), (96, 64), (64, 96), (128, 96), (96, 128),
    (256, 256), (384, 384), (512, 512), (512, 256), (256, 512), (384, 256), (256, 384), (512, 384), (384, 512),
)


def _star(points: int = 5, inner: float = 0.45) -> tuple[tuple[float, float], ...]:
    return tuple(((1.0 if k % 2 == 0 else inner) * math.cos(math.pi * k / points - math.pi / 2),
                  (1.0 if k % 2 == 0 else inner) * math.sin(math.pi * k / points - math.pi / 2))
                 for k in range(2 * points))


# unit outlines (centre 0, y down) inside the unit circle; the circle itself is drawn as an ellipse of radius 0.85
_OUTLINES = {
    "square": ((-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)),
    "triangle": ((0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)),
    "star": _star(),
    "diamond": ((0.0, -1.0), (0.7, 0.0), (0.0, 1.0), (-0.7, 0.0)),
    "cross": ((-0.3, -0.9), (0.3, -0.9), (0.3, -0.3), (0.9, -0.3), (0.9, 0.3), (0.3, 0.3), (0.3, 0.9),
              (-0.3, 0.9), (-0.3, 0.3), (-0.9, 0.3), (-0.9, -0.3), (-0.3, -0.3)),
}
_CIRCLE_RADIUS = 0.85


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: float  # circumradius, fraction of the shorter side
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height

    @property
    def region(self) -> str:
        """The 3x3 grid cell holding the centre."""
        return region_at(self.x, self.y)


@dataclass(frozen=True)
class Group:
    """One phrase of a caption: `count` objects of one colour and shape, in `region` if it names one."""

    colour: str
    shape: str
    count: int
    region: str | None = None


@dataclass(frozen=True)
class Claims:
    """What a caption asserts: the background and the groups, in caption order."""

    background: str
    groups: tuple[Group, ...]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]
    say_regions: bool = True  # False: the caption names no regions

    def claims(self) -> Claims:
        """Groups objects by (colour, shape) in reading order; singletons keep their region if regions are said."""
        order: list[tuple[str, str]] = []
        members: dict[tuple[str, str], list[SceneObject]] = {}
        for o in sorted(self.objects, key=lambda o: REGIONS.index(o.region)):
            key = (o.colour, o.shape)
            if key not in members:
                order.append(key)
                members[key] = []
            members[key].append(o)
        groups = []
        for colour, shape in order:
            objs = members[(colour, shape)]
            region = objs[0].region if self.say_regions and len(objs) == 1 else None
            groups.append(Group(colour, shape, len(objs), region))
        return Claims(self.background, tuple(groups))

    @property
    def caption(self) -> str:
        return caption_of(self.claims())

    def to_dict(self) -> dict:
        return {"background": self.background, "say_regions": self.say_regions,
                "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["background"], tuple(SceneObject(**o) for o in d["objects"]), d.get("say_regions", True))


def region_at(x: float, y: float) -> str:
    """Name of the 3x3 cell holding the point (x, y) in fractions of width and height."""
    col, row = min(int(x * 3), 2), min(int(y * 3), 2)
    return REGIONS[3 * max(row, 0) + max(col, 0)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_of(claims: Claims) -> str:
    """Plain-English caption: "a red circle on the left and two blue stars on a white background"."""
    phrases = []
    for g in claims.groups:
        count = _article(g.colour) if g.count == 1 else COUNT_WORDS[g.count]
        noun = g.shape if g.count == 1 else PLURALS[g.shape]
        phrases.append(f"{count} {g.colour} {noun}" + (f" {REGION_PHRASES[g.region]}" if g.region else ""))
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body} on {_article(claims.background)} {claims.background} background"


def parse_caption(text: str) -> Claims:
    """Read a caption of this world's grammar back into its claims; ValueError naming the first bad phrase."""
    words = text.strip().lower().rstrip(".").replace("centre", "center")
    tail = " background"
    if not words.endswith(tail) or " on " not in words:
        raise ValueError(f"caption must end with 'on a <colour> background': {text!r}")
    body, bg_phrase = words[: -len(tail)].rsplit(" on ", 1)
    bg = bg_phrase.split()
    if len(bg) != 2 or bg[0] not in ("a", "an") or bg[1] not in COLOURS:
        raise ValueError(f"unknown background {bg_phrase!r} in {text!r}; colours: {', '.join(COLOURS)}")
    counts = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
    singular = {p: s for s, p in PLURALS.items()}
    phrase_region = {p: r for r, p in REGION_PHRASES.items()}
    groups = []
    for phrase in body.replace(" and ", ", ").split(", "):
        w = phrase.split()
        if len(w) < 3 or w[0] not in counts or w[1] not in COLOURS:
            raise ValueError(f"cannot read {phrase!r} in {text!r}: expected '<count> <colour> <shape> [region]'")
        count = counts[w[0]]
        shape = w[2] if count == 1 else singular.get(w[2], "")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {w[2]!r} in {text!r}; shapes: {', '.join(SHAPES)}")
        rest = " ".join(w[3:])
        if rest and rest not in phrase_region:
            raise ValueError(f"unknown region {rest!r} in {text!r}; regions: {', '.join(REGION_PHRASES.values())}")
        groups.append(Group(w[1], shape, count, phrase_region.get(rest)))
    return Claims(bg[1], tuple(groups))


def sample_scene(rng: random.Random) -> Scene:
    """1-3 non-overlapping objects in distinct 3x3 cells (centre jittered), colours unlike the background."""
    background = rng.choice(list(COLOURS))
    n = rng.choices((1, 2, 3), weights=(0.45, 0.35, 0.2))[0]
    others = [c for c in COLOURS if c != background]
    if n > 1 and rng.random() < 0.35:  # a counted group: "two red circles"
        kinds = [(rng.choice(SHAPES), rng.choice(others))] * n
    else:
        kinds = [(rng.choice(SHAPES), rng.choice(others)) for _ in range(n)]
    cells = sorted(rng.sample(range(9), n))
    while True:  # resample sizes and jitter until no two circumscribing circles come near (rarely needed)
        objects = []
        for (shape, colour), cell in zip(kinds, cells):
            size = rng.uniform(MIN_SIZE, MAX_SIZE)
            lo, hi = size + MARGIN, 1 - size - MARGIN  # inside the frame at every aspect ratio
            x = min(max((cell % 3 + 0.5) / 3 + rng.uniform(-JITTER, JITTER), lo), hi)
            y = min(max((cell // 3 + 0.5) / 3 + rng.uniform(-JITTER, JITTER), lo), hi)
            objects.append(SceneObject(shape, colour, round(size, 4), round(x, 4), round(y, 4)))
        if all(math.dist((a.x, a.y), (b.x, b.y)) >= a.size + b.size + 0.02
               for i, a in enumerate(objects) for b in objects[i + 1:]):
            break
    return Scene(background, tuple(objects), say_regions=rng.random() < 0.75)


def _outline_px(o: SceneObject, width: int, height: int) -> list[tuple[float, float]]:
    """Polygon vertices (or the circle's bounding box corners) in pixels."""
    r, cx, cy = o.size * min(width, height), o.x * width, o.y * height
    if o.shape == "circle":
        rc = r * _CIRCLE_RADIUS
        return [(cx - rc, cy - rc), (cx + rc, cy + rc)]
    return [(cx + r * u, cy + r * v) for u, v in _OUTLINES[o.shape]]


def render(scene: Scene, width: int, height: int, supersample: int = 4) -> Image.Image:
    """RGB image of the scene, drawn at `supersample` times the size and box-filtered down (anti-aliased)."""
    w, h = width * supersample, height * supersample
    img = Image.new("RGB", (w, h), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        pts = _outline_px(o, w, h)
        if o.shape == "circle":
            draw.ellipse(pts, fill=COLOURS[o.colour])
        else:
            draw.polygon(pts, fill=COLOURS[o.colour])
    return img.reduce(supersample) if supersample > 1 else img


def label_map(scene: Scene, width: int, height: int) -> np.ndarray:
    """Ground-truth segmentation (height, width) uint8: 0 background, 1 + SHAPES.index(shape) inside each object."""
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        value = 1 + SHAPES.index(o.shape)
        pts = _outline_px(o, width, height)
        if o.shape == "circle":
            draw.ellipse(pts, fill=value)
        else:
            draw.polygon(pts, fill=value)
    return np.asarray(img)


def scene_border_cut(scene: Scene, width: int, height: int,
                     crop: tuple[int, int, int, int] | None = None) -> bool:
    """Whether any object crosses the frame (or the crop box (left, top, right, bottom) in pixels), from geometry.

    An object wholly outside the crop is missing, not cut, and does not count.
    """
    left, top, right, bottom = crop if crop is not None else (0, 0, width, height)
    for o in scene.objects:
        xs, ys = zip(*_outline_px(o, width, height))
        inside = left <= min(xs) and max(xs) <= right and top <= min(ys) and max(ys) <= bottom
        outside = max(xs) <= left or min(xs) >= right or max(ys) <= top or min(ys) >= bottom
        if not inside and not outside:
            return True
    return False


def border_cut(image: Image.Image | np.ndarray, threshold: float = 60.0, min_run: int | None = None) -> bool:
    """Whether an object is cut by the image border, from pixels alone (works on generated images).

    The background colour is the median of the border pixels; a border pixel is foreground when
    its RGB distance from it exceeds `threshold` (0-255 scale). An object touches the border when
    some side has a run of at least `min_run` consecutive foreground pixels (default 3% of that
    side, at least 2 px), so isolated noisy pixels do not count.
    """
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if px.ndim != 3 or px.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {px.shape}")
    sides = [px[0], px[-1], px[:, 0], px[:, -1]]
    background = np.median(np.concatenate(sides), axis=0)
    for side in sides:
        fg = np.linalg.norm(side - background, axis=1) > threshold
        need = min_run if min_run is not None else max(2, round(0.03 * len(side)))
        run = 0
        for f in fg:
            run = run + 1 if f else 0
            if run >= need:
                return True
    return False


def make_dataset(out_dir: str | Path, n: int, seed: int, sizes: tuple[tuple[int, int], ...] = DATASET_SIZES,
                 supersample: int = 4, workers: int = 1) -> list[dict]:
    """Write n captioned PNGs (`000000.png` + `000000.txt`) and `metadata.jsonl`; returns the jsonl records.

    Image i depends only on (seed, i): its scene and its (width, height), drawn uniformly from
    `sizes`. A record is {"file", "caption", "width", "height", "scene"} (`Scene.to_dict`); the trainer reads
    the folder (PNG + .txt) or `metadata.jsonl` as a manifest. `workers` > 1 renders in that many processes.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(out, i, seed, sizes, supersample) for i in range(n)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            records = pool.starmap(_write_example, jobs, chunksize=64)
    else:
        records = [_write_example(*job) for job in jobs]
    with open(out / "metadata.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def _write_example(out: Path, i: int, seed: int, sizes, supersample: int) -> dict:
    rng = random.Random(seed * 1_000_003 + i)
    width, height = rng.choice(sizes)
    scene = sample_scene(rng)
    stem = f"{i:06d}"
    render(scene, width, height, supersample).save(out / f"{stem}.png")
    (out / f"{stem}.txt").write_text(scene.caption + "\n")
    return {"file": f"{stem}.png", "caption": scene.caption, "width": width, "height": height,
            "scene": scene.to_dict()}


def load_metadata(out_dir: str | Path) -> list[dict]:
    """The records `make_dataset` wrote, with `scene` as a `Scene`."""
    lines = (Path(out_dir) / "metadata.jsonl").read_text().splitlines()
    return [{**r, "scene": Scene.from_dict(r["scene"])} for r in map(json.loads, lines)]
