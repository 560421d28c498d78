"""The judge: a small CNN that reads a synthetic-world image (`world.py`) back into its attributes.

It measures whether generated images follow their prompts (`prompt_accuracy`, `prompt_report`)
and gives features for a Fréchet distance (`features`, `frechet_distance`; an FID with this
judge in place of Inception). It sees a 64x64 RGB image (other sizes and aspect ratios are
resized to it) and predicts the background colour and, for each cell of the 3x3 grid, the
shape there (or none) and its colour. Counts and "colour+shape present" follow from the cells.

Architecture: a 4x4 patchify stem, three 3x3 convs to an 8x8 map, average-pooled to the 3x3
grid, one hidden layer (the penultimate features), linear heads. No normalisation layers, so
a single image is judged the same alone or in a batch. Trained on freshly rendered scenes
(every step new) at 32-128 px and aspect 3:4..4:3, with noise, blur, colour and low-resolution
augmentations so that imperfect generated images are still read.

The shipped judge (`assets/judge.safetensors` + `assets/judge.json`) was trained with

    /work/venv/bin/python -m sdxl.judge --steps 2500 --seed 0 --out src/sdxl/assets/judge

(about 4 minutes on 2 CPU cores); `judge.json` records its held-out accuracy.
"""

from __future__ import annotations

import argparse
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
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .world import COLOURS, REGIONS, SHAPES, Claims, Scene, parse_caption, render, sample_scene

ASSETS = Path(__file__).parent / "assets"
COLOUR_NAMES = tuple(COLOURS)
SHAPE_CLASSES = ("none",) + SHAPES  # per-cell shape head: class 0 is an empty cell


@dataclass(frozen=True)
class JudgeConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (48, 64, 96, 96)  # stem (stride 4), conv, conv (stride 2), conv
    hidden: int = 192  # penultimate feature width
    colours: tuple[str, ...] = COLOUR_NAMES
    shapes: tuple[str, ...] = SHAPE_CLASSES
    regions: tuple[str, ...] = REGIONS


class Judge(nn.Module):
    def __init__(self, config: JudgeConfig = JudgeConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2, c3 = config.channels
        self.stem = nn.Conv2d(3, c0, 4, stride=4)
        self.conv1 = nn.Conv2d(c0, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.hidden = nn.Linear(c3 * 9, config.hidden)
        self.background = nn.Linear(config.hidden, len(config.colours))
        self.shape = nn.Linear(config.hidden, 9 * len(config.shapes))
        self.colour = nn.Linear(config.hidden, 9 * len(config.colours))

    def features(self, images) -> Tensor:
        """Penultimate features (N, hidden) of images (PIL list or (N, 3, H, W) in [0, 1])."""
        x = self.prepare(images)
        x = F.relu(self.stem(x * 2 - 1))  # (N, c0, 16, 16)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))  # (N, c2, 8, 8)
        x = F.relu(self.conv3(x))
        x = F.adaptive_avg_pool2d(x, 3).flatten(1)  # (N, c3 * 9), one pooled vector per grid cell
        return F.relu(self.hidden(x))

    def forward(self, images) -> tuple[Tensor, Tensor, Tensor]:
        """Logits: background (N, colours), shape (N, 9, shapes incl. none), colour (N, 9, colours)."""
        h = self.features(images)
        n = h.shape[0]
        return self.background(h), self.shape(h).view(n, 9, -1), self.colour(h).view(n, 9, -1)

    def prepare(self, images) -> Tensor:
        """(N, 3, S, S) float in [0, 1] at the judge's size S, from PIL images or an image tensor."""
        s = self.config.image_size
        if isinstance(images, Tensor):
            x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
            return _resize(x, s).to(self.stem.weight.device)
        return torch.cat([_resize(pil_to_tensor(im)[None], s) for im in images]).to(self.stem.weight.device)

    @torch.no_grad()
    def predict(self, images) -> list[dict]:
        """Per image: {"background", "objects": [{"region", "shape", "colour"}], "count"}."""
        bg, shape, colour = self(images)
        out = []
        for b, s, c in zip(bg.argmax(-1).tolist(), shape.argmax(-1).tolist(), colour.argmax(-1).tolist()):
            objects = [{"region": self.config.regions[k], "shape": self.config.shapes[s[k]],
                        "colour": self.config.colours[c[k]]} for k in range(9) if s[k] != 0]
            out.append({"background": self.config.colours[b], "objects": objects, "count": len(objects)})
        return out

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        """`path` (.safetensors) plus its config beside it (.json); `extra` is stored in the JSON (training facts)."""
        path = Path(path).with_suffix(".safetensors")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path))
        meta = {"config": asdict(self.config), **(extra or {})}
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path = ASSETS / "judge.safetensors", device: str | torch.device = "cpu") -> "Judge":
        """A saved judge; its class names must be this world's (else the judge reads another world)."""
        path = Path(path).with_suffix(".safetensors")
        meta = json.loads(path.with_suffix(".json").read_text())
        config = JudgeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        if (config.colours, config.shapes, config.regions) != (COLOUR_NAMES, SHAPE_CLASSES, REGIONS):
            raise ValueError(f"{path}: judge classes differ from world.py's colours/shapes/regions; retrain it")
        judge = cls(config)
        judge.load_state_dict(load_file(str(path)), strict=True)
        return judge.to(device).eval()


def pil_to_tensor(image: Image.Image) -> Tensor:
    """(3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def scene_targets(scene: Scene) -> tuple[int, list[int], list[int]]:
    """Labels: background index, per-cell shape index (0 = empty), per-cell colour index (ignored if empty)."""
    shape, colour = [0] * 9, [0] * 9
    for o in scene.objects:
        k = REGIONS.index(o.region)
        shape[k], colour[k] = SHAPE_CLASSES.index(o.shape), COLOUR_NAMES.index(o.colour)
    return COLOUR_NAMES.index(scene.background), shape, colour


def training_batch(rng: random.Random, n: int, size: int = 64, augment: bool = True) -> tuple[Tensor, ...]:
    """Fresh scenes rendered at 32-128 px, aspect 3:4..4:3, resized to `size`; augmented like generated images."""
    images, bgs, shapes, colours = [], [], [], []
    for _ in range(n):
        scene = sample_scene(rng)
        if augment:
            short = rng.choice((32, 48, 64, 64, 64, 96, 128))
            long = round(short * rng.uniform(1.0, 4 / 3))
            w, h = (short, long) if rng.random() < 0.5 else (long, short)
        else:
            w = h = size
        images.append(_resize(pil_to_tensor(render(scene, w, h, supersample=2 if min(w, h) >= 96 else 4))[None], size))
        b, s, c = scene_targets(scene)
        bgs.append(b), shapes.append(s), colours.append(c)
    x = torch.cat(images)
    if augment:
        x = _augment(x, rng)
    return x, torch.tensor(bgs), torch.tensor(shapes), torch.tensor(colours)


def _augment(x: Tensor, rng: random.Random) -> Tensor:
    """Imperfections of generated images: colour cast, blur, low resolution, noise (each per image)."""
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    n, _, s, _ = x.shape
    gain = 1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    offset = 0.04 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    x = x * gain + offset
    blur = torch.tensor([1.0, 2.0, 1.0])
    kernel = (blur[:, None] * blur[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.3, blurred, x)
    low = _resize(_resize(x, s // 2), s)
    x = torch.where(torch.rand(n, 1, 1, 1, generator=g) < 0.15, low, x)
    sigma = 0.06 * torch.rand(n, 1, 1, 1, generator=g)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


def judge_loss(judge: Judge, x: Tensor, bg: Tensor, shape: Tensor, colour: Tensor) -> Tensor:
    """Cross-entropy of background + per-cell shape (incl. empty) + per-cell colour of occupied cells."""
    bg_logits, shape_logits, colour_logits = judge(x)
    occupied = shape > 0
    return (F.cross_entropy(bg_logits, bg) + F.cross_entropy(shape_logits.flatten(0, 1), shape.flatten())
            + F.cross_entropy(colour_logits[occupied], colour[occupied]))


def train_judge(steps: int = 2500, seed: int = 0, batch: int = 96, lr: float = 2e-3,
                config: JudgeConfig = JudgeConfig(), log_every: int = 250) -> Judge:
    """Train on scenes sampled fresh at every step (AdamW, cosine learning rate); deterministic for a seed."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    judge = Judge(config)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    judge.train()
    start = time.time()
    for step in range(1, steps + 1):
        loss = judge_loss(judge, *training_batch(rng, batch, config.image_size))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return judge.eval()


def heldout(n: int, seed: int = 12345, size: int = 64) -> tuple[list[Image.Image], list[Scene]]:
    """Fresh scenes (a seed stream training does not use) rendered clean at size x size."""
    rng = random.Random(f"heldout-{seed}")
    scenes = [sample_scene(rng) for _ in range(n)]
    return [render(s, size, size) for s in scenes], scenes


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
    bg, shape, colour = judge(images)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sdxl.judge", description="Train the world judge, evaluate, save.")
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--heldout", type=int, default=2000, help="fresh scenes to evaluate on")
    p.add_argument("--out", default=str(ASSETS / "judge"), help="path without suffix: writes .safetensors and .json")
    args = p.parse_args(argv)
    start = time.time()
    judge = train_judge(args.steps, args.seed, args.batch, args.lr)
    seconds = time.time() - start
    images, scenes = heldout(args.heldout)
    with torch.no_grad():
        cells = cell_accuracy(judge, images, scenes)
        report = prompt_report(judge, images, scenes)
    print("held-out labels:", json.dumps({k: round(v, 4) for k, v in cells.items()}))
    print("held-out prompts:", json.dumps({k: round(v, 4) for k, v in report.items()}))
    judge.save(args.out, {"train": {"steps": args.steps, "seed": args.seed, "batch": args.batch, "lr": args.lr,
                                    "seconds": round(seconds), "command": f"python -m sdxl.judge --steps {args.steps} "
                                                                          f"--seed {args.seed} --out {args.out}"},
                          "heldout": {"n": args.heldout, "labels": cells, "prompts": report}})
    print(f"saved {Path(args.out).with_suffix('.safetensors')} ({seconds:.0f}s training)")


if __name__ == "__main__":
    main()
