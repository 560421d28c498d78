"""A whole SDXL checkpoint as one module: its state_dict keys are the official single-file keys.

`model.diffusion_model.*` (UNet), `conditioner.embedders.N.*` (text encoders and
micro-conditioning), `first_stage_model.*` (VAE), as in sgm's `DiffusionEngine`.
A component may be absent (a UNet-only file, a standalone VAE).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sdxl.models import unet as unet_
from sdxl.models import vae as vae_
from sdxl.models.conditioning import (BASE_MICRO, REFINER_MICRO, SDXL_BASE_CONDITIONER, SDXL_REFINER_CONDITIONER, Conditioner,
                           ConditionerConfig)
from sdxl.models.text_encoders import CLIP_TINY, OPENCLIP_TINY
from sdxl.models.unet import UNet, UNetConfig
from sdxl.models.vae import AutoencoderKL, VAEConfig

PREFIXES = {"unet": "model.diffusion_model.", "conditioner": "conditioner.", "vae": "first_stage_model."}


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig | None
    conditioner: ConditionerConfig | None
    vae: VAEConfig | None

    @property
    def architecture(self) -> str:
        """"sdxl-base", "sdxl-refiner", "sdxl-inpaint" for the official shapes, else "sdxl-custom"."""
        for name, cfg in (("sdxl-base", SDXL_BASE), ("sdxl-refiner", SDXL_REFINER), ("sdxl-inpaint", SDXL_INPAINT)):
            if all(mine in (None, theirs) for mine, theirs in
                   ((self.unet, cfg.unet), (self.conditioner, cfg.conditioner), (self.vae, cfg.vae))):
                if self.unet is not None or name == "sdxl-base":
                    return name
        return "sdxl-custom"

    @property
    def is_refiner(self) -> bool:
        return self.conditioner is not None and self.conditioner.clip_l is None


SDXL_BASE = ModelConfig(unet_.SDXL_BASE, SDXL_BASE_CONDITIONER, vae_.SDXL_VAE)
SDXL_REFINER = ModelConfig(unet_.SDXL_REFINER, SDXL_REFINER_CONDITIONER, vae_.SDXL_VAE)
SDXL_INPAINT = ModelConfig(unet_.SDXL_INPAINT, SDXL_BASE_CONDITIONER, vae_.SDXL_VAE)
TINY_BASE = ModelConfig(unet_.TINY_BASE, ConditionerConfig(CLIP_TINY, OPENCLIP_TINY, BASE_MICRO), vae_.TINY_VAE)
TINY_REFINER = ModelConfig(unet_.TINY_REFINER, ConditionerConfig(None, OPENCLIP_TINY, REFINER_MICRO), vae_.TINY_VAE)


class DiffusionWrapper(nn.Module):
    """sgm `OpenAIWrapper`: only here so the UNet's keys start with `model.diffusion_model.`."""

    def __init__(self, unet: UNet):
        super().__init__()
        self.diffusion_model = unet


class SDXLModel(nn.Module):
    """UNet + conditioner + VAE under their official key prefixes (sgm `DiffusionEngine`)."""

    def __init__(self, cfg: ModelConfig = SDXL_BASE, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        if cfg.unet is not None:
            self.model = DiffusionWrapper(UNet(cfg.unet, device, dtype))
        if cfg.conditioner is not None:
            self.conditioner = Conditioner(cfg.conditioner, device, dtype)
        if cfg.vae is not None:
            self.first_stage_model = AutoencoderKL(cfg.vae, device, dtype)

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    def components(self) -> dict[str, nn.Module]:
        """The components present, by name: unet, conditioner, vae."""
        mods = {"unet": getattr(self, "model", None), "conditioner": getattr(self, "conditioner", None),
                "vae": getattr(self, "first_stage_model", None)}
        return {k: (m.diffusion_model if k == "unet" else m) for k, m in mods.items() if m is not None}
