"""Train a small SDXL-family VAE (sgm AutoencoderKL) from scratch: reconstruction + a little KL.

The SDXL VAE was trained with L1 + LPIPS + a patch GAN and a KL weight of 1e-6 (report §2.4, sgm
`autoencoder_kl` configs). The synthetic world is flat colours and sharp edges, so L1 + MSE and
the same tiny KL do here without a perceptual network. Crops come from the same resize-and-crop
as the UNet trainer's buckets (data.py), so the VAE sees upscaled small images too.

The latent scale is folded into the weights at the end: SDXL checkpoints do not store
`scaling_factor`, and loaders apply 0.13025, so `quant_conv` / `post_quant_conv` are rescaled
until latents x 0.13025 have unit variance, which the diffusion schedule assumes (LDM §3).

    sdxl train-vae --dataset runs/default/data --out runs/default/vae.safetensors --set steps=1500
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sdxl.formats import checkpoint as checkpoint_io
from sdxl.formats.files import write_json
from sdxl.errors import SDXLError
from sdxl.models.model import ModelConfig, SDXLModel
from sdxl.models.vae import VAEConfig
from sdxl.train import data
from sdxl.train.config import MAX_BATCH, MAX_LR, MAX_RESOLUTION, require
from sdxl.train.loop import check_finite
from sdxl.train.lr import learning_rate

# f = 8 (four levels), 4 latent channels, one ResnetBlock per level: about 1M parameters
SMALL_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


@dataclass(frozen=True)
class VAETrainConfig:
    dataset: str  # a folder of images (+ captions, unused) or a .jsonl manifest
    vae: VAEConfig = field(default_factory=lambda: SMALL_VAE)
    crop: int = 64  # square training crops, cut from bucket-sized images; 0: whole buckets (one bucket per batch)
    resolution: int = 128  # bucket area and shape as in the UNet's training
    bucket_step: int = 32
    max_aspect: float = 2.0
    batch_size: int = 16
    steps: int = 1500
    lr: float = 1e-3
    warmup_steps: int = 50
    kl_weight: float = 1e-6  # sgm's autoencoder_kl weight, on the summed KL per image
    seed: int = 0
    device: str = ""
    num_workers: int = 0
    init: str = ""  # start from this VAE file
    decoder_only: bool = False  # train the decoder alone: the latent space (and every UNet on it) is kept
    probe: int = 64  # fresh crops that set the latent scale and measure the PSNR at the end


def _rules(cfg: VAETrainConfig) -> list[tuple[bool, str]]:
    """VAETrainConfig's ranges (train.config.require checks finiteness and the device first)."""
    buckets_ok = 0 < cfg.bucket_step <= cfg.resolution <= MAX_RESOLUTION and cfg.resolution % cfg.bucket_step == 0 \
        and cfg.max_aspect >= 1.0
    smallest = min(min(b) for b in data.make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect)) \
        if buckets_ok else 0
    return [
        (cfg.steps >= 1, f"steps must be at least 1, got {cfg.steps}"),
        (1 <= cfg.batch_size <= MAX_BATCH, f"batch_size must be in 1..{MAX_BATCH}, got {cfg.batch_size}"),
        (0 < cfg.lr <= MAX_LR, f"lr must be in (0, {MAX_LR:g}], got {cfg.lr}"),
        (cfg.warmup_steps >= 0, f"warmup_steps must be at least 0, got {cfg.warmup_steps}"),
        (cfg.kl_weight >= 0, f"kl_weight must be at least 0, got {cfg.kl_weight}"),
        (cfg.num_workers >= 0, f"num_workers must be at least 0 (0: in the main process), got {cfg.num_workers}"),
        (0 <= cfg.seed < 2**63, f"seed must be in [0, 2**63), got {cfg.seed}"),
        (1 <= cfg.probe <= MAX_BATCH, f"probe must be in 1..{MAX_BATCH} crops, got {cfg.probe}"),
        (buckets_ok, f"resolution ({cfg.resolution}) must be a multiple of bucket_step ({cfg.bucket_step}), both "
                     f"positive, resolution at most {MAX_RESOLUTION}, and max_aspect at least 1 (got {cfg.max_aspect})"),
        (cfg.crop == 0 or cfg.crop % 8 == 0 and 8 <= cfg.crop <= smallest,
         f"crop must be 0 (whole buckets) or a multiple of 8 from 8 to {smallest} (the smallest bucket side), "
         f"got {cfg.crop}"),
    ]


class Crops(torch.utils.data.Dataset):
    """Sample k -> one random crop, a pure function of (seed, k)."""

    def __init__(self, items: list[data.Item], cfg: VAETrainConfig):
        self.items, self.cfg = items, cfg
        self.buckets = data.make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect)
        self.members: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            self.members.setdefault(data.nearest_bucket(it.size, self.buckets), []).append(i)

    def __len__(self) -> int:
        return self.cfg.steps * self.cfg.batch_size

    def __getitem__(self, k: int) -> torch.Tensor:
        rng = np.random.default_rng(data.stable_seed(self.cfg.seed, "vae", k))
        if self.cfg.crop == 0:  # whole buckets: every sample of batch k // batch_size from one bucket
            b = sorted(self.members)[data.stable_seed(self.cfg.seed, "bucket", k // self.cfg.batch_size)
                                     % len(self.members)]
            item = self.items[self.members[b][int(rng.integers(len(self.members[b])))]]
            return data.load_crop(item.path, *data.crop_box(item.size, self.buckets[b], rng), self.buckets[b])
        item = self.items[int(rng.integers(len(self.items)))]
        bucket = self.buckets[data.nearest_bucket(item.size, self.buckets)]
        pixels = data.load_crop(item.path, *data.crop_box(item.size, bucket, rng), bucket)
        c = self.cfg.crop
        top, left = int(rng.integers(0, bucket[0] - c + 1)), int(rng.integers(0, bucket[1] - c + 1))
        return pixels[:, top:top + c, left:left + c]


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator | None = None):
    """(loss, l1) for a batch in [-1, 1]: L1 + MSE per pixel, plus kl_weight x the KL summed per image."""
    posterior = vae.encode(x)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(x)
    recon = vae.decode(z)
    l1 = (recon - x).abs().mean()
    kl = 0.5 * (posterior.mean.square() + posterior.std.square() - 1 - posterior.logvar).sum() / x.shape[0]
    return l1 + (recon - x).square().mean() + kl_weight * kl / x[0].numel(), l1


@torch.no_grad()
def fold_latent_scale(vae, images: torch.Tensor, scaling_factor: float) -> float:
    """Rescale quant_conv (mean rows, log-variance bias) and post_quant_conv so that the posterior means of
    `images`, times `scaling_factor`, have unit standard deviation; decoding is unchanged. Returns the factor."""
    std = float(vae.encode(images).mean.std())
    k = 1.0 / (scaling_factor * std)
    c = vae.cfg.embed_dim
    vae.quant_conv.weight[:c] *= k
    vae.quant_conv.bias[:c] *= k
    vae.quant_conv.bias[c:] += 2 * math.log(k)  # the std scales by k too
    vae.post_quant_conv.weight /= k
    return k


def train_vae(cfg: VAETrainConfig, out: str | Path, quiet: bool = False) -> Path:
    """Train, fold the latent scale, write a standalone VAE file (`first_stage_model.*`, fp32) and `out`.json."""
    out = Path(out)
    require(cfg, lambda: _rules(cfg))
    if out.suffix != ".safetensors":
        raise SDXLError(f"--out {out}: give a .safetensors file name, e.g. vae.safetensors")
    if taken := next((p for p in (out, out.with_suffix(".json")) if p.exists() or p.is_symlink()), None):
        raise SDXLError(f"{taken}: already exists; choose another --out (nothing was overwritten)")
    items, skipped = data.scan(cfg.dataset, out.parent)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.seed)
    init = checkpoint_io.load_vae(cfg.init) if cfg.init else None
    model = SDXLModel(ModelConfig(None, None, init.cfg if init else cfg.vae), device=device)
    if init is not None:
        model.vae.load_state_dict(init.state_dict())
    vae = model.vae.train()
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if cfg.decoder_only else [
        *vae.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(Crops(items, cfg), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    generator = torch.Generator().manual_seed(cfg.seed)
    started, log = time.perf_counter(), []
    for step, x in enumerate(loader):
        lr = learning_rate(step, cfg.steps, cfg.lr, cfg.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, l1 = vae_loss(vae, x.to(device), cfg.kl_weight, generator)
        if not torch.isfinite(loss):
            raise SDXLError(f"VAE training: non-finite loss at step {step + 1}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            log.append({"step": step + 1, "loss": round(loss.item(), 5), "l1": round(l1.item(), 5),
                        "seconds": round(time.perf_counter() - started, 1)})
            if not quiet:
                print(json.dumps(log[-1]), flush=True)
    vae.eval()
    # crops drawn with another seed (from the same images: a world without distribution shift) for the scale and PSNR
    probe_crops = Crops(items, VAETrainConfig(**{**cfg.__dict__, "seed": cfg.seed + 1, "batch_size": cfg.probe}))
    probe = torch.stack([probe_crops[k] for k in range(cfg.probe)]).to(device)
    k = 1.0 if cfg.decoder_only else fold_latent_scale(vae, probe, vae.cfg.scaling_factor)
    with torch.no_grad():
        mse = float((vae.decode(vae.encode(probe).mean).clamp(-1, 1) - probe).square().mean())
    psnr = 10 * math.log10(4.0 / mse)  # pixels span 2 (-1..1)
    meta = {"config": {k_: (list(v) if isinstance(v, tuple) else v) for k_, v in vae.cfg.__dict__.items()},
            "init": cfg.init, "decoder_only": cfg.decoder_only,
            "steps": cfg.steps, "batch_size": cfg.batch_size, "crop": cfg.crop, "lr": cfg.lr, "seed": cfg.seed,
            "images": len(items), "skipped": len(skipped), "latent_scale_folded": k, "psnr_db": round(psnr, 2),
            "seconds": round(time.perf_counter() - started, 1), "log": log}
    check_finite(model.state_dict(), f"{out}: weight", "nothing was written; lower --set lr")
    if not (math.isfinite(psnr) and math.isfinite(k)):
        raise SDXLError(f"VAE training diverged (PSNR {psnr}, latent scale {k}); nothing was written; lower --set lr")
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint_io.save_single_file(model.cpu(), out, metadata={"sdxl.train.vae": json.dumps(meta)})
    write_json(out.with_suffix(".json"), meta, indent=1)  # a new file: never replaces one made meanwhile
    if not quiet:
        print(f"wrote {out}: PSNR {psnr:.1f} dB on fresh crops, latent scale x{k:.3g} folded in")
    return out
