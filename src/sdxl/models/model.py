"""A whole SDXL checkpoint as one module: its state_dict keys are the official single-file keys.

`model.diffusion_model.*` (UNet), `conditioner.embedders.N.*` (text encoders and micro-conditioning),
`first_stage_model.*` (VAE), as in sgm's `DiffusionEngine`. A component may be absent (a UNet-only file, a VAE).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sdxl.models import unet as unet_
from sdxl.models import vae as vae_
from sdxl.models.conditioning import (BASE_MICRO, REFINER_MICRO, SDXL_BASE_CONDITIONER, SDXL_REFINER_CONDITIONER,
                                      Conditioner, ConditionerConfig)
from sdxl.models.text_encoders import CLIP_TINY, OPENCLIP_TINY
from sdxl.models.unet import UNet, UNetConfig
from sdxl.models.vae import AutoencoderKL, VAEConfig

PREFIXES = {"unet": "model.diffusion_model.", "conditioner": "conditioner.", "vae": "first_stage_model."}


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig | None
    conditioner: ConditionerConfig | None
    vae: VAEConfig | None
    # what the UNet predicts: "epsilon" (SDXL) or "v"; zero_terminal_snr: trained on betas rescaled to zero SNR at
    # the last timestep (Lin et al. 2024, Alg. 1). Files say so by `v_pred` and `ztsnr` keys (formats/checkpoint.py).
    prediction: str = "epsilon"
    zero_terminal_snr: bool = False

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

# The sizes the official base was trained at: the report's multi-aspect buckets (SDXL report, Appendix I),
# pixel (width, height). `sdxl.train.data.make_buckets(1024, 64, 4.0)` gives all but 1024x960 and 960x1024.
BUCKETS = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
           (1536, 640), (640, 1536), (1088, 960), (960, 1088), (1280, 768), (768, 1280), (1408, 704), (704, 1408),
           (1472, 704), (704, 1472), (1600, 640), (640, 1600), (1664, 576), (576, 1664), (1728, 576), (576, 1728),
           (1792, 576), (576, 1792), (1856, 512), (512, 1856), (1920, 512), (512, 1920), (1984, 512), (512, 1984),
           (2048, 512), (512, 2048), (1024, 960), (960, 1024))


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

    @classmethod
    def from_parts(cls, unet: UNet | None = None, conditioner: Conditioner | None = None,
                   vae: AutoencoderKL | None = None, like: ModelConfig | None = None) -> "SDXLModel":
        """A model holding these modules (shared, not copied); its config is theirs, with the prediction type and
        zero terminal SNR of `like` (the model they come from) if given."""
        model = cls(ModelConfig(None, None, None))
        sampling = (like.prediction, like.zero_terminal_snr) if like is not None else ()
        model.cfg = ModelConfig(*(None if m is None else m.cfg for m in (unet, conditioner, vae)), *sampling)
        wrapped = None if unet is None else DiffusionWrapper(unet)
        for key, part in (("model", wrapped), ("conditioner", conditioner), ("first_stage_model", vae)):
            if part is not None:
                setattr(model, key, part)
        return model

    @property
    def unet(self) -> UNet:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    def components(self) -> dict[str, nn.Module]:
        """The components present, by name: unet, conditioner, vae."""
        keys = {"unet": "model", "conditioner": "conditioner", "vae": "first_stage_model"}
        return {name: getattr(self, name) for name, key in keys.items() if hasattr(self, key)}
