"""The recipe of the embedded default model: world data, VAE, base, refiner, and the eval variants.

    sdxl recipe --out runs/default  # data, vae, init, vae-decoder, base, refiner, export
                                    # (to runs/default/assets; copy to src/sdxl/assets to ship)
    sdxl recipe --out runs/default --stages variants,export-variants
    sdxl recipe --out runs/default --jobs 6 --workers 2  # independent trainings at once (a GPU)

Everything is a small SDXL-family model that `sdxl.formats.checkpoint` reads from shapes alone:
- text encoders: CLIP-L-style and bigG-style, width 64, two layers, frozen at their random
  initialisation (seed 0). The world's captions use ~30 words of a closed grammar; a random causal
  transformer already maps each caption to distinct token features, and the UNet's cross-attention
  learns to read them. Training CLIP would need contrastive pairs and time, and buys nothing the
  judge can see. Their 49408-row token tables are most of the shipped bytes (2 x 6.3 MB in fp16).
- VAE: f = 8, 4 latent channels (`sdxl.train.vae`), trained on the same images: 64 px crops, then the
  decoder alone on whole 128^2 buckets.
- base: a 3-level UNet (64, 64, 128 channels, attention on the two lower levels) conditioned like
  SDXL's: both encoders, pooled bigG, original size, crop and target size (report §2.2); 6000 steps at lr 1e-3
  with min-SNR-5 loss weighting (Hang et al. 2023), chosen by scripts/base_sweep.py: at equal steps it doubled
  the judge's background accuracy over the earlier lr 3e-4 without weighting (bench/RESULTS.md).
- refiner: a 2-level UNet on bigG + original size, crop, aesthetic score, trained on the first
  200 of 1000 noise levels (report §2.5); shipped UNet-only and run with the base's bigG.
- variants (for `sdxl eval`): a smaller UNet trained four ways: all micro-conditioning ("full"),
  no size conditioning ("no-size"), no size conditioning with images under 128 px dropped
  ("no-size-drop-small"), no crop conditioning ("no-crop"), otherwise identical.

Data: `world.make_dataset` scenes rendered at original sizes from 32 to 256 px on the shorter side and
aspect ratios 1:2 to 2:1; the trainer resizes them to 128^2-pixel buckets (128x128, 160x96, 96x160)
and crops at random, so small originals arrive blurred and off-bucket aspects arrive cropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sdxl.formats import checkpoint as checkpoint_io
from sdxl.formats.files import write_tensors
from sdxl.models.conditioning import BASE_MICRO, REFINER_MICRO, ConditionerConfig
from sdxl.errors import SDXLError
from sdxl.models.model import ModelConfig, SDXLModel
from sdxl.models.text_encoders import TextEncoderConfig
from sdxl.models.unet import UNetConfig

RESOLUTION = 128
CLIP_L_SMALL = TextEncoderConfig(width=64, layers=2, act="quick_gelu")
BIGG_SMALL = TextEncoderConfig(width=64, layers=2, act="gelu", proj_dim=64)
BASE_UNET = UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, transformer_depth=(0, 1, 1),
                       transformer_depth_middle=1, context_dim=128, adm_in_channels=64 + 6 * 256)
REFINER_UNET = UNetConfig(model_channels=64, channel_mult=(1, 1), num_res_blocks=1, transformer_depth=(0, 1),
                          transformer_depth_middle=1, context_dim=64, adm_in_channels=64 + 5 * 256)
VARIANT_UNET = UNetConfig(model_channels=64, channel_mult=(1, 1), num_res_blocks=1, transformer_depth=(0, 1),
                          transformer_depth_middle=1, context_dim=128, adm_in_channels=64 + 6 * 256)

# original (width, height): shorter side 32-256 px times aspect ratios 1:2 .. 2:1, a third of them square;
# 5:4 goes to the square bucket and 2:1 to 160x96, both cropped by up to 32 px (report §2.2's crops)
SHORT_SIDES = (32, 48, 64, 96, 128, 192, 256)
ASPECTS = ((1, 1), (1, 1), (1, 1), (5, 4), (4, 5), (5, 3), (3, 5), (2, 1), (1, 2))
DATA_SIZES = tuple((s * a // min(a, b), s * b // min(a, b)) for s in SHORT_SIDES for a, b in ASPECTS)
IMAGES = 20000

TRAIN = dict(resolution=RESOLUTION, bucket_step=32, max_aspect=2.0, caption_dropout=0.1, offset_noise=0.05,
             batch_size=32, lr=1e-3, min_snr_gamma=5.0, lr_schedule="cosine", warmup_steps=200, ema_decay=0.999,
             max_grad_norm=1.0, checkpoint_every=1000, keep_checkpoints=1, save_dtype="fp16", seed=0)
# the refiner sees only sigma 0.03-0.57 (t < 200), where min-SNR-5 would weight t = 0 by 0.004: plain loss, lr 3e-4
REFINER_TRAIN = dict(lr=3e-4, min_snr_gamma=0.0, timestep_range=(0, 200))
# what fits the 2 hours on this 2-core CPU (measured: bench/RESULTS.md, 106 min in all): 32 min data + VAE +
# decoder, ~8 min caches, base 0.56 s/step, refiner 0.40 s/step
STEPS = {"vae": 1500, "vae-decoder": 600, "base": 6000, "refiner": 1500, "variant": 3000}
VARIANTS = {"full": {}, "no-size": {"size_conditioning": False},
            "no-size-drop-small": {"size_conditioning": False, "min_original_size": RESOLUTION},
            "no-crop": {"crop_conditioning": False}}
STAGES = ("data", "vae", "init", "vae-decoder", "base", "refiner", "variants", "export", "export-variants")
DEFAULT_STAGES = ("data", "vae", "init", "vae-decoder", "base", "refiner", "export")


def scaled(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def make_data(out: Path, scale: float, jobs: int) -> Path:
    from sdxl.lab.world import make_dataset

    folder = out / "data"
    if not (folder / "done").is_file():
        make_dataset(folder, scaled(IMAGES, scale), seed=2026, sizes=DATA_SIZES, workers=jobs)
        (folder / "metadata.jsonl").unlink()  # the trainer reads the folder form (PNG + .txt)
        (folder / "done").write_text("")
    return folder


def make_vae(out: Path, scale: float, workers: int, overrides: dict | None = None) -> Path:
    """The VAE on 64 px crops; `overrides` (VAETrainConfig fields) are for tests."""
    from sdxl.train.vae import VAETrainConfig, train_vae

    path = out / "vae.safetensors"
    if not path.is_file():
        values = dict(dataset=str(out / "data"), steps=scaled(STEPS["vae"], scale), num_workers=workers,
                      resolution=RESOLUTION)
        train_vae(VAETrainConfig(**values | (overrides or {})), path)
    return path


def make_vae_decoder(out: Path, scale: float, workers: int, overrides: dict | None = None) -> Path:
    """The decoder again, on whole 128^2 buckets: the first VAE saw 64 px crops, and its decoder (mid-block
    attention included) does not carry over to 16x16 latents. The encoder, hence every UNet's latent space, stays
    (as Stability's ft-MSE VAE decoders did for SD 1.x)."""
    from sdxl.train.vae import VAETrainConfig, train_vae

    path = out / "vae_decoder.safetensors"
    if not path.is_file():
        values = dict(dataset=str(out / "data"), init=str(out / "vae.safetensors"), decoder_only=True, crop=0,
                      batch_size=8, steps=scaled(STEPS["vae-decoder"], scale), lr=3e-4, warmup_steps=20,
                      num_workers=workers, resolution=RESOLUTION)
        train_vae(VAETrainConfig(**values | (overrides or {})), path)
    return path


def make_init(out: Path) -> None:
    """Random UNets around the trained VAE and one set of frozen random text encoders: the base's, drawn after its
    UNet from seed 0; the variants and the refiner (its bigG) get copies, so every UNet reads the same features."""
    vae = checkpoint_io.load_vae(out / "vae.safetensors")
    base_cond = ConditionerConfig(CLIP_L_SMALL, BIGG_SMALL, BASE_MICRO)
    torch.manual_seed(0)
    base = SDXLModel(ModelConfig(BASE_UNET, base_cond, vae.cfg))
    for name, unet, seed in (("base", BASE_UNET, 0), ("variant", VARIANT_UNET, 2), ("refiner", REFINER_UNET, 1)):
        path = out / f"init_{name}.safetensors"
        if path.is_file():
            continue
        torch.manual_seed(seed)
        cond = ConditionerConfig(None, BIGG_SMALL, REFINER_MICRO) if name == "refiner" else base_cond
        model = base if name == "base" else SDXLModel(ModelConfig(unet, cond, vae.cfg))
        if name == "refiner":
            model.conditioner.bigg.load_state_dict(base.conditioner.bigg.state_dict())
        elif name == "variant":
            model.conditioner.load_state_dict(base.conditioner.state_dict())
        model.vae.load_state_dict(vae.state_dict())
        checkpoint_io.save_single_file(model, path)


def train_config(stage: str, out: Path, scale: float, workers: int, variant: str = "", cache: bool = False):
    from sdxl.train import config

    values = {**TRAIN, "dataset": str(out / "data"), "num_workers": workers}
    if cache:  # one crop per image, VAE and text encoders run once: what makes the CPU budget. One folder for all:
        values["cache_dir"] = str(out / "cache")  # one VAE encoder: one set of latents; text per set of encoders
    if stage == "base":
        values |= {"model": str(out / "init_base.safetensors"), "steps": scaled(STEPS["base"], scale)}
    elif stage == "refiner":
        values |= {"model": str(out / "init_refiner.safetensors"), "steps": scaled(STEPS["refiner"], scale),
                   **REFINER_TRAIN}
    else:
        values |= {"model": str(out / "init_variant.safetensors"), "steps": scaled(STEPS["variant"], scale),
                   **VARIANTS[variant]}
    values["warmup_steps"] = min(values["warmup_steps"], values["steps"] // 10)
    return config.build(values)


class Deadline(Exception):
    pass


def now() -> float:
    return time.time()


def run_training(stage: str, out: Path, scale: float, workers: int, variant: str = "", cache: bool = False,
                 deadline: float = math.inf, overrides: dict | None = None, folder: Path | None = None) -> Path:
    """Train one model (resuming an interrupted run); past `deadline` (epoch seconds) stop and take the
    latest checkpoint's EMA weights instead (`partial.safetensors`), so a time-boxed run still ends with a model.
    `overrides` (TrainConfig fields) and `folder` are for experiments on the recipe (scripts/base_sweep.py)."""
    from sdxl.train import checkpointing
    from sdxl.train.loop import train

    folder = folder or out / (stage if stage != "variants" else f"variant-{variant}")
    if (folder / "final.safetensors").is_file():
        return folder / "final.safetensors"
    cfg = dataclasses.replace(train_config(stage, out, scale, workers, variant, cache), **(overrides or {}))
    if deadline < math.inf:
        cfg = dataclasses.replace(cfg, checkpoint_every=min(cfg.checkpoint_every, 250))

    def on_step(state):
        if now() > deadline:
            raise Deadline

    try:
        return train(cfg, folder, resume=checkpointing.latest(folder) is not None, quiet=True, on_step=on_step)
    except Deadline:
        latest = checkpointing.latest(folder)
        if latest is None:
            raise SDXLError(f"{folder}: the deadline came before the first checkpoint") from None
        ckpt = checkpointing.load(latest, 0)
        model = checkpoint_io.load(cfg.model, dtype=torch.float32)
        model.load_state_dict(ckpt["ema"] or ckpt["trained"], strict=False)
        meta = {"sdxl.train.config": json.dumps(cfg.to_dict()), "sdxl.lab.recipe.partial_step": str(ckpt["state"]["step"])}
        return checkpoint_io.save_single_file(model, folder / "partial.safetensors", dtype=torch.float16,
                                              metadata=meta, overwrite=True)


def trained_file(out: Path, stage: str) -> Path:
    folder = out / stage
    return folder / "final.safetensors" if (folder / "final.safetensors").is_file() else folder / "partial.safetensors"


def unet_only(src: Path, dst: Path, metadata: dict) -> None:
    """The UNet of a single file (`model.diffusion_model.*`), fp16; replaces `dst` (the exported asset)."""
    f = checkpoint_io.SafetensorsFile(src)
    state = {k: f[k].to(torch.float16) for k in f.shapes() if k.startswith("model.diffusion_model.")}
    write_tensors(dst, state, metadata, mode="replace")


def record(out: Path, stage: str) -> dict:
    log = [json.loads(x) for x in (out / stage / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "event" not in r]
    rec = {"steps": steps[-1]["step"], "seconds": steps[-1]["seconds"], "final_loss": steps[-1]["loss"]}
    if not (out / stage / "final.safetensors").is_file():  # stopped at the deadline: weights of its last checkpoint
        from sdxl.train import checkpointing

        rec["stopped_at_deadline"], rec["weights_of_step"] = True, int(checkpointing.latest(out / stage).name[5:])
    return rec


def export(out: Path, dest: Path, command: str) -> None:
    """default_base.safetensors (full, fp16), default_refiner.safetensors (UNet only, fp16), default_model.json."""
    dest.mkdir(parents=True, exist_ok=True)
    meta = {"sdxl.lab.recipe": command}
    model = checkpoint_io.load(trained_file(out, "base"), dtype=torch.float32)
    if (out / "vae_decoder.safetensors").is_file():  # same encoder, better decoder
        model.vae.load_state_dict(checkpoint_io.load_vae(out / "vae_decoder.safetensors").state_dict())
    checkpoint_io.save_single_file(model, dest / "default_base.safetensors", dtype=torch.float16, metadata=meta,
                                   overwrite=True)
    unet_only(trained_file(out, "refiner"), dest / "default_refiner.safetensors", meta)
    vae = json.loads((out / "vae.json").read_text())
    decoder = json.loads((out / "vae_decoder.json").read_text()) if (out / "vae_decoder.json").is_file() else None
    info = {"resolution": RESOLUTION, "steps": 20, "cfg": 5.0, "sampler": "euler", "refiner_switch": 0.8,
            "recipe": command, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "vae": {k: vae[k] for k in ("steps", "seconds", "psnr_db")},
            "vae_decoder": decoder and {k: decoder[k] for k in ("steps", "seconds", "psnr_db")},
            "base": record(out, "base"), "refiner": record(out, "refiner")}
    (dest / "default_model.json").write_text(json.dumps(info, indent=1) + "\n")


def export_variants(out: Path, dest: Path, command: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    info = {}
    for name in VARIANTS:
        unet_only(trained_file(out, f"variant-{name}"), dest / f"{name}.safetensors",
                  {"sdxl.lab.recipe": command, "sdxl.variant": json.dumps(VARIANTS[name])})
        info[name] = {**VARIANTS[name], **record(out, f"variant-{name}")}
    (dest / "variants.json").write_text(json.dumps(info, indent=1) + "\n")


@dataclasses.dataclass(frozen=True)
class RecipeRun:
    """One run of the recipe (`sdxl recipe`): which stages, where, and how big."""

    out: Path
    stages: tuple[str, ...] = DEFAULT_STAGES
    scale: float = 1.0  # every step and image count multiplied (tests: 0.001)
    jobs: int = 1  # trainings at once, each in its own process
    workers: int = 0  # data-loading processes per training
    cache: str = "auto"  # cache latents and text embeddings: auto (only without a GPU), yes, no
    assets: Path | None = None  # where export writes (default OUT/assets)
    variants_dir: Path | None = None  # where export-variants writes (default OUT/variants)
    deadline: float = math.inf  # epoch seconds: trainings stop there and keep their latest checkpoint
    variant: str = ""  # one variant only (a --jobs child process)

    def validate(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise SDXLError(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
        if self.variant and self.variant not in VARIANTS:
            raise SDXLError(f"unknown variant {self.variant!r}; choose from {', '.join(VARIANTS)}")
        if self.cache not in ("auto", "yes", "no"):
            raise SDXLError(f"cache must be auto, yes or no, got {self.cache!r}")
        if self.jobs < 1 or self.workers < 0 or not self.scale > 0:
            raise SDXLError(f"need jobs >= 1, workers >= 0 and scale > 0, got jobs {self.jobs}, "
                            f"workers {self.workers}, scale {self.scale}")


def run(r: RecipeRun, command: str) -> None:
    """Run the stages in order; `command` is recorded in the exported files' metadata."""
    r.validate()
    out = Path(r.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = r.cache == "yes" or r.cache == "auto" and not torch.cuda.is_available()
    if r.variant or r.jobs > 1:  # share the cores: OpenMP threads of several processes fighting are far slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // r.jobs))
    if "data" in r.stages:
        make_data(out, r.scale, r.jobs)
    if "vae" in r.stages:
        make_vae(out, r.scale, r.workers)
    if "init" in r.stages:
        make_init(out)
    if "vae-decoder" in r.stages:
        make_vae_decoder(out, r.scale, r.workers)
    jobs = [(s, "") for s in ("base", "refiner") if s in r.stages]
    jobs += [("variants", v) for v in ((r.variant,) if r.variant else VARIANTS) if "variants" in r.stages]
    if r.jobs > 1 and len(jobs) > 1:
        run_parallel(jobs, r)
    else:
        for stage, variant in jobs:
            run_training(stage, out, r.scale, r.workers, variant, cache, r.deadline)
    if "export" in r.stages:
        export(out, Path(r.assets or out / "assets"), command)
    if "export-variants" in r.stages:
        export_variants(out, Path(r.variants_dir or out / "variants"), command)


def run_parallel(jobs: list[tuple[str, str]], r: RecipeRun) -> None:
    """Each training in its own `sdxl recipe` process, `r.jobs` at a time; one log per job under `r.out`."""
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < r.jobs:
            stage, variant = pending.pop(0)
            cmd = [sys.executable, "-m", "sdxl.cli", "recipe", "--out", str(r.out), "--stages", stage, "--scale",
                   str(r.scale), "--workers", str(r.workers), "--cache", r.cache, "--jobs", str(r.jobs),
                   "--deadline", str(r.deadline)]
            cmd += ["--variant", variant] if variant else []
            log = open(Path(r.out) / f"job-{stage}{'-' + variant if variant else ''}.log", "w")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ), cmd))
        time.sleep(1)
        for proc, cmd in list(running):
            if proc.poll() is not None:
                running.remove((proc, cmd))
                if proc.returncode:
                    raise SDXLError(f"{' '.join(cmd)} failed (exit {proc.returncode}); see its job-*.log in {r.out}")


if __name__ == "__main__":  # the command lives in sdxl.cli; this keeps `python -m sdxl.lab.recipe` working
    from sdxl import cli

    sys.exit(cli.main(["recipe", *sys.argv[1:]]))
