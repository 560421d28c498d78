"""The SDXL UNet: a port of sgm's `UNetModel` (sgm/modules/diffusionmodules/openaimodel.py). Module paths equal
the official checkpoint keys below `model.diffusion_model.` (a strict `load_state_dict`). Heads are width / 64.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # per level; 0 = no attention at that level
    transformer_depth_middle: int = 10
    context_dim: int = 2048  # CLIP-L 768 ++ bigG 1280
    adm_in_channels: int = 2816  # pooled bigG 1280 ++ 6 Fourier features of 256
    head_dim: int = 64


# sgm configs/inference/sd_xl_base.yaml and sd_xl_refiner.yaml
SDXL_BASE = UNetConfig()
SDXL_REFINER = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0),
                          transformer_depth_middle=4, context_dim=1280, adm_in_channels=2560)
# diffusers/stable-diffusion-xl-1.0-inpainting-0.1: the base with latent ++ mask ++ masked-image latent as input
SDXL_INPAINT = UNetConfig(in_channels=9)
# Small SDXL-family configs for tests (widths multiples of 64 so heads = width / 64 holds)
# (for text_encoders.CLIP_TINY ++ OPENCLIP_TINY: context 128 + 128, pooled 96)
TINY_BASE = UNetConfig(model_channels=64, channel_mult=(1, 2), transformer_depth=(0, 1), transformer_depth_middle=1,
                       context_dim=256, adm_in_channels=96 + 6 * 256)
TINY_REFINER = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), transformer_depth=(0, 1, 0),
                          transformer_depth_middle=2, context_dim=128, adm_in_channels=96 + 5 * 256)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos first then sin (sgm `timestep_embedding`); float32 (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """sgm `ResBlock`: norm-SiLU-conv, add the time embedding, norm-SiLU-conv, skip."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.in_layers = nn.Sequential(nn.GroupNorm(32, ch, eps=1e-5, **kw), nn.SiLU(),
                                       nn.Conv2d(ch, out_ch, 3, padding=1, **kw))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch, **kw))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, out_ch, eps=1e-5, **kw), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1, **kw))
        self.skip_connection = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1, **kw)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """sgm `CrossAttention` (self-attention when no context is given), through SDPA. Two inference-only shortcuts
    that leave the result unchanged: `fuse_qkv` (self-attention projects with one matmul), and the text's K/V kept
    while the context tensor and the weights are unchanged (the text is the same at every sampler step)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False, **kw)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **kw)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, **kw)])
        self._kv: tuple | None = None  # (context, versions, K, V) of the last context

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        if context is None:
            q, k, v = self._project_qkv(x)
        else:
            q, (k, v) = self.to_q(x), self._context_kv(context)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d)
        return self.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))

    def _plain(self) -> bool:
        """Eager inference through plain linears (no gradients, no LoRA wrappers; not under torch.compile, which
        fuses on its own and must not trace the cache)."""
        return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and self._linear()

    def _linear(self) -> bool:  # q, k, v are plain linear layers, not LoRA wrappers
        return all(type(m) is nn.Linear for m in (self.to_q, self.to_k, self.to_v))

    def fuse_qkv(self) -> None:
        """Make the q/k/v weights views of one (3 inner, dim) tensor: in-place edits (a merged LoRA, `load_state_dict`)
        reach it, and a replaced, moved or recast weight turns the fused path off (checked per call). Idempotent."""
        if not self._linear() or self._fused_weight() is not None:
            return  # LoRA-wrapped layers (training) stay as they are
        if any(0 in m.weight.stride() for m in (self.to_q, self.to_k, self.to_v)):
            return  # a weight not loaded yet (a memory plan's placeholder): loaded later, unfused
        fused = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight]).detach()
        for m, w in zip((self.to_q, self.to_k, self.to_v), fused.chunk(3)):
            m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)

    def _fused_weight(self) -> torch.Tensor | None:
        """The (3 inner, dim) tensor whose consecutive thirds are the q, k, v weights, if they are such views."""
        if not self._linear():
            return None
        q, k, v = (m.weight for m in (self.to_q, self.to_k, self.to_v))
        size = q.numel() * q.element_size()
        views = (q.is_contiguous() and q.shape == k.shape == v.shape and k.is_contiguous() and v.is_contiguous()
                 and k.data_ptr() == q.data_ptr() + size and v.data_ptr() == q.data_ptr() + 2 * size
                 and q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr())
        return q.as_strided((3 * q.shape[0], q.shape[1]), q.stride()) if views else None

    def _project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fused = self._fused_weight() if self._plain() else None
        if fused is not None:
            return F.linear(x, fused).chunk(3, dim=-1)  # 3 x (B, N, inner)
        return self.to_q(x), self.to_k(x), self.to_v(x)

    def _context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # 2 x (B, L, inner)
        if not self._plain():
            return self.to_k(context), self.to_v(context)
        key = (context._version,) + tuple((w._version, w.data_ptr()) for w in (self.to_k.weight, self.to_v.weight))
        if self._kv is None or self._kv[0] is not context or self._kv[1] != key:
            self._kv = None  # free the old K/V first
            self._kv = (context, key, self.to_k(context), self.to_v(context))
        return self._kv[2], self._kv[3]


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020), sgm `GEGLU`."""

    def __init__(self, dim: int, inner: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim, device, dtype), nn.Dropout(0.0),
                                 nn.Linear(4 * dim, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """sgm `BasicTransformerBlock`: pre-LN self-attention, cross-attention, GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        heads = dim // head_dim
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, **kw)
        self.ff = FeedForward(dim, **kw)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, **kw)
        self.norm1 = nn.LayerNorm(dim, **kw)
        self.norm2 = nn.LayerNorm(dim, **kw)
        self.norm3 = nn.LayerNorm(dim, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """sgm `SpatialTransformer` with linear proj_in/proj_out (`use_linear_in_transformer`)."""

    def __init__(self, ch: int, depth: int, context_dim: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm = nn.GroupNorm(32, ch, eps=1e-6, **kw)
        self.proj_in = nn.Linear(ch, ch, **kw)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, context_dim, head_dim, **kw) for _ in range(depth)])
        self.proj_out = nn.Linear(ch, ch, **kw)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C); free in channels-last
        y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = self.proj_out(y).view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        return y + x


class Downsample(nn.Module):
    def __init__(self, ch: int, device=None, dtype=None):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Nearest 2x, or to `size` (the skip's size where a downsample rounded an odd side up), as diffusers'
        `forward_upsample_size` and ComfyUI's `output_shape` do, so any latent size works."""
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """sgm `TimestepEmbedSequential`: a block of layers, each given what it needs."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


@dataclass
class DeepCache:
    """DeepCache (Ma et al. 2024, arXiv:2312.00858, uniform 1:N strategy): every `interval`-th UNet call runs in full
    and keeps the feature entering the last `depth` output blocks; the calls between run only the first `depth` input
    blocks and those output blocks on the kept feature. depth 2 = conv_in and the first ResBlock, DeepCache's setting
    for SD (cache_layer_id=0, cache_block_id=0). One cache per sampler run (the feature belongs to its batch)."""

    interval: int = 2
    depth: int = 2
    calls: int = 0
    feature: torch.Tensor | None = None

    def shallow(self, batch: int) -> bool:
        """Whether this call reuses the kept feature (counts the call, cycling so torch.compile sees few values)."""
        reuse = self.calls != 0 and self.feature is not None and self.feature.shape[0] == batch
        self.calls = (self.calls + 1) % self.interval if reuse or self.calls == 0 else 1 % self.interval
        return reuse


class UNet(nn.Module):
    """sgm `UNetModel` as configured for SDXL: eps prediction, text cross-attention, "vector" conditioning."""

    def __init__(self, cfg: UNetConfig = SDXL_BASE, device=None, dtype=None):
        super().__init__()
        assert len(cfg.transformer_depth) == len(cfg.channel_mult), "one transformer depth per level"
        assert cfg.transformer_depth_middle >= 1, "the middle block always has a transformer"
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        mc, levels = cfg.model_channels, len(cfg.channel_mult)
        emb_dim = 4 * mc  # time embedding width

        def res_attn(ch: int, level: int) -> list[nn.Module]:  # a ResBlock to the level's width, its transformer
            width, depth = cfg.channel_mult[level] * mc, cfg.transformer_depth[level]
            res = ResBlock(ch, emb_dim, width, **kw)
            return [res, SpatialTransformer(width, depth, cfg.context_dim, cfg.head_dim, **kw)] if depth else [res]

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim, **kw), nn.SiLU(), nn.Linear(emb_dim, emb_dim, **kw))
        self.label_emb = nn.Sequential(nn.Sequential(
            nn.Linear(cfg.adm_in_channels, emb_dim, **kw), nn.SiLU(), nn.Linear(emb_dim, emb_dim, **kw)))

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1, **kw))])
        skip_chans, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.input_blocks.append(TimestepEmbedSequential(*res_attn(ch, level)))
                ch = mult * mc
                skip_chans.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch, **kw)))
                skip_chans.append(ch)

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, **kw),
            SpatialTransformer(ch, cfg.transformer_depth_middle, cfg.context_dim, cfg.head_dim, **kw),
            ResBlock(ch, emb_dim, ch, **kw))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = res_attn(ch + skip_chans.pop(), level)
                ch = mult * mc
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, **kw))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(32, ch, eps=1e-5, **kw), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1, **kw))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor,
                cache: DeepCache | None = None) -> torch.Tensor:
        """x (B, C, H, W), timesteps (B,), context (B, L, context_dim), y (B, adm_in_channels) -> eps (B, C_out, H, W).
        Any H, W: a downsample rounds an odd side up, its upsample returns to the skip's size. `cache`: `DeepCache`."""
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.model_channels).to(dtype))
        emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        shallow = cache is not None and cache.shallow(x.shape[0])
        h, skips = x.to(dtype), []
        for block in self.input_blocks[:cache.depth if shallow else None]:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = cache.feature if shallow else self._run(self.middle_block, h, emb, context)
        for i in range(len(self.output_blocks) - len(skips), len(self.output_blocks)):
            if cache is not None and not shallow and i == len(self.output_blocks) - cache.depth:
                cache.feature = h
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(self.output_blocks[i], h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h)

    def fuse_qkv(self) -> None:
        """Self-attention projects q, k, v with one matmul (`CrossAttention.fuse_qkv`); for inference copies."""
        for m in self.modules():
            if isinstance(m, BasicTransformerBlock):
                m.attn1.fuse_qkv()

    def _run(self, block: TimestepEmbedSequential, h, emb, context, size=None):
        if self.gradient_checkpointing and self.training:
            return torch.utils.checkpoint.checkpoint(block, h, emb, context, size, use_reentrant=False)
        return block(h, emb, context, size)


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> UNetConfig:
    """Infer a UNetConfig from tensor shapes alone (keys below `model.diffusion_model.`)."""
    mc, in_ch = shapes["input_blocks.0.0.weight"][:2]
    res = "input_blocks.{}.0.in_layers.2.weight".format
    mult, depth, nrb, i = [], [], [], 1
    while res(i) in shapes:  # one level: resblocks, then a downsample (but after the last level)
        mult.append(shapes[res(i)][0] // mc)
        depth.append(_count(shapes, f"input_blocks.{i}.1.transformer_blocks."))
        nrb.append(next(n for n in itertools.count() if res(i + n) not in shapes))
        i += nrb[-1]
        if f"input_blocks.{i}.0.op.weight" not in shapes:
            break
        i += 1
    if not mult or len(set(nrb)) != 1:
        raise ValueError("cannot read the UNet levels from the checkpoint's input_blocks")
    k = next(k for k in shapes if k.endswith("attn2.to_k.weight"))
    return UNetConfig(in_channels=in_ch, out_channels=shapes["out.2.weight"][0], model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=nrb[0], transformer_depth=tuple(depth),
                      transformer_depth_middle=_count(shapes, "middle_block.1.transformer_blocks."),
                      context_dim=shapes[k][1], adm_in_channels=shapes["label_emb.0.0.weight"][1])


def _count(shapes: dict, prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})
