"""The conditioner: text encoders and micro-conditioning -> (crossattn, vector).

A port of sgm's `GeneralConditioner` as configured in sd_xl_base.yaml / sd_xl_refiner.yaml (SDXL report §2.2;
docs/conditioning.md §1). Module paths equal the checkpoint keys below `conditioner.`: `embedders.N` in the reference
order, which fixes the concatenation order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from sdxl.errors import SDXLError
from sdxl.models.prompts import TokenWindows, apply_weights, tokenize
from sdxl.models.text_encoders import CLIP_L, OPENCLIP_BIGG, CLIPTextEmbedder, OpenCLIPTextEmbedder, TextEncoderConfig
from sdxl.models.tokenizer import MAX_LENGTH, PAD_BIGG, PAD_CLIP_L, Tokenizer
from sdxl.models.unet import timestep_embedding

# How many scalars each micro-conditioning input has (SDXL report §2.2, §2.5).
MICRO_SIZES = {"original_size": 2, "crop_coords_top_left": 2, "target_size": 2, "aesthetic_score": 1}
BASE_MICRO = ("original_size", "crop_coords_top_left", "target_size")
REFINER_MICRO = ("original_size", "crop_coords_top_left", "aesthetic_score")
Prompt = tuple[str, "str | None"]  # (prompt, prompt_2 for bigG: None = the same)


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
        return timestep_embedding(x.reshape(-1), self.dim).reshape(x.shape[0], -1)  # (B, k) -> (B, k * dim)


class Conditioner(nn.Module):
    """Base: [CLIP-L, bigG, original_size, crop, target]; refiner: [bigG, original_size, crop, aesthetic]."""

    def __init__(self, cfg: ConditionerConfig = SDXL_BASE_CONDITIONER, device=None, dtype=None):
        text = [CLIPTextEmbedder(cfg.clip_l, device, dtype)] if cfg.clip_l else []
        self._assemble(cfg, text + [OpenCLIPTextEmbedder(cfg.bigg, device, dtype)])

    @classmethod
    def from_parts(cls, cfg: ConditionerConfig, bigg: OpenCLIPTextEmbedder,
                   clip_l: CLIPTextEmbedder | None = None) -> "Conditioner":
        """A conditioner around these text encoders (shared, not copied), with `cfg`'s micro-conditioning."""
        given = (None if clip_l is None else clip_l.cfg, bigg.cfg)
        if given != (cfg.clip_l, cfg.bigg):
            raise ValueError(f"Conditioner.from_parts: encoders {given} do not match the config's "
                             f"{(cfg.clip_l, cfg.bigg)}")
        conditioner = cls.__new__(cls)
        conditioner._assemble(cfg, ([clip_l] if clip_l is not None else []) + [bigg])
        return conditioner

    def _assemble(self, cfg: ConditionerConfig, text: list[nn.Module]) -> None:
        nn.Module.__init__(self)
        self.cfg = cfg
        self.embedders = nn.ModuleList(text + [FourierEmbedder(cfg.fourier_dim) for _ in cfg.micro])

    @property
    def clip_l(self) -> CLIPTextEmbedder | None:
        return self.embedders[0] if self.cfg.clip_l else None

    @property
    def bigg(self) -> OpenCLIPTextEmbedder:
        return self.embedders[1 if self.cfg.clip_l else 0]

    @property
    def zeroes_empty_text(self) -> bool:
        """The base's empty prompt is the zero embedding, the refiner's the encoding of "" (docs/conditioning.md §3:
        sgm's `force_uc_zero_embeddings=["txt"]`, diffusers' `force_zeros_for_empty_prompt`)."""
        return self.cfg.clip_l is not None

    @property
    def device(self) -> torch.device:
        return self.bigg.model.token_embedding.weight.device

    def encode_text(self, tokens_l: torch.Tensor | None, tokens_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, 77) -> crossattn (B, 77, context_dim) = CLIP-L ++ bigG penultimate, and pooled bigG (B, P)."""
        hidden_g, pooled = self.bigg(tokens_g)
        if self.clip_l is None:
            return hidden_g, pooled
        return torch.cat([self.clip_l(tokens_l), hidden_g], dim=-1), pooled

    @torch.no_grad()
    def encode_captions(self, captions: list[str], tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Literal captions (no weighting syntax, one 77-token window each) -> as `encode_text`, without gradients:
        what the training cache stores."""
        tokens_l = tokenizer(captions, PAD_CLIP_L).to(self.device) if self.clip_l else None
        return self.encode_text(tokens_l, tokenizer(captions, PAD_BIGG).to(self.device))

    def encode_prompt(self, prompt: str, prompt_2: str | None, tokenizer: Tokenizer,
                      min_windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """A weighted, long prompt (sdxl.models.prompts) -> crossattn (1, 77 * windows, C), pooled (1, P) from the
        first window; `prompt_2` (default: `prompt`) goes to bigG. Both encoders get the same number of windows."""
        text_g = prompt_2 if prompt_2 is not None else prompt
        w_g = tokenize(text_g, tokenizer, PAD_BIGG, min_windows)
        w_l = tokenize(prompt, tokenizer, PAD_CLIP_L, max(min_windows, len(w_g.ids))) if self.clip_l else None
        if w_l is not None and len(w_l.ids) > len(w_g.ids):
            w_g = tokenize(text_g, tokenizer, PAD_BIGG, len(w_l.ids))
        hidden_g, pooled = _encoded(self.bigg, w_g, "clip_g")
        parts = [_weighted(hidden_g, w_g)]
        if w_l is not None:
            parts.insert(0, _weighted(_encoded(self.clip_l, w_l, "clip_l"), w_l))
        crossattn = torch.cat(parts, dim=-1)  # (windows, 77, C)
        return crossattn.reshape(1, -1, crossattn.shape[-1]), pooled[:1]

    def encode_prompts(self, prompts: list[Prompt], tokenizer: Tokenizer,
                       min_windows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """One (prompt, prompt_2) per batch row -> crossattn (B, 77 * windows, C), pooled (B, P); shorter prompts get
        empty windows up to the longest (as A1111 pads a batch), each distinct prompt is encoded once."""
        encode = functools.cache(lambda p, windows: self.encode_prompt(*p, tokenizer, windows))
        first = [encode(p, min_windows) for p in prompts]
        windows = max(x.shape[1] for x, _ in first) // MAX_LENGTH
        rows = [encode(p, windows) for p in prompts]
        if len(set(prompts)) == 1:  # one prompt for the whole batch: a view, not copies
            return rows[0][0].expand(len(rows), -1, -1), rows[0][1].expand(len(rows), -1)
        return torch.cat([x for x, _ in rows]), torch.cat([p for _, p in rows])

    def encode_micro(self, micro: dict[str, torch.Tensor | tuple | float], batch: int) -> torch.Tensor:
        """Micro-conditioning values by name -> their Fourier features (B, fourier_dim * scalars), in config order."""
        missing = [m for m in self.cfg.micro if m not in micro]
        if missing:
            raise ValueError(f"micro-conditioning needs {', '.join(missing)}")
        values = [torch.as_tensor(micro[m], dtype=torch.float32).reshape(-1, MICRO_SIZES[m]) for m in self.cfg.micro]
        fourier = self.embedders[-len(values):]
        return torch.cat([emb(v.expand(batch, -1)) for emb, v in zip(fourier, values)], dim=-1)

    def forward(self, crossattn: torch.Tensor, pooled: torch.Tensor, micro: dict,
                empty: torch.Tensor | bool = False) -> Conditioning:
        """Text embeddings + micro-conditioning -> Conditioning; the one place training and inference meet. Rows
        marked `empty` stand for the empty prompt (a dropped caption, an empty negative prompt): the base zeroes their
        crossattn and pooled, the refiner keeps the encoding of "" given (docs/conditioning.md §3). vector = pooled ++
        Fourier(micro) in embedder order (§1)."""
        if self.zeroes_empty_text:
            empty = torch.as_tensor(empty, device=pooled.device).expand(pooled.shape[0])
            crossattn = torch.where(empty[:, None, None], crossattn.new_zeros(()), crossattn)
            pooled = torch.where(empty[:, None], pooled.new_zeros(()), pooled)
        vec = self.encode_micro(micro, pooled.shape[0]).to(device=pooled.device, dtype=pooled.dtype)
        return Conditioning(crossattn, torch.cat([pooled, vec], dim=-1))

    @torch.no_grad()
    def guided(self, tokenizer: Tokenizer, prompts: list[Prompt], micro: dict, negatives: list[Prompt] | None,
               negative_micro: dict | None = None) -> tuple[Conditioning, Conditioning | None]:
        """Inference: (cond, uncond) for one prompt per row; uncond None without guidance (`negatives` None). An
        empty negative prompt is the empty prompt; positive and negative get the same number of windows."""
        c_x, c_p = self.encode_prompts(prompts, tokenizer)
        if negatives is None:
            return self(c_x, c_p, micro), None
        empty = torch.tensor([not (n or n2) for n, n2 in negatives], device=c_p.device)
        if self.zeroes_empty_text and bool(empty.all()):  # nothing to encode: the positive's shapes, zeroed
            return self(c_x, c_p, micro), self(c_x, c_p, negative_micro, empty=True)
        u_x, u_p = self.encode_prompts(negatives, tokenizer, c_x.shape[1] // MAX_LENGTH)
        if u_x.shape[1] > c_x.shape[1]:  # the negative prompt is longer: pad the positive with empty windows
            c_x, c_p = self.encode_prompts(prompts, tokenizer, u_x.shape[1] // MAX_LENGTH)
        return self(c_x, c_p, micro), self(u_x, u_p, negative_micro, empty=empty)


def _encoded(encoder: nn.Module, windows: TokenWindows, which: str):
    """An encoder's output for token windows, with the vectors of the embeddings they hold (`which`: the encoder's
    tensor of an embedding, "clip_l" or "clip_g") in place of their tokens' embeddings."""
    ids = windows.ids.to(encoder.token_embedding.weight.device)
    if not windows.fixes:
        return encoder(ids)
    embeds = encoder.token_embedding(ids)  # (windows, 77, W)
    for window, position, embedding in windows.fixes:
        vectors = getattr(embedding, which)
        embeds[window, position:position + len(vectors)] = vectors.to(embeds)  # device and dtype
    return encoder(ids, embeds)


def _weighted(hidden: torch.Tensor, windows: TokenWindows) -> torch.Tensor:
    """Hidden states (windows, 77, W) with A1111's emphasis applied per window when the prompt has weights."""
    if not windows.weighted:
        return hidden
    return torch.stack([apply_weights(h, w.to(hidden.device)) for h, w in zip(hidden, windows.weights)])


def prompt_rows(prompt: str | tuple[str, ...], prompt_2: str | tuple[str | None, ...] | None,
                batch: int) -> list[Prompt]:
    """(prompt, prompt_2) per batch row: a string applies to every row, a tuple gives one per row."""
    def rows(value, name: str) -> list:
        if value is None or isinstance(value, str):
            return [value] * batch
        if len(value) != batch:
            raise SDXLError(f"{name}: {len(value)} prompts for a batch of {batch}; give one per image or a single one")
        return list(value)

    return list(zip(rows(prompt, "prompt"), rows(prompt_2, "prompt_2")))


def micro_values(height: int, width: int, original_size: tuple[int, int] | None = None,
                 crop: tuple[int, int] = (0, 0), target_size: tuple[int, int] | None = None,
                 aesthetic_score: float = 6.0) -> dict:
    """Micro-conditioning of an image of height x width (report §2.2; docs/conditioning.md §2): sizes default to it,
    crop to (0, 0); the aesthetic score is the refiner's (sgm's default 6)."""
    return {"original_size": original_size or (height, width), "crop_coords_top_left": crop,
            "target_size": target_size or (height, width), "aesthetic_score": aesthetic_score}
