"""The SDXL VAE: the LDM/sgm KL autoencoder, 8x down-sampling to 4 latent channels.

Port of `Encoder`, `Decoder`, `ResnetBlock`, `AttnBlock`, `Downsample`, `Upsample` from
`sgm/modules/diffusionmodules/model.py` and `AutoencoderKL` / `DiagonalGaussianDistribution` from
`sgm/models/autoencoder.py` / `sgm/modules/distributions/distributions.py`. Module paths equal the official
single-file keys under `first_stage_model.`. `encode` and `decode` work on unscaled latents; the pipeline
multiplies by `scaling_factor`.

Precision: the released SDXL VAE weights overflow in fp16 at large sizes (hence the community "fp16-fix" VAE);
prefer bf16 or fp32 with them.

Large images (`band`): the blocks run over row bands of about `band` bytes of float32 temporaries, full width. Block
inputs and outputs stay whole; a 3x3 conv reads its band plus one row either side (the halo), zero rows only at the
image's edges, so each band equals the whole conv's; GroupNorm merges the bands' means and variances (law of total
variance) before normalising any band; the mid-block attention runs whole, at latent size. So banded equals whole up
to float rounding (fp32: 2.5e-6 of the output's scale on the test models, 1e-5 at full size), with no seams, and a
block holds two whole tensors (a resnet block's second conv writes over its input). Tiles with halos (TiledVAE) would
keep every tile's state at each GroupNorm, no smaller peak; per-tile statistics (diffusers' tiling) differ from the
whole image. Peaks (bench/vae.py, bench/RESULTS.md): 1024 px bf16 decode 1.2 GiB banded vs 1.62 whole, encode 0.86
vs 1.26, at the same speed.
"""

from __future__ import annotations

import itertools
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


# --- row bands (see the module docstring) -----------------------------------------------------

def _format(x: torch.Tensor) -> torch.memory_format:
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _rows_per_band(x: torch.Tensor, band: int | None, cost: int = 1, multiple: int = 1) -> int:
    """Output rows per band (a multiple of `multiple`) so that `cost` rows of x per output row, in float32, fill
    about `band` bytes; None: all rows, one band."""
    if band is None:
        return x.shape[2] * 2
    return max(multiple, band // (4 * cost * x[:, :, 0].numel()) // multiple * multiple)


def _banded(rows_fn, x: torch.Tensor, h_out: int, rows: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """`rows_fn(r0, r1)` (output rows r0:r1) over bands of `rows` rows, into one new tensor in x's memory format
    or into `into`: a band is written once the next has been computed, so a one-row halo can read `into`."""
    if rows >= h_out:
        return rows_fn(0, h_out)
    out, last = into, None
    for r0 in range(0, h_out, rows):
        piece = rows_fn(r0, min(r0 + rows, h_out))
        if out is None:
            out = torch.empty((*piece.shape[:2], h_out, piece.shape[3]), dtype=piece.dtype, device=piece.device,
                              memory_format=_format(x))
        if last is not None:
            out[:, :, last[0]:r0] = last[1]
        last = (r0, piece)
    out[:, :, last[0]:] = last[1]
    return out


def _halo(pre, conv: nn.Conv2d, x: torch.Tensor, rows: int, up: int = 1, add=None, into=None) -> torch.Tensor:
    """conv(pre(x)) (+ add(r0, r1) per band of output rows) for a 3x3 padding-1 `conv` after a `pre` that is
    pointwise or (up=2) a nearest 2x upsampling: each band reads one more row of pre(x) either side (the halo)."""
    h = x.shape[2] * up

    def band_rows(o0: int, o1: int) -> torch.Tensor:
        a, b = max(o0 - 1, 0), min(o1 + 1, h)  # rows of pre(x) the band reads
        t = pre(x[:, :, a // up:-(-b // up)])[:, :, a % up:a % up + b - a]
        top, bottom = int(o0 == 0), int(o1 == h)  # the conv's zero padding at the image's edges
        if top != bottom:
            t, top = F.pad(t, (0, 0, top, bottom)), 0
        y = F.conv2d(t, conv.weight, conv.bias, padding=(top, 1))  # (B, C, o1 - o0, W)
        return y if add is None else y.add_(add(o0, o1))

    return _banded(band_rows, x, h, rows, into)


def _norm_silu(norm: nn.GroupNorm, x: torch.Tensor, rows: int):
    """silu(norm(t)) for bands t of x, with the group mean and variance of the whole x: each band's, from
    GroupNorm's own kernel (float32 inside), merged by the law of total variance."""
    if rows >= x.shape[2]:
        return lambda t: F.silu(norm(t))
    b, c, h, w = x.shape
    g, eps = norm.num_groups, norm.eps
    fmt = _format(x)
    stats = [torch.ops.aten.native_group_norm(x[:, :, r:r + rows].contiguous(memory_format=fmt), None, None, b, c,
                                              x[0, 0, r:r + rows].numel(), g, eps)[1:]
             for r in range(0, h, rows)]  # per band: mean, rstd (B, G)
    mean, rstd = (torch.stack(v).float() for v in zip(*stats))  # (bands, B, G)
    share = torch.tensor([min(rows, h - r) / h for r in range(0, h, rows)], device=x.device).view(-1, 1, 1)
    group_mean = (share * mean).sum(0)  # (B, G)
    group_var = (share * (rstd.pow(-2) - eps + (mean - group_mean).square())).sum(0)
    scale = norm.weight.float().view(g, -1) * torch.rsqrt(group_var + eps)[:, :, None]  # (B, G, C/G)
    shift = norm.bias.float().view(g, -1) - group_mean[:, :, None] * scale
    scale, shift = (v.reshape(b, c, 1, 1).to(x.dtype) for v in (scale, shift))
    return lambda t: F.silu(torch.addcmul(shift, t, scale), inplace=True)


def _norm_conv(norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor, band: int | None, add=None,
               into=None) -> torch.Tensor:
    """conv(silu(norm(x))) (+ add(r0, r1)) over row bands, the GroupNorm statistics of the whole x."""
    rows = _rows_per_band(x, band)
    return _halo(_norm_silu(norm, x, rows), conv, x, rows, add=add, into=into)


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

    def forward(self, x: torch.Tensor, band: int | None = None) -> torch.Tensor:
        h = _norm_conv(self.norm1, self.conv1, x, band)
        skip = self.nin_shortcut or nn.Identity()
        # h is ours and read by conv2 alone: its bands are overwritten by the output as they are done
        return _norm_conv(self.norm2, self.conv2, h, band, add=lambda r0, r1: skip(x[:, :, r0:r1]), into=h)


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

    def forward(self, x: torch.Tensor, band: int | None = None) -> torch.Tensor:
        def rows(o0: int, o1: int) -> torch.Tensor:  # output row r reads input rows 2r..2r+2; row H is the padding
            t = x[:, :, 2 * o0:2 * o1 + 1]
            return self.conv(F.pad(t, (0, 1, 0, 2 * (o1 - o0) + 1 - t.shape[2])))

        return _banded(rows, x, x.shape[2] // 2, _rows_per_band(x, band, cost=2))


class Upsample(nn.Module):
    """`Upsample` in model.py (with_conv): nearest 2x, then a 3x3 conv."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, band: int | None = None) -> torch.Tensor:
        up = lambda t: F.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        return _halo(up, self.conv, x, _rows_per_band(x, band, cost=2, multiple=2), up=2)


class MidBlock(nn.Module):
    """The `mid` block of `Encoder`/`Decoder` in model.py: resnet, attention, resnet."""

    def __init__(self, c: int, device=None, dtype=None):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, device, dtype)
        self.attn_1 = AttnBlock(c, device, dtype)
        self.block_2 = ResnetBlock(c, c, device, dtype)

    def forward(self, x: torch.Tensor, band: int | None = None) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x, band)), band)  # attention over the whole latent


class Level(nn.Module):
    """One entry of `Encoder.down` / `Decoder.up` in model.py: resnet blocks, then a `downsample` or an `upsample`
    (None at the lowest / full resolution: no tensors, no key; the empty `attn` list holds none either)."""

    def __init__(self, blocks: list[ResnetBlock], downsample: Downsample | None = None,
                 upsample: Upsample | None = None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.downsample, self.upsample = downsample, upsample

    def forward(self, x: torch.Tensor, band: int | None = None) -> torch.Tensor:
        for blk in self.block:
            x = blk(x, band)
        resample = self.downsample or self.upsample
        return x if resample is None else resample(x, band)


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
            blocks = [ResnetBlock(c if j == 0 else w, w, **kw) for j in range(cfg.num_res_blocks)]
            c = w
            self.down.append(Level(blocks, downsample=Downsample(c, **kw) if i < len(widths) - 1 else None))
        self.mid = MidBlock(c, **kw)
        self.norm_out = _norm(c, **kw)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1, **kw)

    def forward(self, x: torch.Tensor, band: int | None = None) -> torch.Tensor:
        h = _halo(nn.Identity(), self.conv_in, x, _rows_per_band(x, band))
        for level in self.down:
            h = level(h, band)
        h = self.mid(h, band)
        return _norm_conv(self.norm_out, self.conv_out, h, band)  # (B, 2 * z_channels, H/f, W/f)


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
            blocks = [ResnetBlock(c if j == 0 else widths[i], widths[i], **kw) for j in range(cfg.num_res_blocks + 1)]
            c = widths[i]
            up.insert(0, Level(blocks, upsample=Upsample(c, **kw) if i else None))
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(c, **kw)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1, **kw)

    def forward(self, z: torch.Tensor, band: int | None = None) -> torch.Tensor:
        h = self.mid(_halo(nn.Identity(), self.conv_in, z, _rows_per_band(z, band)), band)
        for level in reversed(self.up):
            h = level(h, band)
        return _norm_conv(self.norm_out, self.conv_out, h, band)


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

    def encode(self, x: torch.Tensor, band: int | None = None) -> DiagonalGaussian:
        """Image (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, 4, H/8, W/8); `band` as `decode`."""
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x, band)))

    def decode(self, z: torch.Tensor, band: int | None = None) -> torch.Tensor:
        """Unscaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w), nominally in [-1, 1]. band: row bands of about this
        many bytes of float32 temporaries (module docstring), None: whole tensors; equal up to float rounding."""
        return self.decoder(self.post_quant_conv(z), band)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mode."""
        return self.decode(self.encode(x).mode())

    @property
    def factor(self) -> int:
        """Pixels per latent along each side: 8 for SDXL."""
        return 2 ** (len(self.cfg.ch_mult) - 1)


def config_from_shapes(shapes: dict[str, tuple[int, ...]]) -> VAEConfig:
    """Infer the config of an sgm AutoencoderKL from its tensor shapes (keys without prefix)."""

    def get(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"VAE: missing tensor {key}; is this an SDXL-family (sgm AutoencoderKL) VAE?")
        return tuple(shapes[key])

    ch, in_channels = get("encoder.conv_in.weight")[:2]
    levels = next(i for i in itertools.count() if f"encoder.down.{i}.block.0.conv1.weight" not in shapes)
    blocks = next(i for i in itertools.count() if f"encoder.down.0.block.{i}.conv1.weight" not in shapes)
    widths = [get(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    if levels == 0 or blocks == 0 or any(w % ch for w in widths):
        raise CheckpointError(f"VAE: cannot read the level widths {widths} as multiples of {ch} channels")
    return VAEConfig(ch=ch, ch_mult=tuple(w // ch for w in widths), num_res_blocks=blocks,
                     z_channels=get("decoder.conv_in.weight")[1], embed_dim=get("post_quant_conv.weight")[1],
                     in_channels=in_channels, out_ch=get("decoder.conv_out.weight")[0])
