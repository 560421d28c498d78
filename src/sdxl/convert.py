"""The one table-driven converter between diffusers/transformers tensor names and ours.

Ours are the official single-file names (Stability `sgm`). A table is a list of
`Entry`: one of our tensors, the diffusers tensors it is made of, and how. Every
table is generated from a model config, so it lists exactly the tensors that config
has; the same table converts in both directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError


@dataclass(frozen=True)
class Entry:
    ours: str  # key inside our component (no `model.diffusion_model.` style prefix)
    theirs: tuple[str, ...]  # diffusers/transformers keys inside their component folder
    op: str = "copy"  # copy | cat0 (theirs concatenated on dim 0) | transpose | conv1x1 | const
    value: float = 0.0  # for op == "const": ours has no diffusers source (e.g. bigG logit_scale)


def _forward(e: Entry, src: list[torch.Tensor]) -> torch.Tensor:
    if e.op == "copy":
        return src[0]
    if e.op == "cat0":
        return torch.cat(src, 0)
    if e.op == "transpose":
        return src[0].t().contiguous()
    if e.op == "conv1x1":  # Linear [o, i] -> Conv2d 1x1 [o, i, 1, 1]
        return src[0].reshape(*src[0].shape, 1, 1)
    raise ValueError(f"unknown op {e.op}")


def _backward(e: Entry, t: torch.Tensor) -> list[torch.Tensor]:
    if e.op == "copy":
        return [t]
    if e.op == "cat0":
        return [c.contiguous() for c in t.chunk(len(e.theirs), 0)]
    if e.op == "transpose":
        return [t.t().contiguous()]
    if e.op == "conv1x1":
        return [t.reshape(t.shape[0], t.shape[1])]
    raise ValueError(f"unknown op {e.op}")


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
    out = {}
    for e in table:
        if e.op == "const":
            out[e.ours] = torch.tensor(e.value, dtype=torch.float32)
        else:
            out[e.ours] = _forward(e, [theirs[k] for k in e.theirs])
    return out


def to_theirs(table: list[Entry], ours: dict[str, torch.Tensor], name: str = "state dict") -> dict[str, torch.Tensor]:
    """Convert our state dict to diffusers/transformers names (const entries are dropped)."""
    known = {e.ours for e in table}
    _check(name, [e.ours for e in table if e.ours not in ours], [k for k in ours if k not in known])
    out = {}
    for e in table:
        if e.op == "const":
            continue
        for k, t in zip(e.theirs, _backward(e, ours[e.ours])):
            out[k] = t
    return out


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


def unet_table(cfg) -> list[Entry]:
    from .unet import UNet

    pairs = _unet_prefixes(cfg)
    return [Entry(k, (_rename(k, pairs),)) for k in UNet(cfg, device="meta").state_dict()]
