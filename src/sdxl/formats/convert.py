"""The one table-driven converter between diffusers/transformers tensor names and ours.

Ours are the official single-file names (Stability `sgm`). A table is a list of
`Entry`: one of our tensors, the diffusers tensors it is made of, and how. Every
table is generated from a model config, so it lists exactly the tensors that config
has; the same table converts in both directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sdxl.errors import CheckpointError
from sdxl.models.text_encoders import TextEncoderConfig
from sdxl.models.unet import UNet, UNetConfig
from sdxl.models.vae import VAEConfig


@dataclass(frozen=True)
class Entry:
    ours: str  # key inside our component (no `model.diffusion_model.` style prefix)
    theirs: tuple[str, ...]  # diffusers/transformers keys inside their component folder
    op: str = "copy"  # copy | cat0 (theirs concatenated on dim 0) | transpose | conv1x1 | const
    value: float = 0.0  # for op == "const": ours has no diffusers source (e.g. bigG logit_scale)


# op -> (ours from theirs, theirs from ours); conv1x1: Linear [o, i] <-> Conv2d 1x1 [o, i, 1, 1]; const: none in theirs
_OPS = {
    "copy": (lambda e, src: src[0], lambda e, t: [t]),
    "cat0": (lambda e, src: torch.cat(src, 0), lambda e, t: [c.contiguous() for c in t.chunk(len(e.theirs), 0)]),
    "transpose": (lambda e, src: src[0].t().contiguous(), lambda e, t: [t.t().contiguous()]),
    "conv1x1": (lambda e, src: src[0].reshape(*src[0].shape, 1, 1), lambda e, t: [t.reshape(t.shape[:2])]),
    "const": (lambda e, src: torch.tensor(e.value, dtype=torch.float32), lambda e, t: []),
}


def _check(name: str, missing: list[str], unexpected: list[str]) -> None:
    if missing or unexpected:
        raise CheckpointError.keys(name, missing, unexpected)


def check(table: list[Entry], theirs, ignore: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(missing, unexpected) diffusers/transformers keys of `theirs` against the table."""
    wanted = {k for e in table for k in e.theirs}
    missing = [k for e in table for k in e.theirs if k not in theirs]
    unexpected = [k for k in theirs if k not in wanted and not k.endswith(ignore)]
    return missing, unexpected


def to_ours(table: list[Entry], theirs, name: str = "state dict", ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Convert a diffusers/transformers state dict to our names; strict both ways (`ignore`: tolerated key suffixes)."""
    _check(name, *check(table, theirs, ignore))
    return {e.ours: _OPS[e.op][0](e, [theirs[k] for k in e.theirs]) for e in table}


def to_theirs(table: list[Entry], ours: dict[str, torch.Tensor], name: str = "state dict") -> dict[str, torch.Tensor]:
    """Convert our state dict to diffusers/transformers names (const entries are dropped)."""
    known = {e.ours for e in table}
    _check(name, [e.ours for e in table if e.ours not in ours], [k for k in ours if k not in known])
    return {k: t for e in table for k, t in zip(e.theirs, _OPS[e.op][1](e, ours[e.ours]))}


# --- UNet: ours (sgm openaimodel) <-> diffusers UNet2DConditionModel -------------------------

_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _unet_prefixes(cfg) -> list[tuple[str, str]]:
    """(our prefix, diffusers prefix) pairs; the block index arithmetic of diffusers' SDXL conversion."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    pairs = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
             ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2."),
             ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
             ("middle_block.1.", "mid_block.attentions.0.")]
    pairs += [(f"middle_block.{2 * j}.{a}.", f"mid_block.resnets.{j}.{b}.") for j in range(2) for a, b in _RESNET.items()]
    for level in range(levels):
        for j in range(n):
            i = 1 + level * (n + 1) + j
            pairs += [(f"input_blocks.{i}.0.{a}.", f"down_blocks.{level}.resnets.{j}.{b}.") for a, b in _RESNET.items()]
            pairs.append((f"input_blocks.{i}.1.", f"down_blocks.{level}.attentions.{j}."))
        pairs.append((f"input_blocks.{(level + 1) * (n + 1)}.0.op.", f"down_blocks.{level}.downsamplers.0.conv."))
    for up in range(levels):
        has_attn = cfg.transformer_depth[levels - 1 - up] > 0
        for j in range(n + 1):
            i = up * (n + 1) + j
            pairs += [(f"output_blocks.{i}.0.{a}.", f"up_blocks.{up}.resnets.{j}.{b}.") for a, b in _RESNET.items()]
            pairs.append((f"output_blocks.{i}.1.", f"up_blocks.{up}.attentions.{j}."))
        pairs.append((f"output_blocks.{up * (n + 1) + n}.{2 if has_attn else 1}.conv.", f"up_blocks.{up}.upsamplers.0.conv."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    best = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    if best is None:
        raise KeyError(f"no conversion rule for {key}")
    return best[1] + key[len(best[0]):]


def unet_table(cfg: UNetConfig) -> list[Entry]:
    """Every UNet tensor of `cfg` and its diffusers name."""
    pairs = _unet_prefixes(cfg)
    return [Entry(k, (_rename(k, pairs),)) for k in UNet(cfg, device="meta").state_dict()]


# --- VAE: ours (sgm first_stage_model) <-> diffusers AutoencoderKL --------------------------

def _wb(ours: str, theirs: str, op: str = "copy") -> list[Entry]:
    """Weight and bias of one layer; `op` applies to the weight (biases are always copied)."""
    return [Entry(f"{ours}.weight", (f"{theirs}.weight",), op), Entry(f"{ours}.bias", (f"{theirs}.bias",))]


def _resnet(ours: str, theirs: str, c_in: int, c_out: int) -> list[Entry]:
    out = []
    for name in ("norm1", "conv1", "norm2", "conv2"):
        out += _wb(f"{ours}.{name}", f"{theirs}.{name}")
    if c_in != c_out:
        out += _wb(f"{ours}.nin_shortcut", f"{theirs}.conv_shortcut")
    return out


def _mid(ours: str, theirs: str, c: int) -> list[Entry]:
    out = _resnet(f"{ours}.block_1", f"{theirs}.resnets.0", c, c)
    out += _wb(f"{ours}.attn_1.norm", f"{theirs}.attentions.0.group_norm")
    for o, t in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        out += _wb(f"{ours}.attn_1.{o}", f"{theirs}.attentions.0.{t}", "conv1x1")  # Linear -> 1x1 conv
    return out + _resnet(f"{ours}.block_2", f"{theirs}.resnets.1", c, c)


def vae_table(cfg: VAEConfig) -> list[Entry]:
    """Every VAE tensor of `cfg`; diffusers' `decoder.up_blocks` run in the reverse order of `decoder.up`."""
    widths = [cfg.ch * m for m in cfg.ch_mult]
    n = len(widths)
    t = _wb("encoder.conv_in", "encoder.conv_in")
    c = cfg.ch
    for i, w in enumerate(widths):
        for j in range(cfg.num_res_blocks):
            t += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", c, w)
            c = w
        if i != n - 1:
            t += _wb(f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv")
    t += _mid("encoder.mid", "encoder.mid_block", c)
    t += _wb("encoder.norm_out", "encoder.conv_norm_out")
    t += _wb("encoder.conv_out", "encoder.conv_out")
    t += _wb("quant_conv", "quant_conv")
    t += _wb("post_quant_conv", "post_quant_conv")
    t += _wb("decoder.conv_in", "decoder.conv_in")
    t += _mid("decoder.mid", "decoder.mid_block", c)
    for i in reversed(range(n)):
        k = n - 1 - i  # diffusers index of our level i
        for j in range(cfg.num_res_blocks + 1):
            t += _resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{k}.resnets.{j}", c, widths[i])
            c = widths[i]
        if i != 0:
            t += _wb(f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{k}.upsamplers.0.conv")
    t += _wb("decoder.norm_out", "decoder.conv_norm_out")
    t += _wb("decoder.conv_out", "decoder.conv_out")
    return t


# --- text encoders: ours <-> transformers CLIPTextModel / CLIPTextModelWithProjection ---------
# CLIP-L: ours is `transformer.text_model.X`, theirs `text_model.X` (`CLIPTextModel` as saved by
# transformers 4.x / in diffusers folders). bigG: ours uses open_clip names, theirs the
# `CLIPTextModelWithProjection` names; q/k/v are fused into in_proj, text_projection is
# transposed (open_clip multiplies `x @ P`, nn.Linear stores P.T), and logit_scale has no source.

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
