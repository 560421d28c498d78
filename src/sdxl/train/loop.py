"""The training loop of `sdxl train CONFIG.toml`: read it top to bottom, `train` first.

Objective (docs/training.md §1): epsilon prediction on the 1000-step scaled-linear DDPM. In sigma form
x = x0 + sigma * eps and the UNet sees c_in * x = x / sqrt(sigma^2 + 1) at timestep t, which
is exactly sqrt(abar) x0 + sqrt(1 - abar) eps and exactly what inference (`GuidedDenoiser`)
feeds it. A v-prediction model (its `ModelConfig.prediction`) learns v = (eps - sigma x0) / sqrt(sigma^2 + 1)
instead (`target`), on zero-terminal-SNR sigmas if its config says so. Conditioning goes through the model's own
Conditioner, as at inference.

Under `torchrun` every process takes `batch_size` samples of each global batch; gradients are
averaged by DistributedDataParallel (or FSDP shards a full UNet). All randomness of a sample
comes from (seed, global batch number, position in it), so one process with batch 2B and two
with B each train the same model, and a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from sdxl.formats import checkpoint as checkpoint_io
from sdxl.errors import CheckpointError, SDXLError
from sdxl.models.model import SDXLModel
from sdxl.sampling.schedules import discrete_sigmas
from sdxl.models.tokenizer import PAD_BIGG, PAD_CLIP_L, Tokenizer
from sdxl.train import checkpointing
from sdxl.train import config, data
from sdxl.train.config import TrainConfig
from sdxl.train.lr import learning_rate

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


FINAL_FILES = ("final.safetensors", "final_lora.safetensors", "final_lora_peft.safetensors")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among `world` processes (1 without torchrun), its device, and whether
    the UNet is sharded by FSDP (else DDP averages gradients when world > 1)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(cfg: TrainConfig, output: str | Path | None = None, resume: bool = False, quiet: bool = False,
          on_step=None) -> Path:
    """Train as `cfg` says; checkpoints under `output`, ending with `output/final.safetensors` (returned).

    `on_step(state)` is called after every optimizer step (and its checkpoint), e.g. to stop early.
    """
    config.check(cfg)  # a TrainConfig built in Python (or changed with dataclasses.replace) gets the same rules
    output = Path(output or cfg.output)
    previous = check_output(output, resume)
    where = setup_distributed(cfg)
    try:
        return _train(cfg, output, previous, quiet, on_step, where)
    finally:
        if where.world > 1:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, output: Path, previous: Path | None, quiet: bool, on_step, d: Dist) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    log = Log(output / "log.jsonl", enabled=d.main)
    seed_everything(cfg.seed)
    model = build_model(cfg, d.device)
    trained = trainable_parameters(model, cfg, d)  # {official name: parameter}
    tokenizer = Tokenizer.default()
    dataset, plan, skipped = build_data(cfg, model, tokenizer, output, d, log)
    run = Run(cfg, model, trained, d)
    if previous is not None:
        restore(previous, run, log)
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=data.RankBatches(plan, d.rank, cfg.batch_size, run.state["batches"]),
        collate_fn=data.collate, num_workers=cfg.num_workers))
    empty_text = model.conditioner.encode_captions([""], tokenizer) if cfg.cache_dir else None
    bar = progress_bar(cfg.steps, run.state["step"], disabled=quiet or not d.main)
    say = bar.write if d.main else (lambda message: None)
    if skipped:
        say(f"skipped {len(skipped)} unreadable image(s); see {output / 'log.jsonl'}")
    started = time.perf_counter()
    for step in range(run.state["step"], cfg.steps):
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.lr_min)
        loss, grad_norm, failed = run.step(lr, lambda: prepare(next_batch(loader, run), model, tokenizer, cfg,
                                                               d.device, empty_text))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            nonfinite_step(run, step, loss, grad_norm, output, log, say)
        log.step(step=step + 1, loss=loss, lr=lr, grad_norm=grad_norm, images_skipped=len(skipped) + failed,
                 seconds=round(time.perf_counter() - started, 3))
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        after_step(run, output, tokenizer, log)
        if on_step is not None:
            on_step(run.state)
    bar.close()
    # the result: a single-file checkpoint that `sdxl generate --model` loads
    final = write_final(run, output)
    log.event("final", path=str(final), step=run.state["step"])
    return final


def check_output(output: Path, resume: bool) -> Path | None:
    """The checkpoint a resume continues (None for a new run); refuses what would overwrite a user's files."""
    try:
        output.stat()
    except FileNotFoundError:
        pass
    except OSError as e:  # a name too long, a file on the way
        raise SDXLError(f"--output {output}: cannot make the run's folder ({e.strerror}); choose another") from None
    if output.exists() and not output.is_dir():
        raise SDXLError(f"--output {output} is a file; name a folder for the run's checkpoints")
    previous = checkpointing.latest(output)
    if resume and previous is None:
        raise SDXLError(f"{output}: nothing to resume (no {output / 'latest'}); run without --resume to start")
    if not resume and previous is not None:
        raise SDXLError(f"{output} already holds a run (latest: {previous.name}); pass --resume to continue it "
                        "or choose another --output")
    if previous is None:
        theirs = [name for name in FINAL_FILES if (output / name).exists()]
        if theirs:
            raise SDXLError(f"{output} already holds {', '.join(theirs)} from another run; choose another --output "
                            "(nothing was overwritten)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file on the way, a read-only or virtual file system, a name too long
        raise SDXLError(f"--output {output}: cannot make the run's folder ({e.strerror}); choose another") from None
    return previous


class Run:
    """What one training changes step by step: the trained weights, optimizer, EMA and counters (`state`)."""

    def __init__(self, cfg: TrainConfig, model: SDXLModel, trained: dict[str, nn.Parameter], d: Dist):
        self.cfg, self.model, self.trained, self.dist = cfg, model, trained, d
        self.params = list(trained.values())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        self.ema = {name: p.detach().clone() for name, p in trained.items()} if cfg.ema_decay else None
        self.state = {"step": 0, "batches": 0, "nonfinite_in_a_row": 0, "nonfinite_total": 0, "world_size": d.world}
        self.objective = Objective(model, cfg)
        self.step_module = self.objective
        if d.world > 1 and not d.fsdp:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.objective, device_ids=[d.device.index] if d.device.type == "cuda" else None)
        self.autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
        self.bad_images: set[str] = set()

    def step(self, lr: float, next_inputs) -> tuple[float, float, int]:
        """One optimizer step over `grad_accum` micro-batches (skipped when loss or gradients are not finite);
        returns (loss averaged over processes, gradient norm, unreadable images met so far by all processes)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.dist.device)
        for micro in range(self.cfg.grad_accum):
            inputs = next_inputs()
            with gradient_sync(self.step_module, self.objective, micro == self.cfg.grad_accum - 1), self.autocast:
                loss = self.step_module(inputs).mean() / self.cfg.grad_accum  # (B,) per-sample losses -> scalar
            loss.backward()
            loss_sum += loss.detach().float()
        loss_value, failed = all_average(loss_sum, len(self.bad_images), self.dist.world)
        grad_norm = clip_gradients(self.params, self.cfg.max_grad_norm)
        finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            if self.ema is not None:
                update_ema(self.ema, self.trained, self.cfg.ema_decay)
        self.state["nonfinite_in_a_row"] = 0 if finite else self.state["nonfinite_in_a_row"] + 1
        self.state["nonfinite_total"] += not finite
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        return loss_value, grad_norm, failed


def next_batch(loader, run: Run) -> dict:
    """The next collated batch; unreadable images are counted, a bucket with none readable ends the run."""
    batch = next(loader)
    if "error" in batch:  # raised here, not in a DataLoader worker, so the user sees one line
        raise SDXLError(batch["error"])
    run.state["batches"] += 1
    run.bad_images.update(batch["failed"])
    return batch


def nonfinite_step(run: Run, step: int, loss: float, grad_norm: float, output: Path, log, say) -> None:
    """A skipped step is logged; after `max_nonfinite` in a row the run stops, keeping the last good checkpoint."""
    log.event("nonfinite", step=step + 1, loss=str(loss), grad_norm=str(grad_norm))
    say(f"step {step + 1}: non-finite loss or gradients (loss {loss}, grad norm {grad_norm}); step skipped")
    if run.state["nonfinite_in_a_row"] >= run.cfg.max_nonfinite:
        last_good = checkpointing.latest(output)
        raise SDXLError(f"stopped at step {step + 1}: {run.cfg.max_nonfinite} non-finite steps in a row; the last "
                        f"good checkpoint is {last_good or 'none (no checkpoint was written yet)'}")


def after_step(run: Run, output: Path, tokenizer: Tokenizer, log) -> None:
    """A checkpoint when due (only after good steps) or at the end; sample images when due."""
    cfg, step = run.cfg, run.state["step"]
    due = step % cfg.checkpoint_every == 0 and run.state["nonfinite_in_a_row"] == 0
    if due or step == cfg.steps:
        folder = save_checkpoint(output, run)
        log.event("checkpoint", step=step, path=str(folder))
    if cfg.sample_every and step % cfg.sample_every == 0:
        write_samples(run, tokenizer, output, step)


# --- setup ----------------------------------------------------------------------------------------

def setup_distributed(cfg: TrainConfig) -> Dist:
    """This process's place; under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on GPUs, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device:
        device = torch.device(cfg.device)
    else:
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank() if world > 1 else 0, world, device, world > 1 and cfg.distributed == "fsdp")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def build_model(cfg: TrainConfig, device: torch.device) -> SDXLModel:
    """From a checkpoint (`model`) or from scratch (`model_config`, initialised from `seed`); fp32, frozen, eval."""
    if cfg.model:
        model = checkpoint_io.load(cfg.model, device, torch.float32)
        missing = [n for n in ("unet", "conditioner", "vae") if n not in model.components()]
        if missing:
            raise SDXLError(f"{cfg.model}: has no {', '.join(missing)}; training needs UNet, text encoders and VAE")
        check_finite(model.state_dict(), f"{cfg.model}: weight", "a broken model cannot be trained")
    else:
        try:
            model = SDXLModel(cfg.model_config_resolved(), device=device)
        except (ValueError, AssertionError) as e:  # e.g. widths that GroupNorm(32) or 64-wide heads cannot split
            raise SDXLError(f"model_config {cfg.model_config!r} with these changes cannot be built: {e}") from None
    model.requires_grad_(False).eval()
    # bucket sides must come out as whole latents that the UNet can halve at every level
    factor = 2 ** (len(model.vae.cfg.ch_mult) - 1) * 2 ** (len(model.unet.cfg.channel_mult) - 1)
    for name, value in (("bucket_step", cfg.bucket_step), ("sample_size", cfg.sample_size or cfg.resolution)):
        if value % math.lcm(factor, 8):
            raise SDXLError(f"{name} {value} must be a multiple of {math.lcm(factor, 8)} for this model "
                            "(VAE down-sampling times UNet down-sampling)")
    return model


def trainable_parameters(model: SDXLModel, cfg: TrainConfig, d: Dist) -> dict[str, nn.Parameter]:
    """The trained parameters by their name in `model`: the full UNet (sharded under FSDP), or new LoRA layers
    (sdxl.adapters.lora); the UNet is put in training mode."""
    model.unet.train()
    model.unet.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.train == "lora":
        from sdxl.adapters.lora import add_lora

        new = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, unet=True,
                       text_encoders=cfg.lora_text_encoders, dtype=torch.float32)
        ids = {id(p) for p in new}
        trained = {n: p.requires_grad_(True) for n, p in model.named_parameters() if id(p) in ids}
        clip_l = model.cfg.conditioner.clip_l
        if clip_l is not None:  # SDXL reads CLIP-L's penultimate layer: a LoRA on its last one gets no gradient
            unused = f"conditioner.embedders.0.transformer.text_model.encoder.layers.{clip_l.layers - 1}."
            for n in [n for n in trained if n.startswith(unused)]:
                trained.pop(n).requires_grad_(False)  # stays a zero LoRA; DDP would fail on it otherwise
        return trained
    model.unet.requires_grad_(True)
    if d.fsdp:
        shard_unet(model.unet, cfg)  # replaces the UNet's parameters by sharded ones
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def build_data(cfg: TrainConfig, model: SDXLModel, tokenizer: Tokenizer, output: Path, d: Dist, log):
    """(dataset, batch plan, skipped files): images scanned, small ones dropped, bucketed, optionally cached."""
    if cfg.dataset.startswith("synthetic:") and d.main:
        data.make_synthetic(int(cfg.dataset.split(":", 1)[1]), output / f"synthetic-{cfg.dataset.split(':', 1)[1]}")
    barrier()
    items, skipped = data.scan(cfg.dataset, output)
    small = [it for it in items if min(it.size) < cfg.min_original_size]
    if small:
        items = [it for it in items if min(it.size) >= cfg.min_original_size]
        if not items:
            raise SDXLError(f"every image is smaller than min_original_size {cfg.min_original_size}")
    buckets = data.make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect)
    bucket_of = [data.nearest_bucket(it.size, buckets) for it in items]
    if cfg.cache_dir:
        items, bucket_of, files, text_files, bad = build_cache(cfg, model, tokenizer, items, buckets, bucket_of, d)
        skipped += bad
        dataset = data.CachedDataset(items, buckets, bucket_of, cfg.seed, cfg.random_crop, cfg.aesthetic_score, files,
                                     text_files)
    else:
        dataset = data.ImageDataset(items, buckets, bucket_of, cfg.seed, cfg.random_crop, cfg.aesthetic_score)
    if cfg.batch_size * d.world > len(items):
        raise SDXLError(f"batch_size {cfg.batch_size} x {d.world} process(es) is more than the {len(items)} usable "
                        "images; give a smaller batch_size (or more images)")
    plan = data.BucketBatches(bucket_of, cfg.batch_size * d.world, cfg.seed)
    log.event("data", images=len(items), skipped=len(skipped), dropped_small=len(small), skipped_files=skipped[:100],
              buckets={f"{buckets[b][0]}x{buckets[b][1]}": len(m) for b, m in sorted(plan.members.items())},
              batches_per_epoch=len(plan))
    return dataset, plan, skipped


def shard_unet(unet: nn.Module, cfg: TrainConfig) -> None:
    """FSDP2: shard every UNet block and the rest of the UNet over the processes (full fine-tunes)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        fully_shard(block, mp_policy=policy)
    fully_shard(unet, mp_policy=policy)


# --- the objective --------------------------------------------------------------------------------

class Objective(nn.Module):
    """What DDP wraps: conditioning + UNet -> per-sample loss. Holds the UNet and the Conditioner."""

    def __init__(self, model: SDXLModel, cfg: TrainConfig):
        super().__init__()
        self.unet, self.conditioner = model.unet, model.conditioner
        self.train_text = cfg.lora_text_encoders
        self.min_snr_gamma = cfg.min_snr_gamma
        self.prediction = model.cfg.prediction
        # (1000,) ascending; not a buffer: never saved or broadcast
        self.sigmas = discrete_sigmas(zero_terminal_snr=model.cfg.zero_terminal_snr).float()

    def forward(self, inputs: dict) -> torch.Tensor:
        t, noise = inputs["t"], inputs["noise"]
        if "crossattn" in inputs:  # from the cache (dropped captions already replaced by the empty caption's)
            crossattn, pooled = inputs["crossattn"], inputs["pooled"]
        else:
            with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
                crossattn, pooled = self.conditioner.encode_text(inputs["tokens_l"], inputs["tokens_g"])
        c = self.conditioner(crossattn, pooled, inputs["micro"], empty=inputs["drop"])  # as inference conditions
        sigma = self.sigmas.to(t.device)[t].view(-1, 1, 1, 1)
        x = inputs["latents"] + sigma * noise
        out = self.unet(x / torch.sqrt(sigma * sigma + 1), t.float(), c.crossattn, c.vector)
        loss = (out.float() - target(self.prediction, inputs["latents"], noise, sigma)).square().mean(dim=(1, 2, 3))
        if self.min_snr_gamma > 0:  # min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v), SNR = 1 / sigma^2 (Hang et al. 2023)
            s2 = sigma.flatten() ** 2
            loss = loss * (self.min_snr_gamma * s2).clamp(max=1.0) / (s2 + 1 if self.prediction == "v" else 1)
        return loss  # (B,)


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the UNet learns at x = x0 + sigma * noise: the noise ("epsilon") or the velocity ("v",
    sqrt(abar) eps - sqrt(1 - abar) x0 with abar = 1 / (sigma^2 + 1); Salimans & Ho 2022, diffusers `get_velocity`)."""
    return noise if prediction == "epsilon" else (noise - sigma * x0) / torch.sqrt(sigma * sigma + 1)


@torch.no_grad()
def prepare(batch: dict, model: SDXLModel, tokenizer: Tokenizer, cfg: TrainConfig, device: torch.device,
            empty_text: tuple[torch.Tensor, torch.Tensor] | None) -> dict:
    """A collated batch -> the objective's inputs on `device`: latents, noise, t, text, dropout, micro values.

    Every random number of a sample comes from its own generator, seeded by (seed, batch number, position).
    """
    gens = [torch.Generator().manual_seed(data.stable_seed(cfg.seed, "sample", k, pos)) for k, pos in batch["key"]]
    drop = torch.tensor([float(torch.rand((), generator=g)) < cfg.caption_dropout for g in gens])
    lo, hi = cfg.timestep_range
    t = torch.cat([torch.randint(lo, hi, (1,), generator=g) for g in gens])
    vae = model.vae
    if "pixels" in batch:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            posterior = vae.encode(batch["pixels"].to(device))
        mean, std = posterior.mean.float(), posterior.std.float()
    else:
        mean, std = batch["mean"].to(device), batch["std"].to(device)
    shape = tuple(mean.shape[1:])  # (C, h, w)
    draw = lambda size: torch.cat([torch.randn((1, *size), generator=g) for g in gens]).to(device)  # noqa: E731
    latents = (mean + std * draw(shape)) * vae.cfg.scaling_factor
    noise = draw(shape) + cfg.offset_noise * draw((shape[0], 1, 1))  # offset noise (Guttenberg 2023)
    micro = {k: batch[k] for k in ("original_size", "crop_coords_top_left", "target_size", "aesthetic_score")}
    if not cfg.size_conditioning:  # ablation: the model cannot tell an upscaled small image (report §2.2)
        micro["original_size"] = micro["target_size"]
    if not cfg.crop_conditioning:
        micro["crop_coords_top_left"] = torch.zeros_like(micro["crop_coords_top_left"])
    inputs = {"latents": latents, "noise": noise, "t": t.to(device), "drop": drop.to(device),
              "micro": {k: v.to(device) for k, v in micro.items()}}
    if "crossattn" in batch:  # a dropped caption is the empty caption (the base then zeroes it, `Conditioner`)
        d = drop.to(device)
        inputs["crossattn"] = torch.where(d[:, None, None], empty_text[0].float(), batch["crossattn"].to(device))
        inputs["pooled"] = torch.where(d[:, None], empty_text[1].float(), batch["pooled"].to(device))
    else:
        captions = ["" if d else c for c, d in zip(batch["caption"], drop.tolist())]
        inputs["tokens_g"] = tokenizer(captions, PAD_BIGG).to(device)
        inputs["tokens_l"] = tokenizer(captions, PAD_CLIP_L).to(device) if model.conditioner.clip_l else None
    return inputs


def build_cache(cfg, model, tokenizer, items, buckets, bucket_of, d: Dist):
    """Encode every image (one fixed crop) and every distinct caption once; returns the cached items, buckets,
    latent files, text files and skipped images. Files are named by the weights that made them (not by the
    checkpoint's path), so a continued training or a refiner on the same VAE reuses the latents."""
    cache_dir = Path(cfg.cache_dir)
    device = next(model.vae.parameters()).device
    vae_state = {k: v for k, v in model.vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    vae_print = data.weights_fingerprint(vae_state)
    cond = model.conditioner  # its text encoders, their configs (pooling, layers) and which of the two it has
    text_print = data.weights_fingerprint(cond.state_dict()) + repr((cond.cfg.clip_l, cond.cfg.bigg))
    files = [data.cache_file(cache_dir, it, buckets[b], cfg.random_crop, cfg.seed, vae_print)
             for it, b in zip(items, bucket_of)]

    @torch.no_grad()
    def encode_image(pixels):
        posterior = model.vae.encode(pixels.to(device))
        return {"mean": posterior.mean[0].float(), "std": posterior.std[0].float()}

    @torch.no_grad()
    def encode_caption(caption):
        crossattn, pooled = cond.encode_captions([caption], tokenizer)
        return {"crossattn": crossattn[0].float(), "pooled": pooled[0].float()}

    data.fill_cache(items, buckets, bucket_of, files, encode_image, cfg.seed, cfg.random_crop, d.rank, d.world)
    barrier()
    keep = [i for i, f in enumerate(files) if f.is_file()]
    bad = [f.with_suffix(".bad").read_text() for f in files if f.with_suffix(".bad").is_file()]
    if not keep:
        raise SDXLError(f"dataset {cfg.dataset!r}: no readable images ({len(bad)} could not be decoded)")
    items, bucket_of, files = [items[i] for i in keep], [bucket_of[i] for i in keep], [files[i] for i in keep]
    text_files = [data.text_cache_file(cache_dir, it.caption, text_print) for it in items]
    data.fill_text_cache([it.caption for it in items], text_files, encode_caption, d.rank, d.world)
    barrier()
    return items, bucket_of, files, text_files, bad


# --- one step's pieces ----------------------------------------------------------------------------

def gradient_sync(step_module: nn.Module, objective: nn.Module, last_micro_step: bool):
    """Gradient accumulation: no all-reduce until the last micro-step (DDP no_sync, FSDP2 requires_gradient_sync)."""
    if isinstance(step_module, nn.parallel.DistributedDataParallel) and not last_micro_step:
        return step_module.no_sync()
    if hasattr(objective.unet, "set_requires_gradient_sync"):  # sharded by FSDP2
        objective.unet.set_requires_gradient_sync(last_micro_step)
    return contextlib.nullcontext()


def all_average(loss_sum: torch.Tensor, bad: int, world: int) -> tuple[float, int]:
    """The loss averaged over processes, and the unreadable images they met (summed)."""
    t = torch.stack([loss_sum.float(), torch.tensor(float(bad), device=loss_sum.device)])
    if world > 1:
        dist.all_reduce(t)  # gloo has no AVG: sum, then divide
        t[0] /= world
    return float(t[0]), int(t[1])


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` (0: no clipping); the total norm, inf or nan when a gradient is not finite."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], trained: dict[str, nn.Parameter], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * weights."""
    for name, p in trained.items():
        ema[name].lerp_(p.detach(), 1.0 - decay)


# --- checkpoints, resume, samples, the final file ---------------------------------------------------

def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kw)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def check_finite(tensors, what: str, then: str, d: Dist = Dist()) -> None:
    """Refuse NaN/Inf weights (a dict, or (name, tensor) pairs) before anything is written: a one-line SDXLError
    naming the first bad tensor (under FSDP each process checks its shards and all learn whether any failed)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    pairs = tensors.items() if isinstance(tensors, dict) else tensors
    bad = next((n for n, t in pairs if not bool(torch.isfinite(local(t).detach()).all())), None)
    anywhere = bad is not None
    if d.world > 1:
        flag = torch.tensor(float(anywhere), device=d.device)
        dist.all_reduce(flag)
        anywhere = bool(flag > 0)
    if anywhere:
        raise SDXLError(f"{what} {bad or '(on another process)'} holds NaN or Inf; {then}")


def check_trained(run: Run, output: Path) -> None:
    """The trained weights (and EMA) are finite, or the run stops without writing them."""
    last = checkpointing.latest(output)
    then = f"nothing was saved (the last good checkpoint is {last or 'none'}); lower lr"
    check_finite(run.trained, f"step {run.state['step']}: trained weight", then, run.dist)
    if run.ema is not None:
        check_finite(run.ema, f"step {run.state['step']}: EMA weight", then, run.dist)


def save_checkpoint(output: Path, run: Run) -> Path:
    """Gather the trained weights, optimizer state and EMA (full tensors on rank 0) and write them atomically."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    check_trained(run, output)
    options = _state_dict_options(cpu_offload=True)
    trained = get_model_state_dict(run.model, options=options)
    osd = get_optimizer_state_dict(run.model, run.optimizer, options=options)
    ema_full = {n: _full(e) for n, e in run.ema.items()} if run.ema is not None else None
    meta = dict(run.state, config=run.cfg.to_dict(), saved=time.strftime("%Y-%m-%dT%H:%M:%S"))
    return checkpointing.save(output, run.state["step"], trained, osd, ema_full, meta, run.cfg.keep_checkpoints)


def restore(folder: Path, run: Run, log) -> None:
    """Load weights, optimizer, EMA, step, data position and RNG states from a checkpoint folder."""
    try:
        ckpt = checkpointing.load(folder, run.dist.rank)
        _apply_checkpoint(folder, ckpt, run)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, CheckpointError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SDXLError(f"{folder}: the checkpoint cannot be read ({detail}); point {folder.parent / 'latest'} at "
                        "an earlier step-* folder or start again in a new --output") from None
    saved, cfg, world = ckpt["state"], run.cfg, run.dist.world
    if saved.get("world_size", world) * cfg.batch_size != world * saved["config"]["batch_size"]:
        log.event("warning", message="the global batch size changed since the checkpoint: data order differs")
    if run.state["step"] >= cfg.steps and any((folder.parent / n).exists() for n in FINAL_FILES):
        raise SDXLError(f"{folder}: the run is already at step {run.state['step']} of steps = {cfg.steps}; raise "
                        "steps (--set steps=N) to continue it (its final file is kept as it is)")
    changed = sorted(k for k, v in cfg.to_dict().items() if saved["config"].get(k) != v and k != "output")
    if changed:
        log.event("resume_config_changed", keys=changed)
    log.event("resumed", path=str(folder), step=run.state["step"])


def _apply_checkpoint(folder: Path, ckpt: dict, run: Run) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if set(ckpt["trained"]) != set(run.trained):
        extra, missing = set(ckpt["trained"]) - set(run.trained), set(run.trained) - set(ckpt["trained"])
        raise SDXLError(f"{folder}: its trained weights do not match this config ({len(missing)} missing, "
                        f"{len(extra)} unexpected, e.g. {next(iter(missing or extra))}); did `train` or the LoRA "
                        "settings change?")
    if other := next((n for n, t in ckpt["trained"].items() if tuple(t.shape) != tuple(run.trained[n].shape)), None):
        raise SDXLError(f"{folder}: its weights do not fit this config's model ({other}: saved "
                        f"{tuple(ckpt['trained'][other].shape)}, now {tuple(run.trained[other].shape)}); resume with the "
                        "run's own model settings (see its state.json) or start a new --output")
    saved = ckpt["state"]
    counters = {key: int(saved[key]) for key in ("step", "batches", "nonfinite_in_a_row", "nonfinite_total")}
    set_model_state_dict(run.model, ckpt["trained"], options=_state_dict_options(strict=False))
    set_optimizer_state_dict(run.model, run.optimizer, ckpt["optimizer"], options=_state_dict_options())
    if run.ema is not None:
        if ckpt["ema"] is None:
            raise SDXLError(f"{folder}: holds no EMA weights but ema_decay is set; resume with ema_decay = 0")
        with torch.no_grad():
            for name, e in run.ema.items():
                src = ckpt["ema"][name].to(run.trained[name].device)
                if hasattr(e, "device_mesh"):  # FSDP: keep this process's shard
                    from torch.distributed.tensor import distribute_tensor

                    src = distribute_tensor(src, e.device_mesh, e.placements)
                e.copy_(src)
    run.state.update(counters)
    checkpointing.set_rng_state(*ckpt["rng"])


def write_samples(run: Run, tokenizer, output: Path, step: int) -> None:
    """Images from the fixed prompts and seeds (rank 0, fp32, `sample_steps` Euler steps) -> output/samples/."""
    if not run.dist.main or run.dist.fsdp:
        return  # under FSDP no single process holds the whole UNet: look at final.safetensors instead
    from sdxl.pipeline import Pipeline
    from sdxl.request import Request

    cfg, model = run.cfg, run.model
    size = cfg.sample_size or cfg.resolution
    folder = output / "samples"
    folder.mkdir(exist_ok=True)
    pipe = Pipeline(model, device=run.dist.device, dtype=torch.float32, tokenizer=tokenizer, channels_last=False)
    for i, prompt in enumerate(cfg.sample_prompts):  # the Pipeline works on its own copies: training state untouched
        req = Request(prompt, width=size, height=size, steps=cfg.sample_steps, cfg=cfg.sample_cfg,
                      seed=cfg.sample_seed + i)
        pipe.generate(req).images[0].save(folder / f"{checkpointing.folder_name(step)}-{i}.png")


def write_final(run: Run, output: Path) -> Path:
    """final.safetensors (official single-file layout; EMA weights when enabled); LoRA runs also write the
    LoRA alone, kohya (final_lora.safetensors) and PEFT (final_lora_peft.safetensors), then merge it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    cfg, model, d = run.cfg, run.model, run.dist
    dtype = SAVE_DTYPES[cfg.save_dtype]
    meta = {"sdxl.train.config": json.dumps(cfg.to_dict()), "sdxl.train.ema": str(run.ema is not None)}
    final = output / "final.safetensors"
    check_trained(run, output)
    if run.ema is not None:
        with torch.no_grad():
            for name, p in run.trained.items():
                p.copy_(run.ema[name])
    if cfg.train == "lora":
        from sdxl.adapters.lora import merge_lora, save_lora

        if d.main:
            for name, fmt in (("final_lora.safetensors", "kohya"), ("final_lora_peft.safetensors", "peft")):
                (output / name).unlink(missing_ok=True)  # this run's own (check_output refused anyone else's)
                save_lora(model, output / name, format=fmt, metadata=meta, dtype=dtype)
        merge_lora(model)
    if d.fsdp:  # gather the sharded UNet into a plain model on rank 0
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if d.main:
            plain = SDXLModel(model.cfg, device="meta")
            plain.load_state_dict(full, assign=True)
            checkpoint_io.save_single_file(plain, final, dtype=dtype, metadata=meta, overwrite=True)
    else:  # every process holds the whole model: each checks, so all stop together
        as_saved = ((name, t.to(dtype)) for name, t in model.state_dict().items() if t.is_floating_point())
        check_finite(as_saved, f"{final}: weight", f"nothing was written ({cfg.save_dtype} cannot hold it: "
                     'try save_dtype = "fp32" or a lower lr)')
        if d.main:
            checkpoint_io.save_single_file(model, final, dtype=dtype, metadata=meta, overwrite=True)
    barrier()
    return final


# --- seeing it ------------------------------------------------------------------------------------

class Log:
    """JSON lines: one per step (loss, lr, grad norm, ...) and one per event (data, checkpoint, nonfinite, ...)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def _write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, **values) -> None:
        self._write(values)

    def event(self, name: str, **values) -> None:
        self._write({"event": name, **values})


def progress_bar(total: int, initial: int, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=disabled, unit="step", dynamic_ncols=True, desc="train")
