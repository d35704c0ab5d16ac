"""The building blocks of NCSN++ (score_sde's layerspp.py), export-friendly.

Attribute names (`GroupNorm_0`, `Conv_0`, `NIN_0.W`, ...) and parameter shapes are the
reference's, so state_dicts load key for key. What differs is how they compute: 1x1 "NIN" layers
are convolutions and attention is two batched matmuls (no einsum), FIR resampling is depthwise
convolutions (see fir.py), and no tensor is created inside `forward`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pdscli.models.fir import FirConvDownsample, FirConvUpsample, FirDownsample, FirUpsample

SKIP_SCALE = math.sqrt(2.0)  # residual sums are divided by this when skip_rescale is on

ACTIVATIONS = {
    "swish": lambda: nn.SiLU(),
    "elu": lambda: nn.ELU(),
    "relu": lambda: nn.ReLU(),
    "lrelu": lambda: nn.LeakyReLU(negative_slope=0.2),
}


def get_act(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown nonlinearity {name!r}; known: {', '.join(ACTIVATIONS)}") from None


# ---- initialisation (score_sde's `default_init`: DDPM's uniform variance scaling, fan_avg) ----


@torch.no_grad()
def default_init_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Uniform with variance scale / fan_avg; score_sde maps scale 0 to 1e-10 (near-zero, not zero)."""
    scale = 1e-10 if scale == 0 else scale
    receptive = math.prod(weight.shape[2:])
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3.0 * scale / fan_avg)
    return weight.uniform_(-bound, bound)


def conv3x3(in_ch: int, out_ch: int, *, stride: int = 1, bias: bool = True, init_scale: float = 1.0, padding: int = 1):
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=padding, bias=bias)
    default_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_ch: int, out_ch: int, *, init_scale: float = 1.0):
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=1)
    default_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    default_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that always normalises in float32.

    Half-precision statistics over large feature maps lose too much; the parameters stay
    float32 when the body runs in fp16/bf16 (`NCSNpp.set_precision`). On float32 input it is
    plain nn.GroupNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # no casts at all, so none show up in exported graphs
            return super().forward(x)
        h = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return h.to(x.dtype)


def group_norm(channels: int) -> GroupNorm:
    return GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


class NIN(nn.Module):
    """A 1x1 layer stored as score_sde's `NIN` (W [in, out], b [out]) and run as a 1x1 convolution."""

    def __init__(self, in_dim: int, num_units: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(default_init_(torch.empty(in_dim, num_units), init_scale))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.W.t()[:, :, None, None], self.b)


# ---- noise-level embeddings (always float32, see NCSNpp.set_precision) ----


class GaussianFourierProjection(nn.Module):
    """sin/cos of random Fourier features of log sigma. W is a parameter that is never trained."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0):
        super().__init__()
        # Drawn on the CPU, then moved: on the meta device, random draws and arithmetic go through
        # Python decompositions that import torch's compiler stack (seconds).
        w = torch.randn(embedding_size, device="cpu") * scale
        self.W = nn.Parameter(w.to(torch.get_default_device()), requires_grad=False)

    def forward(self, log_sigma: torch.Tensor) -> torch.Tensor:
        # The reference's operation order, so float32 rounding matches it: the phases reach the
        # thousands, where the last bits of the product show in sin/cos.
        proj = log_sigma[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class PositionalEmbedding(nn.Module):
    """DDPM's sinusoidal embedding of integer time steps (score_sde `get_timestep_embedding`)."""

    def __init__(self, embedding_dim: int, max_positions: int = 10000):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.max_positions = max_positions
        self.register_buffer("freqs", torch.empty(0), persistent=False)
        self.reset_constants()

    def reset_constants(self, device: torch.device | None = None) -> None:
        half = self.embedding_dim // 2
        step = math.log(self.max_positions) / (half - 1)
        freqs = torch.exp(torch.arange(half, dtype=torch.float32, device="cpu") * -step)
        self.freqs = freqs.to(device=device or self.freqs.device, dtype=self.freqs.dtype)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        args = timesteps.float()[:, None] * self.freqs[None, :]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
        if self.embedding_dim % 2 == 1:
            emb = F.pad(emb, (0, 1))
        return emb


# ---- blocks ----


class Combine(nn.Module):
    """Merges the input pyramid into the feature maps (progressive_input 'input_skip')."""

    def __init__(self, dim1: int, dim2: int, method: str = "cat"):
        super().__init__()
        if method not in ("cat", "sum"):
            raise ValueError(f"progressive_combine must be 'cat' or 'sum', not {method!r}")
        self.Conv_0 = conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class AttnBlock(nn.Module):
    """Self-attention over all pixels (score_sde `AttnBlockpp`), as two batched matmuls."""

    def __init__(self, channels: int, skip_rescale: bool = False, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale
        self.scale = channels**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.GroupNorm_0(x)
        # Scaling q before the product (the reference scales after) keeps fp16 logits in range.
        q = (self.NIN_0(h) * self.scale).flatten(2)  # [B, C, HW]
        k = self.NIN_1(h).flatten(2)
        v = self.NIN_2(h).flatten(2)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # [B, HW(query), HW(key)]
        h = torch.bmm(v, weights.transpose(1, 2)).reshape_as(x)
        h = self.NIN_3(h)
        return (x + h) / SKIP_SCALE if self.skip_rescale else x + h


class Upsample(nn.Module):
    """x2 upsampling: nearest or FIR, optionally with a learned 3x3 conv (score_sde `layerspp.Upsample`)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if fir and with_conv:
            self.Conv2d_0 = FirConvUpsample(in_ch, out_ch, kernel=3, taps=fir_kernel)
            default_init_(self.Conv2d_0.weight)
        elif fir:
            self.resample = FirUpsample(in_ch, fir_kernel)
        elif with_conv:
            self.Conv_0 = conv3x3(in_ch, out_ch)
        self.fir = fir
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else self.resample(x)
        h = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.Conv_0(h) if self.with_conv else h


class Downsample(nn.Module):
    """x2 downsampling: average pooling or FIR, optionally with a learned 3x3 conv (score_sde `layerspp.Downsample`)."""

    def __init__(self, in_ch: int, out_ch: int | None = None, with_conv: bool = False, fir: bool = False,
                 fir_kernel=(1, 3, 3, 1)):
        super().__init__()
        out_ch = out_ch or in_ch
        if fir and with_conv:
            self.Conv2d_0 = FirConvDownsample(in_ch, out_ch, kernel=3, taps=fir_kernel)
            default_init_(self.Conv2d_0.weight)
        elif fir:
            self.resample = FirDownsample(in_ch, fir_kernel)
        elif with_conv:
            self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
        self.fir = fir
        self.with_conv = with_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fir:
            return self.Conv2d_0(x) if self.with_conv else self.resample(x)
        if self.with_conv:
            # TF's 'SAME' padding for a stride-2 conv on even sizes: one extra row/column at the end.
            return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, 2, stride=2)


class ResBlockDDPM(nn.Module):
    """DDPM residual block (score_sde `ResnetBlockDDPMpp`); resolution changes are separate modules."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 conv_shortcut: bool = False, dropout: float = 0.1, skip_rescale: bool = False,
                 init_scale: float = 0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        if in_ch != out_ch:
            if conv_shortcut:
                self.Conv_2 = conv3x3(in_ch, out_ch)
            else:
                self.NIN_0 = NIN(in_ch, out_ch)
        self.act = act
        self.skip_rescale = skip_rescale
        self.in_ch, self.out_ch = in_ch, out_ch
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch:
            x = self.Conv_2(x) if self.conv_shortcut else self.NIN_0(x)
        return (x + h) / SKIP_SCALE if self.skip_rescale else x + h


class _Nearest2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class _Mean2x2(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2, stride=2)


def _block_resampler(channels: int, up: bool, down: bool, fir: bool, fir_kernel) -> nn.Module | None:
    if up:
        return FirUpsample(channels, fir_kernel) if fir else _Nearest2x()
    if down:
        return FirDownsample(channels, fir_kernel) if fir else _Mean2x2()
    return None


class ResBlockBigGAN(nn.Module):
    """BigGAN-style residual block that can also resample by 2 (score_sde `ResnetBlockBigGANpp`)."""

    def __init__(self, act: nn.Module, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.1, fir: bool = False,
                 fir_kernel=(1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("a block resamples up or down, not both")
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = conv3x3(in_ch, out_ch)
        if temb_dim is not None:
            self.Dense_0 = dense(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
        self.has_shortcut = in_ch != out_ch or up or down
        if self.has_shortcut:
            self.Conv_2 = conv1x1(in_ch, out_ch)
        # Same resampling for the residual branch and the shortcut (both have in_ch channels).
        self.resample = _block_resampler(in_ch, up, down, fir, fir_kernel)
        self.act = act
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.has_shortcut:
            x = self.Conv_2(x)
        return (x + h) / SKIP_SCALE if self.skip_rescale else x + h
