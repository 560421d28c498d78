"""Parity of our CLIP-L and bigG text encoders with transformers, on tiny random weights."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import reference_shapes
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sdxl.formats.convert import IGNORE, bigg_table, clip_l_table
from sdxl.formats.convert import to_ours, to_theirs
from sdxl.errors import CheckpointError
from sdxl.models.text_encoders import (CLIP_L, CLIP_TINY, OPENCLIP_BIGG, OPENCLIP_TINY, CLIPTextEmbedder,
                                OpenCLIPTextEmbedder, TextEncoderConfig, config_from_shapes)

BOS, EOS = 49406, 49407
FP32_TOL = dict(atol=1e-4, rtol=1e-4)  # seen: max abs error ~2e-6 on values up to ~7
LOW_PRECISION_TOL = 0.03  # vs fp32, max |error| / max |value|: seen ~0.008 in bf16, ~0.001 in fp16


@functools.lru_cache(maxsize=None)
def _hf(cfg: TextEncoderConfig, pad: int, seed: int = 0):
    """A transformers text model matching cfg, random weights incl. biases and LayerNorm affine (shared: do not modify)."""
    hf_cfg = CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_ratio * cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_length,
        hidden_act=cfg.act, layer_norm_eps=cfg.eps, projection_dim=cfg.proj_dim or cfg.width,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=pad, attn_implementation="eager",
    )
    model = (CLIPTextModelWithProjection if cfg.proj_dim else CLIPTextModel)(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.2 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif "embedding" in name:
                p.copy_(0.5 * r)
            else:  # Linear weights: unit gain, so attention is peaked and errors in q/k would show
                p.copy_(r / math.sqrt(p.shape[1]))
    return model


def _theirs_state_dict(model) -> dict[str, torch.Tensor]:
    """The on-disk names: transformers 5.x drops CLIPTextModel's `text_model.` prefix in memory."""
    sd = model.state_dict()
    return sd if isinstance(model, CLIPTextModelWithProjection) else {f"text_model.{k}": v for k, v in sd.items()}


def _tokens(pad: int, lengths=(2, 9, 40, 77), seed: int = 1) -> torch.Tensor:
    """BOS, random words, EOS, then padding; `length` counts BOS and EOS."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        words = torch.randint(0, BOS, (n - 2,), generator=g).tolist()
        rows.append([BOS, *words, EOS] + [pad] * (77 - n))
    return torch.tensor(rows)


def _ours(cls, cfg, hf):
    ours = cls(cfg).eval()
    table = (bigg_table if cls is OpenCLIPTextEmbedder else clip_l_table)(cfg)
    ours.load_state_dict(to_ours(table, _theirs_state_dict(hf)), strict=True)
    return ours


@pytest.mark.parametrize("pad", [EOS, 0])
def test_clip_l_matches_transformers(pad):
    hf = _hf(CLIP_TINY, pad)
    ours = _ours(CLIPTextEmbedder, CLIP_TINY, hf)
    tokens = _tokens(pad)
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True).hidden_states[-2]
        out = ours(tokens)
    print("clip-l penultimate max abs err", (out - ref).abs().max().item())
    torch.testing.assert_close(out, ref, **FP32_TOL)


@pytest.mark.parametrize("pad", [0, EOS])
def test_bigg_matches_transformers(pad):
    hf = _hf(OPENCLIP_TINY, pad)
    ours = _ours(OpenCLIPTextEmbedder, OPENCLIP_TINY, hf)
    tokens = _tokens(pad)
    with torch.no_grad():
        ref = hf(tokens, output_hidden_states=True)
        hidden, pooled = ours(tokens)
    print("bigG penultimate max abs err", (hidden - ref.hidden_states[-2]).abs().max().item(),
          "pooled", (pooled - ref.text_embeds).abs().max().item())
    assert pooled.shape == (4, OPENCLIP_TINY.proj_dim)
    torch.testing.assert_close(hidden, ref.hidden_states[-2], **FP32_TOL)
    torch.testing.assert_close(pooled, ref.text_embeds, **FP32_TOL)


def test_shorter_token_sequences():
    """Fewer than 77 tokens is the same as the first positions of 77 (causal attention)."""
    hf = _hf(OPENCLIP_TINY, 0)
    ours = _ours(OpenCLIPTextEmbedder, OPENCLIP_TINY, hf)
    tokens = _tokens(0, lengths=(5, 12))
    with torch.no_grad():
        full, pooled_full = ours(tokens)
        short, pooled_short = ours(tokens[:, :12])
    torch.testing.assert_close(short, full[:, :12], **FP32_TOL)
    torch.testing.assert_close(pooled_short, pooled_full, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_forward(dtype):
    hf = _hf(OPENCLIP_TINY, 0)
    ours = _ours(OpenCLIPTextEmbedder, OPENCLIP_TINY, hf)
    tokens = _tokens(0)
    with torch.no_grad():
        ref_hidden, ref_pooled = ours(tokens)
        ours.to(dtype)
        hidden, pooled = ours(tokens)
        clip = _ours(CLIPTextEmbedder, CLIP_TINY, _hf(CLIP_TINY, EOS))
        ref_clip = clip(tokens)
        out_clip = clip.to(dtype)(tokens)
    for out, ref in ((hidden, ref_hidden), (pooled, ref_pooled), (out_clip, ref_clip)):
        assert out.dtype == dtype
        rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        print(dtype, "max abs err / max abs value", rel)
        assert rel < LOW_PRECISION_TOL


@pytest.mark.parametrize("cfg", [CLIP_TINY, OPENCLIP_TINY])
def test_table_round_trip_is_exact(cfg):
    hf = _hf(cfg, 0)
    table = (bigg_table if cfg.proj_dim else clip_l_table)(cfg)
    theirs = _theirs_state_dict(hf)
    back = to_theirs(table, to_ours(table, theirs))
    assert back.keys() == theirs.keys()
    for k in theirs:
        assert torch.equal(back[k], theirs[k]), k


def _with_position_ids() -> dict:
    theirs = _theirs_state_dict(_hf(CLIP_TINY, EOS))
    theirs["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return theirs


def test_an_unexpected_tensor_is_an_error():
    with pytest.raises(CheckpointError, match="1 unexpected tensor"):
        to_ours(clip_l_table(CLIP_TINY), _with_position_ids())


def test_ignored_position_ids_load_strictly():
    ours = to_ours(clip_l_table(CLIP_TINY), _with_position_ids(), ignore=IGNORE)
    CLIPTextEmbedder(CLIP_TINY).load_state_dict(ours, strict=True)


def test_a_missing_tensor_is_an_error():
    theirs = _with_position_ids()
    del theirs["text_model.encoder.layers.2.mlp.fc1.bias"]
    with pytest.raises(CheckpointError, match="1 missing tensor"):
        to_ours(clip_l_table(CLIP_TINY), theirs, ignore=IGNORE)


def test_bigg_table_fills_the_unused_logit_scale():
    bigg = to_ours(bigg_table(OPENCLIP_TINY), _theirs_state_dict(_hf(OPENCLIP_TINY, 0)))
    assert bigg["model.logit_scale"].item() == pytest.approx(math.log(1 / 0.07))


@pytest.mark.parametrize("cfg, cls, kind", [
    (CLIP_L, CLIPTextEmbedder, "clip"), (OPENCLIP_BIGG, OpenCLIPTextEmbedder, "openclip"),
    (CLIP_TINY, CLIPTextEmbedder, "clip"), (OPENCLIP_TINY, OpenCLIPTextEmbedder, "openclip"),
    (TextEncoderConfig(width=1024, layers=23, act="gelu", proj_dim=1024), OpenCLIPTextEmbedder, "openclip"),
])
def test_config_from_shapes(cfg, cls, kind):
    shapes = {k: tuple(v.shape) for k, v in cls(cfg, device="meta").state_dict().items()}
    assert config_from_shapes(shapes, kind) == cfg


def test_config_from_shapes_wrong_kind():
    shapes = {k: tuple(v.shape) for k, v in CLIPTextEmbedder(CLIP_TINY, device="meta").state_dict().items()}
    with pytest.raises(CheckpointError, match="missing"):
        config_from_shapes(shapes, "openclip")


@pytest.mark.parametrize("file, prefix, cls, cfg, count", [
    ("sdxl_base_1.0", "conditioner.embedders.0.", CLIPTextEmbedder, CLIP_L, 123_060_480),
    ("sdxl_base_1.0", "conditioner.embedders.1.", OpenCLIPTextEmbedder, OPENCLIP_BIGG, 694_659_841),
    ("sdxl_refiner_1.0", "conditioner.embedders.0.", OpenCLIPTextEmbedder, OPENCLIP_BIGG, 694_659_841),
])
def test_full_size_matches_official_keys(file, prefix, cls, cfg, count):
    """Names and shapes equal the official single-file rows below the embedder prefix (base: CLIP-L, bigG; refiner: bigG)."""
    model = cls(cfg, device="meta")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = {k[len(prefix):]: v for k, v in reference_shapes(file).items() if k.startswith(prefix)}
    assert ours == ref
    assert sum(p.numel() for p in model.parameters()) == count
    tokens = torch.zeros(2, 77, dtype=torch.long, device="meta")
    with torch.no_grad():
        out = model(tokens)
    if cls is OpenCLIPTextEmbedder:
        assert out[0].shape == (2, 77, cfg.width) and out[1].shape == (2, cfg.proj_dim)
    else:
        assert out.shape == (2, 77, cfg.width)


def test_meta_build_allocates_nothing():
    """Full-size encoders built on the meta device hold no storage: every parameter and buffer stays on meta."""
    for model in (OpenCLIPTextEmbedder(OPENCLIP_BIGG, device="meta"), CLIPTextEmbedder(CLIP_L, device="meta")):
        tensors = list(model.parameters()) + list(model.buffers())
        assert tensors and all(t.device.type == "meta" for t in tensors)
