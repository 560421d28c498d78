"""Conversion tables: our text encoders <-> transformers CLIP text models (diffusers `text_encoder*/`).

CLIP-L: ours is `transformer.text_model.X`, theirs `text_model.X` (`CLIPTextModel` as saved by
transformers 4.x / in diffusers folders). bigG: ours uses open_clip names, theirs the
`CLIPTextModelWithProjection` names; q/k/v are fused into in_proj, text_projection is
transposed (open_clip multiplies `x @ P`, nn.Linear stores P.T), and logit_scale has no source.
"""

from __future__ import annotations

import math

from .convert import Entry
from .text_encoders import TextEncoderConfig

# Files written by transformers < 4.31 also carry this int buffer; pass as `to_ours(..., ignore=IGNORE)`.
IGNORE = ("text_model.embeddings.position_ids",)

_CLIP_LAYER = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
               "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")


def clip_l_table(cfg: TextEncoderConfig) -> list[Entry]:
    """Our CLIPTextEmbedder <-> transformers CLIPTextModel: the same names under another prefix."""
    names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
    names += [f"encoder.layers.{i}.{m}.{p}" for i in range(cfg.layers) for m in _CLIP_LAYER for p in ("weight", "bias")]
    names += ["final_layer_norm.weight", "final_layer_norm.bias"]
    return [Entry(f"transformer.text_model.{n}", (f"text_model.{n}",)) for n in names]


def bigg_table(cfg: TextEncoderConfig) -> list[Entry]:
    """Our OpenCLIPTextEmbedder <-> transformers CLIPTextModelWithProjection."""
    t = [Entry("model.token_embedding.weight", ("text_model.embeddings.token_embedding.weight",)),
         Entry("model.positional_embedding", ("text_model.embeddings.position_embedding.weight",))]
    for i in range(cfg.layers):
        ours, theirs = f"model.transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            t.append(Entry(f"{ours}attn.in_proj_{p}", tuple(f"{theirs}self_attn.{x}_proj.{p}" for x in "qkv"), "cat0"))
            t += [Entry(f"{ours}{a}.{p}", (f"{theirs}{b}.{p}",)) for a, b in (
                ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))]
    t += [Entry(f"model.ln_final.{p}", (f"text_model.final_layer_norm.{p}",)) for p in ("weight", "bias")]
    t.append(Entry("model.text_projection", ("text_projection.weight",), "transpose"))
    # open_clip's initial value; diffusers drops it, SDXL never uses it (dropped again by to_theirs)
    t.append(Entry("model.logit_scale", (), "const", math.log(1 / 0.07)))
    return t
