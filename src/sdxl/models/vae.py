"""The SDXL VAE: the LDM/sgm KL autoencoder, 8x down-sampling to 4 latent channels.

Port of `Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample` from
`sgm/modules/diffusionmodules/model.py` and `AutoencoderKL` / `DiagonalGaussianDistribution`
from `sgm/models/autoencoder.py` / `sgm/modules/distributions/distributions.py`. Module paths
equal the official single-file keys under `first_stage_model.`. `encode` and `decode` work
on unscaled latents; the pipeline multiplies by `scaling_factor`.

Precision: the released SDXL VAE weights overflow in fp16 at large sizes (the reason the
community "fp16-fix" VAE exists); prefer bf16 or fp32 with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.errors import CheckpointError


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scaling_factor: float = 0.13025  # not stored in checkpoints; the pipeline applies it


SDXL_VAE = VAEConfig()
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def _norm(c: int, device, dtype) -> nn.GroupNorm:
    """`Normalize` in model.py: GroupNorm(32, eps 1e-6, affine)."""
    return nn.GroupNorm(32, c, eps=1e-6, affine=True, device=device, dtype=dtype)


class ResnetBlock(nn.Module):
    """`ResnetBlock` in model.py, without timestep embedding (temb_channels=0) and dropout 0."""

    def __init__(self, c_in: int, c_out: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = _norm(c_in, **kw)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, **kw)
        self.norm2 = _norm(c_out, **kw)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, **kw)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, **kw) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """`AttnBlock` in model.py: one head over all C channels, q/k/v/proj_out as 1x1 convs."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm = _norm(c, **kw)
        self.q = nn.Conv2d(c, c, 1, **kw)
        self.k = nn.Conv2d(c, c, 1, **kw)
        self.v = nn.Conv2d(c, c, 1, **kw)
        self.proj_out = nn.Conv2d(c, c, 1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): a view when channels_last, else one copy so that
        # SDPA gets unit-stride heads and picks a fused kernel instead of the HW x HW math path
        q, k, v = (t.flatten(2).transpose(1, 2).unsqueeze(1).contiguous() for t in (self.q(n), self.k(n), self.v(n)))
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        a = a.squeeze(1).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W), channels_last strides
        if x.is_contiguous():
            a = a.contiguous()  # an NCHW model stays NCHW instead of flipping layouts downstream
        return x + self.proj_out(a)


class Downsample(nn.Module):
    """`Downsample` in model.py (with_conv): pad right/bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """`Upsample` in model.py (with_conv): nearest 2x, then a 3x3 conv."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """The `mid` block of `Encoder`/`Decoder` in model.py: resnet, attention, resnet."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, device, dtype)
        self.attn_1 = AttnBlock(c, device, dtype)
        self.block_2 = ResnetBlock(c, c, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class DownLevel(nn.Module):
    """One entry of `Encoder.down` in model.py (its empty `attn` list holds no tensors)."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample = downsample  # None at the lowest resolution: no tensors, no key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    """One entry of `Decoder.up` in model.py (its empty `attn` list holds no tensors)."""

    def __init__(self, blocks: list[ResnetBlock], upsample: Upsample | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.upsample = upsample  # None at full resolution (up.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """`Encoder` in model.py (double_z=True, no attention at any resolution but the middle)."""

    def __init__(self, cfg: VAEConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **kw)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, w, **kw))
                c = w
            last = i == len(widths) - 1
            self.down.append(DownLevel(blocks, None if last else Downsample(c, **kw)))
        self.mid = MidBlock(c, **kw)
        self.norm_out = _norm(c, **kw)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * z_channels, H/f, W/f)


class Decoder(nn.Module):
    """`Decoder` in model.py; `up[i]` has resolution i, so it runs in reverse order."""

    def __init__(self, cfg: VAEConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1, **kw)
        self.mid = MidBlock(c, **kw)
        up = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, widths[i], **kw))
                c = widths[i]
            up.insert(0, UpLevel(blocks, Upsample(c, **kw) if i != 0 else None))
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c, **kw)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1, **kw)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass(frozen=True)
class DiagonalGaussian:
    """`DiagonalGaussianDistribution` in sgm/modules/distributions/distributions.py."""

    mean: torch.Tensor  # (B, embed_dim, H/f, W/f)
    logvar: torch.Tensor  # same shape, clamped to [-30, 20]

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)  # (B, 2 * embed_dim, h, w) -> 2 x (B, embed_dim, h, w)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn on the generator's device (as diffusers does), then moved."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    """`AutoencoderKL` in sgm/models/autoencoder.py: encoder, quant_conv, post_quant_conv, decoder."""

    def __init__(self, cfg: VAEConfig, device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.cfg = cfg
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, **kw)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1, **kw)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, 4, H/8, W/8)."""
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode."""
        return self.decode(self.encode(x).mode())

    @property
    def factor(self) -> int:
        """Pixels per latent along each side: 8 for SDXL."""
        return 2 ** (len(self.cfg.ch_mult) - 1)

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16, stats_size: int | None = 64) -> torch.Tensor:
        """`decode` in overlapping latent tiles blended with linear ramps: memory bounded by the tile size.

        Every tile normalises with whole-image GroupNorm statistics, taken from one decode of the latent
        shrunk to `stats_size` (None: full size) as TiledVAE's fast mode does: per-tile statistics would
        give each tile its own tone, a visible seam.
        """
        if max(z.shape[-2:]) <= tile:
            return self.decode(z)
        probe = z if stats_size is None else _shrink(z, stats_size)
        with _shared_norm_stats(self.decoder, lambda: self.decode(probe)):
            return _tiled(self.decode, z, tile, overlap, self.factor)

    def encode_tiled(self, x: torch.Tensor, tile: int = 512, overlap: int = 128,
                     stats_size: int | None = 512) -> DiagonalGaussian:
        """`encode` in overlapping pixel tiles, with shared GroupNorm statistics as `decode_tiled`."""
        f = self.factor
        if max(x.shape[-2:]) <= tile:
            return self.encode(x)
        enc = lambda t: self.quant_conv(self.encoder(t))  # noqa: E731
        probe = x if stats_size is None else _shrink(x, stats_size)
        with _shared_norm_stats(self.encoder, lambda: enc(probe)):
            moments = _tiled(enc, x, tile // f * f, overlap // f * f, 1 / f)
        return DiagonalGaussian.from_moments(moments)


def _shrink(x: torch.Tensor, size: int) -> torch.Tensor:
    """x resized (area-preserving aspect) so its longer side is at most `size`."""
    h, w = x.shape[-2:]
    s = min(1.0, size / max(h, w))
    size = (max(1, round(h * s)), max(1, round(w * s)))
    # float32: antialiased interpolation has no bf16/fp16 kernel on CPU
    return F.interpolate(x.float(), size=size, mode="bilinear", antialias=True).to(x.dtype)


class _shared_norm_stats:
    """Within the block, `module`'s GroupNorms use the statistics recorded while running `probe()` once."""

    def __init__(self, module: nn.Module, probe):
        self.norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
        self.probe, self.stats = probe, {}

    def __enter__(self):
        def record(m, args):
            x = args[0].float().reshape(args[0].shape[0], m.num_groups, -1)
            self.stats[m] = (x.mean(-1), x.var(-1, unbiased=False))  # (B, groups) each

        hooks = [m.register_forward_pre_hook(record) for m in self.norms]
        try:
            with torch.no_grad():
                self.probe()
        finally:
            for h in hooks:
                h.remove()
        for m in self.norms:
            m.forward = self._fixed(m)
        return self

    def _fixed(self, m: nn.GroupNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            mean, var = self.stats[m]
            b, c = x.shape[:2]
            g = x.reshape(b, m.num_groups, -1)  # (B, groups, C/groups * H * W)
            g = (g - mean[:, :, None].to(x.dtype)) * torch.rsqrt(var[:, :, None] + m.eps).to(x.dtype)
            return g.reshape(x.shape) * m.weight.view(1, c, 1, 1) + m.bias.view(1, c, 1, 1)
        return forward

    def __exit__(self, *exc):
        for m in self.norms:
            del m.forward  # back to GroupNorm.forward
        return False


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(n: int, overlap: int, first: bool, last: bool, device) -> torch.Tensor:
    """Weights along one side of a tile: rising over `overlap` at inner edges, 1 at the image border."""
    w = torch.ones(n, device=device)
    k = min(overlap, n // 2)
    if k and not first:
        w[:k] = torch.linspace(1 / (k + 1), k / (k + 1), k, device=device)
    if k and not last:
        w[n - k:] = torch.linspace(k / (k + 1), 1 / (k + 1), k, device=device)
    return w


def _tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale: float) -> torch.Tensor:
    """Apply a fully convolutional `fn` (output `scale` x the input size) tile by tile, feathering the overlaps."""
    b, _, h, w = x.shape
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    if len(ys) == len(xs) == 1:
        return fn(x)
    out = weight = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            piece = fn(x[:, :, y0:y0 + tile, x0:x0 + tile]).float()
            ph, pw = piece.shape[-2:]
            oy, ox, ov = int(y0 * scale), int(x0 * scale), int(overlap * scale)
            wy = _ramp(ph, ov, i == 0, i == len(ys) - 1, x.device)
            wx = _ramp(pw, ov, j == 0, j == len(xs) - 1, x.device)
            m = wy[:, None] * wx[None, :]  # (ph, pw)
            if out is None:
                out = torch.zeros(b, piece.shape[1], int(h * scale), int(w * scale), device=x.device)
                weight = torch.zeros(int(h * scale), int(w * scale), device=x.device)
            out[:, :, oy:oy + ph, ox:ox + pw] += piece * m
            weight[oy:oy + ph, ox:ox + pw] += m
    return (out / weight).to(x.dtype)


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
    """Infer the config of an sgm AutoencoderKL from its tensor shapes (keys without prefix)."""

    def get(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"VAE: missing tensor {key}; is this an SDXL-family (sgm AutoencoderKL) VAE?")
        return tuple(shapes[key])

    ch, in_channels = get("encoder.conv_in.weight")[:2]
    levels = 0
    while f"encoder.down.{levels}.block.0.conv1.weight" in shapes:
        levels += 1
    blocks = 0
    while f"encoder.down.0.block.{blocks}.conv1.weight" in shapes:
        blocks += 1
    widths = [get(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    if levels == 0 or blocks == 0 or any(w % ch for w in widths):
        raise CheckpointError(f"VAE: cannot read the level widths {widths} as multiples of {ch} channels")
    return VAEConfig(
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=blocks,
        z_channels=get("decoder.conv_in.weight")[1],
        embed_dim=get("post_quant_conv.weight")[1],
        in_channels=in_channels,
        out_ch=get("decoder.conv_out.weight")[0],
    )
