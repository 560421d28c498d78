"""Conversion table: our VAE names (sgm `first_stage_model.`) <-> diffusers `AutoencoderKL` names."""

from __future__ import annotations

from .convert import Entry
from .vae import VAEConfig


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
