"""The conditioner: text encoders and micro-conditioning -> (crossattn, vector).

A port of sgm's `GeneralConditioner` as configured in sd_xl_base.yaml / sd_xl_refiner.yaml
(SDXL report §2.2; docs/conditioning.md §1). Module paths equal the checkpoint keys below
`conditioner.`: `embedders.N` in the reference order, which fixes the concatenation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sdxl.models.text_encoders import CLIP_L, OPENCLIP_BIGG, CLIPTextEmbedder, OpenCLIPTextEmbedder, TextEncoderConfig
from sdxl.models.unet import timestep_embedding

# How many scalars each micro-conditioning input has (SDXL report §2.2, §2.5).
MICRO_SIZES = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}
BASE_MICRO = ("original_size", "crop_coords_top_left", "target_size")
REFINER_MICRO = ("original_size", "crop_coords_top_left", "aesthetic_score")


@dataclass(frozen=True)
class ConditionerConfig:
    clip_l: TextEncoderConfig | None  # None for the refiner, which has bigG only
    bigg: TextEncoderConfig
    micro: tuple[str, ...] = BASE_MICRO
    fourier_dim: int = 256  # sgm ConcatTimestepEmbedderND(outdim=256)

    @property
    def context_dim(self) -> int:
        return (self.clip_l.width if self.clip_l else 0) + self.bigg.width

    @property
    def vector_dim(self) -> int:
        return self.bigg.proj_dim + self.fourier_dim * sum(MICRO_SIZES[m] for m in self.micro)


def conditioner_config(clip_l: TextEncoderConfig | None, bigg: TextEncoderConfig,
                       adm_in_channels: int | None) -> ConditionerConfig:
    """The conditioner of a checkpoint: base micro-conditioning with CLIP-L, the refiner's without; the Fourier
    width is what the UNet's vector input leaves after the pooled embedding (256 when there is no UNet)."""
    micro = BASE_MICRO if clip_l is not None else REFINER_MICRO
    scalars = sum(MICRO_SIZES[m] for m in micro)
    fourier = 256 if adm_in_channels is None else (adm_in_channels - bigg.proj_dim) // scalars
    return ConditionerConfig(clip_l, bigg, micro, fourier)


SDXL_BASE_CONDITIONER = ConditionerConfig(CLIP_L, OPENCLIP_BIGG, BASE_MICRO)
SDXL_REFINER_CONDITIONER = ConditionerConfig(None, OPENCLIP_BIGG, REFINER_MICRO)


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on: crossattn (B, L, context_dim) and vector (B, adm_in_channels)."""

    crossattn: torch.Tensor
    vector: torch.Tensor

    def __getitem__(self, index) -> "Conditioning":
        return Conditioning(self.crossattn[index], self.vector[index])

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([c.crossattn for c in items]), torch.cat([c.vector for c in items]))


class FourierEmbedder(nn.Module):
    """sgm `ConcatTimestepEmbedderND`: each scalar -> a sinusoidal embedding, concatenated; no parameters."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]  # x: (B, k) -> (B, k * dim)
        return timestep_embedding(x.reshape(-1), self.dim).reshape(b, -1)


class Conditioner(nn.Module):
    """Base: [CLIP-L, bigG, original_size, crop, target]; refiner: [bigG, original_size, crop, aesthetic]."""

    def __init__(self, cfg: ConditionerConfig = SDXL_BASE_CONDITIONER, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        text = [CLIPTextEmbedder(cfg.clip_l, device, dtype)] if cfg.clip_l else []
        text.append(OpenCLIPTextEmbedder(cfg.bigg, device, dtype))
        self.embedders = nn.ModuleList(text + [FourierEmbedder(cfg.fourier_dim) for _ in cfg.micro])

    @property
    def clip_l(self) -> CLIPTextEmbedder | None:
        return self.embedders[0] if self.cfg.clip_l else None

    @property
    def bigg(self) -> OpenCLIPTextEmbedder:
        return self.embedders[1 if self.cfg.clip_l else 0]

    def encode_text(self, tokens_l: torch.Tensor | None, tokens_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, 77) -> crossattn (B, 77, context_dim) = CLIP-L ++ bigG penultimate, and pooled bigG (B, P)."""
        hidden_g, pooled = self.bigg(tokens_g)
        if self.clip_l is None:
            return hidden_g, pooled
        return torch.cat([self.clip_l(tokens_l), hidden_g], dim=-1), pooled

    def encode_micro(self, micro: dict[str, torch.Tensor | tuple | float], batch: int) -> torch.Tensor:
        """Micro-conditioning values by name -> their Fourier features (B, fourier_dim * scalars), in config order."""
        missing = [m for m in self.cfg.micro if m not in micro]
        if missing:
            raise ValueError(f"micro-conditioning needs {', '.join(missing)}")
        parts = []
        for name, emb in zip(self.cfg.micro, self.embedders[-len(self.cfg.micro):]):
            v = torch.as_tensor(micro[name], dtype=torch.float32).reshape(-1, MICRO_SIZES[name])
            parts.append(emb(v.expand(batch, -1)))
        return torch.cat(parts, dim=-1)

    def forward(self, tokens_l: torch.Tensor | None, tokens_g: torch.Tensor, micro: dict, zero_text: bool = False) -> Conditioning:
        """Whole conditioning; `zero_text` zeroes crossattn and pooled (base's empty negative prompt; docs/conditioning.md §3)."""
        crossattn, pooled = self.encode_text(tokens_l, tokens_g)
        if zero_text:
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        vec = self.encode_micro(micro, tokens_g.shape[0]).to(device=pooled.device, dtype=pooled.dtype)
        return Conditioning(crossattn, torch.cat([pooled, vec], dim=-1))
