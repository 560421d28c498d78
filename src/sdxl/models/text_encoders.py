"""The two SDXL text encoders: OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers.

Ports sgm `FrozenCLIPEmbedder` (layer="hidden", layer_idx=11) and `FrozenOpenCLIPEmbedder2` (layer="penultimate",
always_return_pooled) from `sgm/modules/encoders/modules.py`. Module paths equal the single-file checkpoint keys below
`conditioner.embedders.N.`: CLIP-L keeps the transformers `CLIPTextModel` names, bigG the open_clip names. Both are
the same pre-LN causal transformer; only names, activation and bigG's fused q/k/v (`in_proj_weight`) differ.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.errors import CheckpointError

HEAD_DIM = 64  # both towers use 64-wide heads: heads = width / 64


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int
    layers: int
    act: Literal["quick_gelu", "gelu"]
    proj_dim: int | None = None  # text_projection output (bigG pooled); None: no projection
    vocab_size: int = 49408
    max_length: int = 77
    mlp_ratio: int = 4
    eps: float = 1e-5

    def __post_init__(self):
        if self.width % HEAD_DIM:
            raise ValueError(f"text encoder width {self.width} is not a multiple of {HEAD_DIM}")
        if self.act not in ("quick_gelu", "gelu"):
            raise ValueError(f"unknown activation {self.act!r}")

    @property
    def heads(self) -> int:
        return self.width // HEAD_DIM


CLIP_L = TextEncoderConfig(width=768, layers=12, act="quick_gelu")
OPENCLIP_BIGG = TextEncoderConfig(width=1280, layers=32, act="gelu", proj_dim=1280)
# Small configs for tests: 2 heads, projection to another width so a transposed projection shows.
CLIP_TINY = TextEncoderConfig(width=128, layers=3, act="quick_gelu")
OPENCLIP_TINY = TextEncoderConfig(width=128, layers=3, act="gelu", proj_dim=96)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _mlp(cfg: TextEncoderConfig, fc: str, proj: str, device=None, dtype=None) -> nn.Sequential:
    """Linear to mlp_ratio * width, activation (gelu: the exact erf form, open_clip's nn.GELU), Linear back; the
    linears named as in the checkpoint: transformers `CLIPMLP` (fc1, fc2), open_clip's `mlp` (c_fc, c_proj)."""
    W, H, kw = cfg.width, cfg.mlp_ratio * cfg.width, dict(device=device, dtype=dtype)
    act = QuickGELU() if cfg.act == "quick_gelu" else nn.GELU()
    return nn.Sequential(OrderedDict([(fc, nn.Linear(W, H, **kw)), ("act", act), (proj, nn.Linear(H, W, **kw))]))


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal multi-head attention of (B, T, W) projections; returns (B, T, W) before out_proj."""
    B, T, W = q.shape
    q, k, v = (t.view(B, T, heads, W // heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, W)


def _normal_(t: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """`nn.init.normal_`, skipped on the meta device (where it imports torch._dynamo, a second per process)."""
    return t if t.device.type == "meta" else nn.init.normal_(t, std=std)


def _embedding(n: int, width: int, device=None, dtype=None) -> nn.Embedding:
    """`nn.Embedding` initialised as torch does (N(0, 1)), not initialised on the meta device."""
    return nn.Embedding(n, width, _weight=_normal_(torch.empty(n, width, device=device, dtype=dtype)))


def _check_tokens(tokens: torch.Tensor, max_length: int) -> None:
    if tokens.ndim != 2 or tokens.shape[1] > max_length:
        raise ValueError(f"tokens must be (batch, <= {max_length}), got {tuple(tokens.shape)}")


def _container(**children: nn.Module) -> nn.Module:
    """An empty module holding children, so attribute paths spell the checkpoint keys."""
    m = nn.Module()
    for name, child in children.items():
        setattr(m, name, child)
    return m


# --- CLIP ViT-L/14 (transformers CLIPTextModel names) -------------------------------------------

class CLIPAttention(nn.Module):
    """transformers `CLIPAttention`, causal."""

    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        W, kw = cfg.width, dict(device=device, dtype=dtype)
        self.heads = cfg.heads
        self.k_proj, self.v_proj = nn.Linear(W, W, **kw), nn.Linear(W, W, **kw)
        self.q_proj, self.out_proj = nn.Linear(W, W, **kw), nn.Linear(W, W, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(_causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPEncoderLayer(nn.Module):
    """transformers `CLIPEncoderLayer`: pre-LN attention and MLP, each residual."""

    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps, **kw)
        self.mlp = _mlp(cfg, "fc1", "fc2", **kw)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextEmbedder(nn.Module):
    """sgm `FrozenCLIPEmbedder` with layer="hidden", layer_idx=11: CLIP-L penultimate hidden states."""

    def __init__(self, cfg: TextEncoderConfig = CLIP_L, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        text_model = _container(
            embeddings=_container(token_embedding=_embedding(cfg.vocab_size, cfg.width, **kw),
                                  position_embedding=_embedding(cfg.max_length, cfg.width, **kw)),
            encoder=_container(layers=nn.ModuleList(CLIPEncoderLayer(cfg, **kw) for _ in range(cfg.layers))),
            # in the checkpoint but unused: SDXL takes hidden_states[11] of 12, before this norm
            final_layer_norm=nn.LayerNorm(cfg.width, eps=cfg.eps, **kw),
        )
        self.transformer = _container(text_model=text_model)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.transformer.text_model.embeddings.token_embedding

    def forward(self, tokens: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, W) output of all layers but the last, no final LayerNorm. `embeds`: (B, T, W)
        token embeddings to use instead of the ids' (textual inversion; transformers' `inputs_embeds`)."""
        _check_tokens(tokens, self.cfg.max_length)
        tm = self.transformer.text_model
        x = (tm.embeddings.token_embedding(tokens) if embeds is None else embeds) \
            + tm.embeddings.position_embedding.weight[: tokens.shape[1]]
        for layer in tm.encoder.layers[:-1]:  # the last layer's output is never used
            x = layer(x)
        return x


# --- OpenCLIP ViT-bigG/14 (open_clip names) ----------------------------------------------------

class MultiheadSelfAttention(nn.Module):
    """The parameters of `nn.MultiheadAttention` (fused in_proj, as in the checkpoint), causal."""

    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        W, kw = cfg.width, dict(device=device, dtype=dtype)
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * W, W, **kw))  # rows: q, k, v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * W, **kw))
        self.out_proj = nn.Linear(W, W, **kw)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(F.linear(x, self.in_proj_weight, self.in_proj_bias))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Fused projections (B, T, 3W) -> attention output (B, T, W); LoRA adds its deltas before this."""
        q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, T, W)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class ResidualAttentionBlock(nn.Module):
    """open_clip `ResidualAttentionBlock`: pre-LN attention and MLP, each residual."""

    def __init__(self, cfg: TextEncoderConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps, **kw)
        self.attn = MultiheadSelfAttention(cfg, **kw)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps, **kw)
        self.mlp = _mlp(cfg, "c_fc", "c_proj", **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextEmbedder(nn.Module):
    """sgm `FrozenOpenCLIPEmbedder2` (layer="penultimate", pooled): bigG hidden states and pooled embedding."""

    def __init__(self, cfg: TextEncoderConfig = OPENCLIP_BIGG, device=None, dtype=None):
        super().__init__()
        if cfg.proj_dim is None:
            raise ValueError("OpenCLIPTextEmbedder needs a config with proj_dim")
        W, kw = cfg.width, dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.model = _container(
            token_embedding=_embedding(cfg.vocab_size, W, **kw),
            positional_embedding=nn.Parameter(torch.empty(cfg.max_length, W, **kw)),
            transformer=_container(resblocks=nn.ModuleList(ResidualAttentionBlock(cfg, **kw)
                                                           for _ in range(cfg.layers))),
            ln_final=nn.LayerNorm(W, eps=cfg.eps, **kw),
            text_projection=nn.Parameter(torch.empty(W, cfg.proj_dim, **kw)),  # used as x @ text_projection
            logit_scale=nn.Parameter(torch.full((), math.log(1 / 0.07), **kw)),  # CLIP loss temperature, unused here
        )
        # open_clip `TextTransformer.init_parameters`; real weights come from a checkpoint
        _normal_(self.model.token_embedding.weight, std=0.02)
        _normal_(self.model.positional_embedding, std=0.01)
        _normal_(self.model.text_projection, std=W ** -0.5)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.model.token_embedding

    def forward(self, tokens: torch.Tensor, embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) token ids -> ((B, T, W) penultimate layer output, no ln_final; (B, P) pooled at the EOS = argmax
        token). `embeds`: (B, T, W) token embeddings to use instead of the ids' (the ids still place the EOS)."""
        _check_tokens(tokens, self.cfg.max_length)
        m = self.model
        x = (m.token_embedding(tokens) if embeds is None else embeds) + m.positional_embedding[: tokens.shape[1]]
        for block in m.transformer.resblocks[:-1]:
            x = block(x)
        penultimate = x
        x = m.transformer.resblocks[-1](x)
        eos = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # (B, W)
        pooled = m.ln_final(eos) @ m.text_projection  # LayerNorm is per token: norm only the EOS rows
        return penultimate, pooled


# --- configs from checkpoint shapes ------------------------------------------------------------

# kind -> key prefix, token embedding, position embedding, layer pattern, first MLP weight, activation, projection
_SHAPE_KEYS = {
    "clip": ("transformer.text_model.", "embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
             r"encoder\.layers\.(\d+)\.", "encoder.layers.0.mlp.fc1.weight", "quick_gelu", None),
    "openclip": ("model.", "token_embedding.weight", "positional_embedding", r"transformer\.resblocks\.(\d+)\.",
                 "transformer.resblocks.0.mlp.c_fc.weight", "gelu", "text_projection"),
}


def config_from_shapes(shapes: dict[str, tuple[int, ...]], kind: Literal["clip", "openclip"]) -> TextEncoderConfig:
    """The config of a CLIP ("clip", transformers names) or OpenCLIP ("openclip") text tower from its tensor shapes,
    keys relative to the embedder (`transformer.text_model.…` or `model.…`); the activation is the family's."""
    if kind not in _SHAPE_KEYS:
        raise ValueError(f"unknown text encoder kind {kind!r}")
    pre, token, pos, layer_re, fc, act, proj = _SHAPE_KEYS[kind]
    missing = [pre + k for k in (token, pos, fc, proj) if k and pre + k not in shapes]
    if missing:
        raise CheckpointError.keys(f"{kind} text encoder", missing, [])
    vocab, width = shapes[pre + token]
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(re.escape(pre) + layer_re, k)))
    return TextEncoderConfig(width=width, layers=layers, act=act, vocab_size=vocab, max_length=shapes[pre + pos][0],
                             mlp_ratio=shapes[pre + fc][0] // width, proj_dim=shapes[pre + proj][1] if proj else None)
