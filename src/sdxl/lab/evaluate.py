"""`sdxl eval`: the SDXL report's claims measured on a model of the synthetic world (`world.py`), read by the judge.

1. Prompt accuracy of the base alone and base + refiner (report §2.5) over step counts and samplers.
2. Crop conditioning (report §2.2, Fig. 5): share of images with an object cut by the border when the
   model is told crop (0, 0) or a large crop offset; a UNet trained with it against one trained without.
3. Size conditioning (report §2.2, Table 2 and Fig. 3): Fréchet distance to clean renders (judge
   features in place of Inception) and prompt accuracy of size-conditioned and unconditioned UNets
   (all data; small images dropped); sharpness as the conditioned `original_size` varies.
4. Multi-aspect training (report §2.3): accuracy and border cuts at square, landscape and portrait sizes.

Each experiment is a function returning plain rows (and writing an image grid). Prompt i of every
run is generated with seed + i, so a run repeats exactly; prompts are batched `Settings.batch` at a time.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from sdxl.errors import SDXLError
from sdxl.lab.judge import Judge, frechet_distance, prompt_report
from sdxl.models.model import SDXLModel
from sdxl.pipeline import Pipeline
from sdxl.request import Request
from sdxl.sampling.samplers import SAMPLERS
from sdxl.lab.world import Scene, border_cut, render, sample_scene

# UNet-only files in --variants, each paired with the base's text encoders and VAE
VARIANTS = {"crop": ("full", "no-crop"), "size": ("full", "no-size", "no-size-drop-small")}
GRID_COLUMNS = 8


@dataclass(frozen=True)
class Settings:
    """What the experiments share. `steps` and `samplers` span experiment 1; the others run at `other_steps`
    with the first sampler."""

    resolution: int = 128  # native, square
    n: int = 64  # prompts
    steps: tuple[int, ...] = (10, 20, 40)
    samplers: tuple[str, ...] = ("euler", "dpmpp_2m")
    native_steps: int = 20
    cfg: float = 5.0
    refiner_switch: float = 0.8
    seed: int = 0
    batch: int = 16  # prompts per sampling run
    quiet: bool = True

    def validate(self) -> None:
        unknown = [s for s in self.samplers if s not in SAMPLERS]
        if unknown or not self.samplers:
            raise SDXLError(f"unknown sampler {', '.join(unknown) or '(none)'}; choose from: {', '.join(SAMPLERS)}")
        if self.n < 1 or self.batch < 1 or not self.steps or min(self.steps) < 1:
            raise SDXLError(f"--n, --batch and every --steps value must be at least 1, got {self.n}, {self.batch}, "
                            f"{','.join(map(str, self.steps)) or '(none)'}")
        if self.resolution < 32 or self.resolution % 32:
            raise SDXLError(f"--resolution must be a positive multiple of 32, got {self.resolution}")

    @property
    def other_steps(self) -> int:
        """Steps of experiments 2-4: the native count, at most the largest of `steps`."""
        return min(self.native_steps, max(self.steps))

    def request(self, **fields) -> Request:
        r = self.resolution
        base = Request("", width=r, height=r, steps=self.other_steps, sampler=self.samplers[0], cfg=self.cfg)
        return replace(base, **fields)


def eval_scenes(n: int, seed: int = 0) -> list[Scene]:
    """The held-out prompts: scenes from their own seed stream (`eval-{seed}`), captions as prompts."""
    rng = random.Random(f"eval-{seed}")
    return [sample_scene(rng) for _ in range(n)]


def with_unet(base: SDXLModel, unet) -> SDXLModel:
    """A model with another UNet (an `UNet` or a UNet-only `SDXLModel`) and the base's text encoders and VAE
    (the same modules, not copies)."""
    unet = unet.unet if isinstance(unet, SDXLModel) else unet
    c = base.cfg.conditioner
    if (unet.cfg.context_dim, unet.cfg.adm_in_channels) != (c.context_dim, c.vector_dim):
        raise SDXLError(f"the UNet takes context_dim {unet.cfg.context_dim} and adm_in_channels "
                        f"{unet.cfg.adm_in_channels} but the base's text encoders give {c.context_dim} and "
                        f"{c.vector_dim}: it belongs to another model")
    return SDXLModel.from_parts(unet=unet, conditioner=base.conditioner, vae=base.vae)


def variant_pipeline(pipe: Pipeline, path: str | Path) -> Pipeline:
    """A UNet-only file (`model.diffusion_model.*`, any float dtype) on the base of `pipe`, no refiner."""
    from sdxl.formats.checkpoint import load

    unet = load(path, pipe.device, pipe.dtype, components=("unet",))
    return Pipeline(with_unet(pipe.base, unet), None, pipe.device, pipe.dtype, vae_dtype=pipe.vae_dtype,
                    tokenizer=pipe.tokenizer)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is not a folder, and an earlier run's results unless asked to replace them."""
    if Path(out).exists() and not Path(out).is_dir():
        raise SDXLError(f"--out {out} is a file; name a folder for the results and image grids")
    if (Path(out) / "results.json").exists() and not overwrite:
        raise SDXLError(f"{Path(out) / 'results.json'} exists; choose another --out or pass --overwrite")


def missing_variants(folder: Path | None, names) -> list[str]:
    return [f"{n}.safetensors" for n in names if folder is None or not (Path(folder) / f"{n}.safetensors").is_file()]


# --- generation and measures ------------------------------------------------------------------

def generate(pipe: Pipeline, prompts: list[str], req: Request, s: Settings, desc: str = "") -> list[Image.Image]:
    """One image per prompt, prompt i with seed `s.seed + i`, `s.batch` prompts per sampling run (one prompt per
    batch row; a batch of B with seed s draws the noise of B single images with seeds s..s+B-1)."""
    runs = [replace(req, prompt=tuple(prompts[i:i + s.batch]), seed=s.seed + i, batch=len(prompts[i:i + s.batch]))
            for i in range(0, len(prompts), s.batch)]
    images = []
    total = sum(pipe.plan(r).total_steps for r in runs)  # the progress a run reports is its plan's
    with tqdm(total=total, desc=desc, unit="step", disable=s.quiet, leave=False, file=sys.stderr) as bar:
        for r in runs:
            images += pipe.generate(r, callback=lambda _info: bar.update(1)).images
    return images


def sharpness(image: Image.Image) -> float:
    """Variance of the Laplacian [[0,1,0],[1,-4,1],[0,1,0]] of the 0-255 grayscale image (Pech-Pacheco et al. 2000)."""
    g = np.asarray(image.convert("L"), dtype=np.float64)
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4 * g[1:-1, 1:-1]  # (H-2, W-2)
    return float(lap.var()) if lap.size else 0.0


def cut_share(images: list[Image.Image]) -> float:
    """Fraction of images with an object cut by the border (`world.border_cut`)."""
    return sum(map(border_cut, images)) / len(images)


def accuracy(judge: Judge, images, scenes) -> dict:
    """The judge's prompt report: "all" as accuracy, plus objects, position (None: no prompt names one), background."""
    r = prompt_report(judge, images, scenes)
    pos = None if math.isnan(r["position"]) else r["position"]
    return {"accuracy": r["all"], "objects": r["objects"], "position": pos, "background": r["background"]}


def aspect_sizes(r: int) -> list[tuple[int, int]]:
    """(width, height) of about r*r pixels: square, 5:3 landscape, 3:5 portrait, sides multiples of 32."""
    side = lambda x: max(32, round(x / 32) * 32)  # noqa: E731
    w, h = side(r * math.sqrt(5 / 3)), side(r * math.sqrt(3 / 5))
    return [(r, r), (w, h), (h, w)]


def image_grid(rows: list[tuple[str, list[Image.Image]]], label_width: int = 150, pad: int = 4) -> Image.Image:
    """Rows of images (any sizes, each centred in a cell of the largest size) with a label left of each row."""
    cw = max(im.width for _, ims in rows for im in ims) + pad
    ch = max(im.height for _, ims in rows for im in ims) + pad
    label_width = label_width if any(label for label, _ in rows) else 0
    sheet = Image.new("RGB", (label_width + cw * max(len(ims) for _, ims in rows), ch * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, ims) in enumerate(rows):
        draw.text((4, r * ch + ch // 2 - 6), label, fill="black")
        for c, im in enumerate(ims):
            sheet.paste(im, (label_width + c * cw + (cw - im.width) // 2, r * ch + (ch - im.height) // 2))
    return sheet


def _save_grid(out: Path | None, name: str, rows) -> None:
    if out is not None and rows:
        Path(out).mkdir(parents=True, exist_ok=True)
        image_grid([(label, ims[:GRID_COLUMNS]) for label, ims in rows]).save(Path(out) / name)


# --- the experiments ----------------------------------------------------------------------------

def prompt_experiment(pipe: Pipeline, judge: Judge, scenes: list[Scene], s: Settings, out: Path | None = None) -> dict:
    """Experiment 1: prompt accuracy of the base and base + refiner (report §2.5) per sampler and step count."""
    prompts = [sc.caption for sc in scenes]
    models = [("base", None)] + ([("base+refiner", s.refiner_switch)] if pipe.refiner is not None else [])
    rows, grid = [], []
    for name, switch in models:
        for sampler in s.samplers:
            for steps in s.steps:
                start = time.perf_counter()
                req = s.request(steps=steps, sampler=sampler, refiner_switch=switch)
                images = generate(pipe, prompts, req, s, f"{name} {sampler} {steps} steps")
                seconds = round(time.perf_counter() - start, 2)
                rows.append({"model": name, "sampler": sampler, "steps": steps, **accuracy(judge, images, scenes),
                             "seconds": seconds})
                if sampler == s.samplers[0] and steps == max(s.steps):
                    grid.append((name, images))
    _save_grid(out, "grid_prompts.png", grid)
    return {"rows": rows}


def crop_experiment(variants: Mapping[str, Pipeline], judge: Judge, scenes: list[Scene], s: Settings,
                    out: Path | None = None) -> dict:
    """Experiment 2 (report §2.2, Fig. 5): border cuts when told crop (0, 0) or a large offset (r/4: 32 px at 128,
    the largest the default's training crops reach)."""
    prompts, d = [sc.caption for sc in scenes], s.resolution // 4
    rows, grid = [], []
    for name in VARIANTS["crop"]:
        for crop in ((0, 0), (0, d), (d, 0), (d, d)):
            images = generate(variants[name], prompts, s.request(crop=crop), s, f"{name} crop {crop}")
            rows.append({"variant": name, "crop": f"{crop[0]},{crop[1]}", "border_cut": cut_share(images),
                         "accuracy": accuracy(judge, images, scenes)["accuracy"]})
            grid.append((f"{name} crop {crop[0]},{crop[1]}", images))
    _save_grid(out, "grid_crop.png", grid)
    return {"rows": rows}


def size_experiment(variants: Mapping[str, Pipeline], judge: Judge, scenes: list[Scene], s: Settings,
                    out: Path | None = None) -> dict:
    """Experiment 3 (report §2.2, Table 2, Fig. 3): FD to clean renders and accuracy of size-conditioned vs
    unconditioned UNets; sharpness of "full" as `original_size` goes r/4..2r (32..256 px at 128, the span of the
    default's training data)."""
    prompts, r = [sc.caption for sc in scenes], s.resolution
    clean = judge.features([render(sc, r, r) for sc in scenes])
    rows, sharp, grid = [], [], []
    for name in VARIANTS["size"]:
        images = generate(variants[name], prompts, s.request(), s, name)
        # biased upward at small n (~D/n, see Judge.features): compare variants at the same n
        fd = frechet_distance(judge.features(images), clean) if len(scenes) > 1 else None
        rows.append({"variant": name, "fd": fd, "accuracy": accuracy(judge, images, scenes)["accuracy"]})
        sizes = (r // 4, r // 2, r, 2 * r) if name == "full" else (None,)
        for size in sizes:
            ims = images if size in (None, r) else generate(
                variants[name], prompts, s.request(original_size=(size, size)), s, f"{name} original {size}")
            sharp.append({"variant": name, "original_size": size or "default",
                          "sharpness": float(np.mean([sharpness(im) for im in ims]))})
            grid.append((f"{name} original {size}" if size else name, ims))
    _save_grid(out, "grid_size.png", grid)
    return {"rows": rows, "sharpness": sharp}


def aspect_experiment(pipe: Pipeline, judge: Judge, scenes: list[Scene], s: Settings, out: Path | None = None) -> dict:
    """Experiment 4 (report §2.3): the base (+ refiner) at square, landscape and portrait sizes of the native area."""
    prompts = [sc.caption for sc in scenes]
    switch = s.refiner_switch if pipe.refiner is not None else None
    name = "base+refiner" if switch is not None else "base"
    rows, grid = [], []
    for w, h in aspect_sizes(s.resolution):
        images = generate(pipe, prompts, s.request(width=w, height=h, refiner_switch=switch), s, f"{w}x{h}")
        rows.append({"model": name, "size": f"{w}x{h}", **accuracy(judge, images, scenes),
                     "border_cut": cut_share(images)})
        grid.append((f"{w}x{h}", images))
    _save_grid(out, "grid_aspect.png", grid)
    return {"rows": rows}


# --- the whole run ------------------------------------------------------------------------------

TITLES = {1: "1. Prompt accuracy", 2: "2. Crop conditioning (border-cut share)",
          3: "3. Size conditioning", 4: "4. Multi-aspect"}
KEYS = {1: "prompt_accuracy", 2: "crop", 3: "size", 4: "aspect"}


def markdown(rows: list[dict]) -> str:
    """Rows of equal keys -> a markdown table; floats to 3 decimals, None as "-"."""
    cell = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row.values()) + " |" for row in rows])


def run(pipe: Pipeline, s: Settings, experiments=(1, 2, 3, 4), variants_dir: Path | None = None,
        out: Path | None = None, models: dict | None = None, judge: Judge | None = None) -> tuple[dict, str]:
    """Run the chosen experiments; returns (results, markdown). Writes results.json and the grids to `out`."""
    s.validate()
    judge = judge or Judge.load(device=pipe.device)
    scenes = eval_scenes(s.n, s.seed)
    settings = {k: v for k, v in asdict(s).items() if k != "quiet"} | {"other_steps": s.other_steps}
    results = {"settings": settings, "models": models or {}, "variants": str(variants_dir) if variants_dir else None,
               "prompts": [sc.caption for sc in scenes]}
    text = [f"# sdxl eval: n={s.n}, {s.resolution}x{s.resolution}, cfg {s.cfg}, seed {s.seed}"]
    for k in sorted(experiments):
        print(f"eval: {TITLES[k]}", file=sys.stderr)
        if k in (1, 4):
            result = (prompt_experiment if k == 1 else aspect_experiment)(pipe, judge, scenes, s, out)
        else:
            names = VARIANTS["crop" if k == 2 else "size"]
            missing = missing_variants(variants_dir, names)
            if missing:
                where = variants_dir or "bench/variants (no --variants given)"
                result = {"skipped": f"missing {', '.join(missing)} in {where}"}
            else:
                loaded = {n: variant_pipeline(pipe, Path(variants_dir) / f"{n}.safetensors") for n in names}
                result = (crop_experiment if k == 2 else size_experiment)(loaded, judge, scenes, s, out)
        results[KEYS[k]] = result
        text.append(f"\n## {TITLES[k]}\n")
        text.append(f"skipped: {result['skipped']}" if "skipped" in result else markdown(result["rows"]))
        if "sharpness" in result:
            text.append("\nSharpness (variance of the Laplacian) by conditioned original size:\n\n"
                        + markdown(result["sharpness"]))
        if out is not None:  # after each experiment, so a long run keeps what it measured
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results, "\n".join(text)
