"""FIR resampling (StyleGAN2's upfirdn2d, as score_sde uses it) written as plain convolutions.

score_sde resamples by 2 with a normalised FIR kernel (`fir_kernel`, [1, 3, 3, 1] in every
official config). Its `upfirdn2d` zero-inserts, pads, convolves and subsamples one channel at a
time. Here each case is a single depthwise (transposed) convolution, which is what ONNX and
TensorRT run fast. The kernels are non-persistent buffers: they are computed from the config,
so the state_dict stays exactly the reference's.

Index conventions follow upfirdn2d: with taps k of length K and factor f = 2,
  upsample:      zero-insert by f, pad ((K-f+1)//2 + f-1, (K-f)//2), convolve with f²·k;
  downsample:    pad ((K-f+1)//2, (K-f)//2), convolve with k, keep every f-th sample;
  conv + down:   pad ((p+1)//2, p//2) with p = K-f + kc-1, convolve with k, then a stride-f conv;
  up + conv:     stride-f transposed conv, then pad ((p+1)//2 + f-1, p//2 + 1) with
                 p = K-f - (kc-1), convolve with f²·k.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

FACTOR = 2


def fir_kernel_2d(taps) -> torch.Tensor:
    """The normalised 2-D FIR kernel: the outer product of 1-D taps (or 2-D taps as given), summing to 1."""
    k = torch.as_tensor(taps, dtype=torch.float64, device="cpu")
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 1:
        raise ValueError(f"fir_kernel must be 1-D taps or a square 2-D kernel, got shape {list(k.shape)}")
    return (k / k.sum()).to(torch.float32)


def _depthwise(kernel: torch.Tensor, channels: int) -> torch.Tensor:
    """[K, K] -> [C, 1, K, K], the weight layout of a depthwise conv with groups=C."""
    return kernel.reshape(1, 1, *kernel.shape).repeat(channels, 1, 1, 1).contiguous()


def _fir_conv(x: torch.Tensor, weight: torch.Tensor, pad0: int, pad1: int, stride: int = 1) -> torch.Tensor:
    # upfirdn2d convolves (flips the kernel); the weight passed here is already flipped, so a
    # plain correlation does it. Symmetric padding goes into the conv itself; F.pad takes
    # negative amounts as crops, which the fused up-conv needs for short kernels.
    if pad0 == pad1 and pad0 >= 0:
        return F.conv2d(x, weight, stride=stride, padding=pad0, groups=weight.shape[0])
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    return F.conv2d(x, weight, stride=stride, groups=weight.shape[0])


def _plain(taps):
    """Taps as nested Python floats: kept on the module, free of any device (meta included)."""
    return [_plain(t) for t in taps] if isinstance(taps, (list, tuple)) else float(taps)


class _FirModule(nn.Module):
    """Holds one depthwise FIR kernel as a non-persistent buffer (rebuilt by `reset_constants`)."""

    def __init__(self, channels: int, taps, gain: float, flip: bool):
        super().__init__()
        self.channels = channels
        self.taps = _plain(taps)
        self._gain = gain
        self._flip = flip
        self.register_buffer("fir", torch.empty(0), persistent=False)
        self.reset_constants()

    @property
    def kernel_size(self) -> int:
        return self.fir.shape[-1]

    def reset_constants(self, device: torch.device | None = None) -> None:
        """(Re)compute the kernel, e.g. on `device` for a model built on the meta device."""
        k = fir_kernel_2d(self.taps) * self._gain
        if self._flip:
            k = torch.flip(k, dims=(0, 1))
        self.fir = _depthwise(k, self.channels).to(device=device or self.fir.device, dtype=self.fir.dtype)


class FirUpsample(_FirModule):
    """upsample_2d: x2 zero-insertion then the FIR filter, as one depthwise transposed conv."""

    def __init__(self, channels: int, taps=(1, 3, 3, 1)):
        # A transposed conv scatters with the kernel as is, which is the convolution upfirdn2d does.
        super().__init__(channels, taps, gain=FACTOR**2, flip=False)
        p = self.kernel_size - FACTOR
        self.padding = p // 2
        # For odd p, upfirdn2d's output is one sample shorter at the end than the transposed conv's.
        self.crop_end = p % 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(x, self.fir, stride=FACTOR, padding=self.padding, groups=self.channels)
        if self.crop_end:
            y = y[..., : y.shape[-2] - self.crop_end, : y.shape[-1] - self.crop_end]
        return y


class FirDownsample(_FirModule):
    """downsample_2d: the FIR filter then keeping every second sample, as one strided depthwise conv."""

    def __init__(self, channels: int, taps=(1, 3, 3, 1)):
        super().__init__(channels, taps, gain=1.0, flip=True)
        p = self.kernel_size - FACTOR
        self.pad = ((p + 1) // 2, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fir_conv(x, self.fir, *self.pad, stride=FACTOR)


class FirConvDownsample(_FirModule):
    """score_sde's `up_or_down_sampling.Conv2d(down=True)`: FIR filter, then a learned stride-2 conv.

    Parameters `weight` [out, in, k, k] and `bias` [out], as in the reference's state_dict.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, taps=(1, 3, 3, 1)):
        super().__init__(in_ch, taps, gain=1.0, flip=True)
        self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        p = self.kernel_size - FACTOR + kernel - 1
        self.pad = ((p + 1) // 2, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _fir_conv(x, self.fir, *self.pad)
        return F.conv2d(x, self.weight, self.bias, stride=FACTOR)


class FirConvUpsample(_FirModule):
    """score_sde's `up_or_down_sampling.Conv2d(up=True)`: a learned stride-2 transposed conv, then the FIR filter.

    The reference flips the weight with `w[..., ::-1, ::-1]`, which PyTorch rejects, so that code
    path never ran there (no official VE config reaches it). This is what it means to compute, as
    in StyleGAN2: zero-insertion followed by a correlation with `weight`.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, taps=(1, 3, 3, 1)):
        super().__init__(out_ch, taps, gain=FACTOR**2, flip=True)
        self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        p = self.kernel_size - FACTOR - (kernel - 1)
        self.pad = ((p + 1) // 2 + FACTOR - 1, p // 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.flip(self.weight, dims=(2, 3)).transpose(0, 1)
        x = F.conv_transpose2d(x, w, stride=FACTOR)
        x = _fir_conv(x, self.fir, *self.pad)
        return x + self.bias.reshape(1, -1, 1, 1)
