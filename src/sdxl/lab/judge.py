"""The judge: a small CNN that reads a synthetic-world image (`world.py`) back into its attributes.

It measures whether generated images follow their prompts (`prompt_accuracy`, `prompt_report`)
and gives features for a Fréchet distance (`features`, `frechet_distance`: an FID with this
judge in place of Inception). It predicts the background colour and, for each cell of the
3x3 grid, the shape there (or none) and its colour; counts, "colour+shape present" and
positions follow from the cells (`predict`).

Input: any RGB image, resized so that its shorter side is 64 px (aspect kept: the model is
convolutional and reads its map at the 3x3 grid's cell centres, so shapes are seen undistorted
at 1:2..2:1 as well as 1:1).
A fourth input channel is each pixel's distance from the background colour (`foreground`),
which lets the net learn outlines once rather than per colour pair.
Architecture: a 4x4 patchify stem and three 3x3 convs (BatchNorm, ReLU) to a map at 1/8
scale. The map read at each grid cell's centre (bilinear; its receptive field covers the
cell) goes through a shared 1x1 layer to the cell's feature vector (shape and colour heads),
its global average to the background's. A dense head predicts the shape class at each map
location; it only adds a training signal (and keeps objects in neighbouring cells apart).
Training: scenes rendered at 32-128 px and aspect 1:2..2:1, augmented per step with colour
casts, blur, low resolution and noise, so that imperfect generated images are still read.

The shipped judge (`assets/judge.safetensors` + `assets/judge.json`) was trained with

    sdxl judge train --steps 1600 --seed 0 --pool 20000 --out src/sdxl/assets/judge

(from the repository root; about 4 minutes on 2 CPU cores, bit-for-bit reproducible there). `judge.json`
records the command (the shipped one names it `python -m sdxl.lab.judge`, its form before it moved into
`sdxl`) and the held-out accuracy.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdxl.errors import SDXLError
from sdxl.formats.files import SafetensorsFile, write_json, write_tensors
from sdxl.lab.world import COLOURS, REGIONS, SHAPES, Claims, Scene, label_map, parse_caption, render, sample_scene
from sdxl.train.lr import learning_rate

ASSETS = Path(__file__).parent.parent / "assets"
COLOUR_NAMES = tuple(COLOURS)
SHAPE_CLASSES = ("none",) + SHAPES  # per-cell shape head: class 0 is an empty cell


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int = 64  # shorter side of the input, px
    channels: tuple[int, ...] = (48, 64, 96, 128)  # stem (stride 4), conv, conv (stride 2), conv
    cell_hidden: int = 32  # width of each grid cell's feature vector (and of the background's)
    colours: tuple[str, ...] = COLOUR_NAMES
    shapes: tuple[str, ...] = SHAPE_CLASSES
    regions: tuple[str, ...] = REGIONS


def _conv(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2 if kernel == 3 else 0),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.channels
        h = config.cell_hidden
        self.trunk = nn.Sequential(_conv(4, c0, 4, 4), _conv(c0, c1, 3, 1), _conv(c1, c2, 3, 2), _conv(c2, c3, 3, 1))
        self.cell = nn.Conv2d(c3, h, 1)  # shared by the 9 cells
        self.shape = nn.Conv2d(h, len(config.shapes), 1)
        self.colour = nn.Conv2d(h, len(config.colours), 1)
        self.background_hidden = nn.Linear(c3, h)
        self.background = nn.Linear(h, len(config.colours))
        self.segment = nn.Conv2d(c3, len(config.shapes), 1)  # training signal only: shape class per map location

    def _hidden(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t = self.trunk(torch.cat([x, foreground(x)], dim=1) * 2 - 1)  # (N, c3, H/8, W/8)
        centres = torch.tensor([-2 / 3, 0.0, 2 / 3], device=t.device)  # cell centres, grid_sample coordinates
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1).expand(len(t), 3, 3, 2)
        at_centres = F.grid_sample(t, grid, align_corners=False)  # (N, c3, 3, 3): what is centred in each cell
        cells = F.relu(self.cell(at_centres))  # (N, h, 3, 3), one vector per grid cell
        background = F.relu(self.background_hidden(t.mean((2, 3))))  # (N, h)
        return t, cells, background

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Logits of a prepared batch x (N, 3, H, W) in [0, 1]: background (N, colours), shape (N, 9, shapes
        incl. none), colour (N, 9, colours), each in REGIONS order, and the dense shape map (N, shapes, H/8, W/8)."""
        t, cells, background = self._hidden(x)
        per_cell = lambda head: head(cells).flatten(2).transpose(1, 2)  # (N, 9, classes)
        return self.background(background), per_cell(self.shape), per_cell(self.colour), self.segment(t)

    def prepare(self, images) -> list[tuple[list[int], Tensor]]:
        """Batches of (indices, (n, 3, H, W) in [0, 1] with shorter side `image_size`), one per input size.

        `images`: PIL images (any sizes) or a tensor (N, 3, H, W), float in [0, 1] or uint8.
        """
        if isinstance(images, Tensor):
            x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
            groups = [(list(range(len(x))), x)]
        else:
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, im in enumerate(images):
                by_size.setdefault(im.size, []).append(i)
            groups = [(idx, torch.stack([pil_to_tensor(images[i]) for i in idx])) for idx in by_size.values()]
        device = self.background.weight.device
        return [(idx, resize_short(x, self.config.image_size).to(device)) for idx, x in groups]

    def _gather(self, images, fn) -> list[Tensor]:
        """fn(prepared batch) -> tuple of (n, ...) tensors, run per input size and put back in input order."""
        idx, outs = [], []
        for i, x in self.prepare(images):
            idx += i
            outs.append(fn(x))
        order = torch.tensor(idx).argsort()
        return [torch.cat(parts)[order] for parts in zip(*outs)]

    @torch.no_grad()
    def classify(self, images) -> tuple[Tensor, Tensor, Tensor]:
        """Logits background (N, colours), shape (N, 9, shapes), colour (N, 9, colours) of images of any sizes."""
        return tuple(self._gather(images, lambda x: self(x)[:3]))

    @torch.no_grad()
    def features(self, images) -> Tensor:
        """Penultimate features (N, 10 * cell_hidden): the background's vector, then the 9 cells' vectors.

        For `frechet_distance` use ~1000+ images a side: with D = 320 the estimate's bias is ~D/n.
        """
        def fn(x):
            _, cells, background = self._hidden(x)
            return (torch.cat([background, cells.flatten(1)], dim=1),)
        return self._gather(images, fn)[0]

    @torch.no_grad()
    def predict(self, images) -> list[dict]:
        """Per image: {"background", "objects": [{"region", "shape", "colour"}] in REGIONS order, "count"}."""
        bg, shape, colour = self.classify(images)
        out = []
        for b, s, c in zip(bg.argmax(-1).tolist(), shape.argmax(-1).tolist(), colour.argmax(-1).tolist()):
            objects = [{"region": self.config.regions[k], "shape": self.config.shapes[s[k]],
                        "colour": self.config.colours[c[k]]} for k in range(9) if s[k] != 0]
            out.append({"background": self.config.colours[b], "objects": objects, "count": len(objects)})
        return out

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """`path` (.safetensors) plus its config beside it (.json); `extra` is stored in the JSON (training facts)."""
        path = Path(path).with_suffix(".safetensors")
        write_tensors(path, self.state_dict(), mode="replace")
        meta = {"config": asdict(self.config), **(extra or {})}
        write_json(path.with_suffix(".json"), meta, mode="replace", indent=1)

    @classmethod
    def load(cls, path: str | Path = ASSETS / "judge.safetensors", device: str | torch.device = "cpu") -> "Judge":
        """A saved judge; its class names must be this world's (else the judge reads another world)."""
        path = Path(path).with_suffix(".safetensors")
        meta = json.loads(path.with_suffix(".json").read_text())
        config = JudgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        if (config.colours, config.shapes, config.regions) != (COLOUR_NAMES, SHAPE_CLASSES, REGIONS):
            raise ValueError(f"{path}: judge classes differ from world.py's colours/shapes/regions; retrain it")
        judge = cls(config)
        judge.load_state_dict(dict(SafetensorsFile(path)), strict=True)
        return judge.to(device).eval()


def foreground(x: Tensor) -> Tensor:
    """(N, 1, H, W) distance of each pixel from the background colour (median of the border pixels), x2, clipped to 1.

    A colour-independent view of the objects' outlines: shapes are learnt once, not per colour pair.
    """
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)  # (N, 3, 2H + 2W)
    background = border.median(dim=2).values[:, :, None, None]
    return ((x - background).square().sum(1, keepdim=True).sqrt() * 2).clamp(0, 1)


def pil_to_tensor(image: Image.Image) -> Tensor:
    """(3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def resize_short(x: Tensor, short: int) -> Tensor:
    """Resize (N, 3, H, W) so the shorter side is `short`, the longer one kept in proportion (to a multiple of 8)."""
    h, w = x.shape[-2:]
    if h <= w:
        return _resize(x, (short, max(short, round(w * short / h / 8) * 8)))
    return _resize(x, (max(short, round(h * short / w / 8) * 8), short))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def scene_targets(scene: Scene) -> tuple[int, list[int], list[int]]:
    """Labels: background index, per-cell shape index (0 = empty), per-cell colour index (ignored if empty)."""
    shape, colour = [0] * 9, [0] * 9
    for o in scene.objects:
        k = REGIONS.index(o.region)
        shape[k], colour[k] = SHAPE_CLASSES.index(o.shape), COLOUR_NAMES.index(o.colour)
    return COLOUR_NAMES.index(scene.background), shape, colour


# (height, width) of training batches, at the judge's scale; each step draws one shape
BUCKETS = ((64, 64), (64, 88), (88, 64), (64, 96), (96, 64), (64, 128), (128, 64))
BUCKET_WEIGHTS = (4, 1, 1, 1, 1, 1, 1)


def render_examples(rng: random.Random, n: int, size: tuple[int, int] = (64, 64), vary: bool = True) -> dict:
    """n fresh scenes as training examples: uint8 images (n, 3, H, W) with (H, W) = size, and their labels.

    With `vary`, each is rendered with the shorter side 32-128 px and then resized to `size`
    (what the judge does to generated images of other sizes). `segment` is the fraction of
    each 8x8 block covered by each shape class (n, shapes, H/8, W/8), the dense target.
    """
    images, segments, bgs, shapes, colours = [], [], [], [], []
    height, width = size
    for _ in range(n):
        scene = sample_scene(rng)
        scale = rng.choice((0.5, 0.75, 1, 1, 1, 1.5, 2)) if vary else 1
        w, h = round(width * scale), round(height * scale)
        images.append(_resize(pil_to_tensor(render(scene, w, h, supersample=2 if min(w, h) >= 96 else 4))[None], size))
        labels = Image.fromarray(label_map(scene, w, h)).resize((width, height), Image.NEAREST)
        one_hot = F.one_hot(torch.from_numpy(np.asarray(labels, dtype=np.int64)), len(SHAPE_CLASSES))
        segments.append(F.avg_pool2d(one_hot.permute(2, 0, 1).float()[None], 8).half())
        b, s, c = scene_targets(scene)
        bgs.append(b), shapes.append(s), colours.append(c)
    return {"images": (torch.cat(images) * 255).round().to(torch.uint8), "segment": torch.cat(segments),
            "background": torch.tensor(bgs), "shape": torch.tensor(shapes), "colour": torch.tensor(colours)}


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Imperfections of generated images, each drawn per image: colour cast, blur, low resolution, noise."""
    n, _, h, w = x.shape
    gain = 1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    offset = 0.04 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    x = x * gain + offset
    blur = torch.tensor([1.0, 2.0, 1.0])
    kernel = (blur[:, None] * blur[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.3, blurred, x)
    low = _resize(_resize(x.clamp(0, 1), (h // 2, w // 2)), (h, w))
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.15, low, x)
    sigma = 0.06 * torch.rand(n, 1, 1, 1, generator=g)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def judge_loss(judge: Judge, batch: dict[str, Tensor], x: Tensor) -> Tensor:
    """Cross-entropy: background + per-cell shape (incl. empty) + colour of occupied cells + dense shape map."""
    bg_logits, shape_logits, colour_logits, segment_logits = judge(x)
    shape, colour = batch["shape"], batch["colour"]
    occupied = shape > 0
    return (F.cross_entropy(bg_logits, batch["background"])
            + F.cross_entropy(shape_logits.flatten(0, 1), shape.flatten())
            + F.cross_entropy(colour_logits[occupied], colour[occupied])
            + F.cross_entropy(segment_logits, batch["segment"].float()))


def train_judge(steps: int = 1600, seed: int = 0, batch: int = 64, lr: float = 2e-3, pool: int = 20000,
                config: JudgeConfig = JudgeConfig(), log_every: int = 250) -> Judge:
    """AdamW (warm-up, cosine decay) on a pool of rendered scenes in `BUCKETS`, augmented anew at every step.

    Deterministic for a seed (scenes from `random.Random(seed)`, weights and batches from torch seeds).
    """
    torch.manual_seed(seed)
    start = time.time()
    rng = random.Random(seed)
    scale = config.image_size / 64
    buckets = [(round(h * scale / 8) * 8, round(w * scale / 8) * 8) for h, w in BUCKETS]
    share = [wt / sum(BUCKET_WEIGHTS) for wt in BUCKET_WEIGHTS]
    data = [render_examples(rng, max(batch, round(pool * p)), size) for size, p in zip(buckets, share)]
    if log_every:
        print(f"rendered {sum(len(d['images']) for d in data)} scenes ({time.time() - start:.0f}s)", flush=True)
    g = torch.Generator().manual_seed(seed)
    judge = Judge(config)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: learning_rate(i, steps, 1.0, warmup))  # x lr
    judge.train()
    for step in range(1, steps + 1):
        bucket = data[int(torch.multinomial(torch.tensor(share), 1, generator=g))]
        idx = torch.randint(0, len(bucket["images"]), (batch,), generator=g)
        b = {k: v[idx] for k, v in bucket.items()}
        loss = judge_loss(judge, b, augment(b["images"].float() / 255, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return judge.eval()


def heldout(n: int, seed: int = 12345, size: int = 64, vary: bool = False) -> tuple[list[Image.Image], list[Scene]]:
    """Fresh scenes (a seed stream training does not use), rendered clean at size x size.

    With `vary`, each at its own random size of 32-128 px and aspect 1:2..2:1 instead.
    """
    rng = random.Random(f"heldout-{seed}")
    scenes = [sample_scene(rng) for _ in range(n)]
    if not vary:
        return [render(s, size, size) for s in scenes], scenes
    sizes = [(rng.randint(32, 128), rng.randint(32, 128)) for _ in scenes]
    sizes = [(w, min(max(h, w // 2), 2 * w)) for w, h in sizes]
    return [render(s, w, h) for s, (w, h) in zip(scenes, sizes)], scenes


def _claims(item: Scene | Claims | str) -> Claims:
    if isinstance(item, Scene):
        return item.claims()
    return parse_caption(item) if isinstance(item, str) else item


def prompt_report(judge: Judge, images, prompts: Sequence[Scene | Claims | str], batch: int = 256) -> dict:
    """Fractions of images whose judged attributes match their prompt's claims, per attribute and overall.

    With the judge's objects J (one per occupied cell) and the prompt's objects P (each group
    `count` times): `background` equal; `count` |J| == |P|; `colour` / `shape` / `objects` the
    multisets of colours / shapes / (colour, shape) pairs equal; `position` every group that
    names a region has an object of its colour and shape in that cell (over the images whose
    prompt names a region, `n_position` of them); `all` (= `prompt_accuracy`): background,
    objects and position all right, i.e. exactly the named objects, where named, on the named background.
    """
    claims = [_claims(p) for p in prompts]
    if len(claims) != len(images):
        raise ValueError(f"{len(images)} images but {len(claims)} prompts")
    preds = []
    for i in range(0, len(claims), batch):
        preds += judge.predict(images[i:i + batch])
    tally = Counter()
    n_position = 0
    for pred, c in zip(preds, claims):
        judged = [(o["colour"], o["shape"]) for o in pred["objects"]]
        wanted = [(g.colour, g.shape) for g in c.groups for _ in range(g.count)]
        at = {o["region"]: (o["colour"], o["shape"]) for o in pred["objects"]}
        named = [g for g in c.groups if g.region is not None]
        ok = {"background": pred["background"] == c.background,
              "count": len(judged) == len(wanted),
              "colour": Counter(j[0] for j in judged) == Counter(w[0] for w in wanted),
              "shape": Counter(j[1] for j in judged) == Counter(w[1] for w in wanted),
              "objects": Counter(judged) == Counter(wanted),
              "position": all(at.get(g.region) == (g.colour, g.shape) for g in named)}
        ok["all"] = ok["background"] and ok["objects"] and ok["position"]
        tally.update(k for k, v in ok.items() if v and k != "position")
        if named:
            n_position += 1
            tally["position"] += ok["position"]
    n = max(len(claims), 1)
    report = {k: tally[k] / n for k in ("background", "count", "colour", "shape", "objects")}
    report["position"] = tally["position"] / n_position if n_position else float("nan")
    report["all"] = tally["all"] / n
    report["n"], report["n_position"] = len(claims), n_position
    return report


def prompt_accuracy(judge: Judge, images, prompts: Sequence[Scene | Claims | str]) -> float:
    """Fraction of images that show exactly their prompt: see `prompt_report` ("all")."""
    return prompt_report(judge, images, prompts)["all"]


def cell_accuracy(judge: Judge, images, scenes: Sequence[Scene]) -> dict:
    """Per-label accuracy against ground-truth scenes: background, cell occupancy, shape and colour of occupied cells."""
    bg, shape, colour = judge.classify(images)
    t = [scene_targets(s) for s in scenes]
    t_bg, t_shape, t_colour = (torch.tensor([x[i] for x in t]) for i in range(3))
    occupied = t_shape > 0
    return {"background": (bg.argmax(-1) == t_bg).float().mean().item(),
            "occupancy": ((shape.argmax(-1) > 0) == occupied).float().mean().item(),
            "shape": (shape.argmax(-1) == t_shape)[occupied].float().mean().item(),
            "colour": (colour.argmax(-1) == t_colour)[occupied].float().mean().item()}


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) of two feature sets (N, D), in float64.

    The FID formula (Heusel et al., 2017); the matrix square roots come from symmetric eigh.
    """
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(cov_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root)


def train_and_evaluate(out: str | Path, steps: int = 1600, seed: int = 0, batch: int = 64, lr: float = 2e-3,
                       pool: int = 20000, heldout_n: int = 2000, command: str = "") -> dict:
    """Train a judge, read `heldout_n` fresh scenes (clean 64 px; 32-128 px at aspect 1:2..2:1), save
    `out`.safetensors and `out`.json (recording `command` and the held-out results); return those results."""
    if min(steps, batch, pool, heldout_n) < 1 or not lr > 0:
        raise SDXLError(f"steps, batch, pool and heldout must be at least 1 and lr positive, got {steps}, {batch}, "
                        f"{pool}, {heldout_n}, {lr}")
    start = time.time()
    judge = train_judge(steps, seed, batch, lr, pool)
    seconds = time.time() - start
    results = {}
    for name, vary in (("clean_64px", False), ("sizes_32_128px_aspect_1:2_2:1", True)):
        images, scenes = heldout(heldout_n, vary=vary)
        results[name] = {"labels": cell_accuracy(judge, images, scenes),
                         "prompts": prompt_report(judge, images, scenes)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    judge.save(out, {"train": {"command": command, "batch": batch, "lr": lr, "seconds": round(seconds),
                               "threads": torch.get_num_threads()},
                     "heldout": {"n": heldout_n, "seed": 12345, **results}})
    return results
