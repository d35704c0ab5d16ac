"""PDS preconditioning: filter statistics from data, and the preconditioner M built from them.

M = F^-1 diag(R) F diag(S), with F the 2-D DFT over height and width (per channel), R a
frequency filter and S a space (pixel) filter, both [C, H, W]. The samplers use

    M z      = F^-1 R F (S z)                     (every fresh Gaussian draw)
    M M^T g  = F^-1 R F (S^2 F^-1 R F g)          (every score)

Filters are stored as raw statistics over images x in [0, 1] (the reference recipe,
mask_gen_demo.py):  freq = log(1 + mean |fft2(x)|^2)  (unnormalised FFT, unshifted layout),
space = mean x^2. Files from `pds filters` also hold the data's first two moments in absolute
units, which the Gaussian teleportation needs (pdscli.samplers.teleport) and freq cannot give
(it folds the mean into the zero frequency and is rounded in log space): mean = E x, and
spectrum = E |fft2(x - mean)|^2 / (H W), the variance of each orthonormal Fourier coefficient.
The strength alpha is applied only when a Preconditioner is built:
filter = alpha / (m / max(m) + alpha - 1), which is 1 where the data has the most energy and
grows towards alpha / (alpha - 1) where it has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from pdscli.errors import PdsError
from pdscli.fsutil import atomic_save_npz

FORMAT = "pds-filters"
VERSION = 1  # the moments were added as optional arrays: older readers ignore them, so still version 1
ARRAYS = ("freq", "space", "mean", "spectrum")  # the [C, H, W] arrays a filters file may hold


def _shape_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


@dataclass
class Filters:
    """Raw filter statistics (no alpha). `freq`/`space`: [C, H, W] float32 numpy arrays or None;
    `count`: images they were computed from (0 = unknown); `source`: where they came from;
    `mean`/`spectrum`: the data's moments (see the module doc), None in files made before them."""

    freq: np.ndarray | None
    space: np.ndarray | None
    size: int
    channels: int
    count: int = 0
    source: str = ""
    mean: np.ndarray | None = None
    spectrum: np.ndarray | None = None

    def __post_init__(self):
        self.size, self.channels, self.count = int(self.size), int(self.channels), int(self.count)
        self.source = str(self.source)
        if self.freq is None and self.space is None:
            raise PdsError("filters need a frequency or a space statistic (both are missing)")
        if (self.mean is None) != (self.spectrum is None):
            raise PdsError("filters hold the data mean or its spectrum but not both")
        for name in ARRAYS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            value = np.asarray(value, dtype=np.float32)
            if value.shape != self.shape:
                raise PdsError(f"the {name} statistic is shaped {_shape_text(value.shape)}, expected {_shape_text(self.shape)}")
            if not np.all(np.isfinite(value)):
                raise PdsError(f"the {name} statistic holds NaN or infinite values")
            setattr(self, name, value)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def has_moments(self) -> bool:
        """Whether the data's mean and spectrum are at hand (files made before them lack them)."""
        return self.mean is not None

    @property
    def kinds(self) -> str:
        """"freq", "space" or "freq+space": which statistics are present."""
        return "+".join(k for k in ("freq", "space") if getattr(self, k) is not None)

    def describe(self) -> str:
        count = f" from {self.count} images" if self.count else ""
        source = f" of {self.source}" if self.source else ""
        return f"{self.kinds} filters {_shape_text(self.shape)}{count}{source}"

    def save(self, path) -> Path:
        """Write one .npz atomically (the caller checks --force)."""
        path = Path(path)
        arrays = {k: getattr(self, k) for k in ARRAYS if getattr(self, k) is not None}
        atomic_save_npz(
            path,
            format=np.array(FORMAT),
            version=np.array(VERSION),
            size=np.array(self.size),
            channels=np.array(self.channels),
            count=np.array(self.count),
            source=np.array(self.source),
            **arrays,
        )
        return path


def load_filters(path) -> Filters:
    """Filters saved by `Filters.save` (any .npz with freq and/or space [C, H, W] arrays)."""
    path = Path(path)
    if not path.is_file():
        raise PdsError(f"filters file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as e:  # np.load raises a zoo of types for a file that is not an .npz
        raise PdsError(f"cannot read filters from {path}: not a .npz file ({type(e).__name__})") from None
    if "version" in arrays and int(arrays["version"]) > VERSION:
        raise PdsError(f"{path} was written by a newer pds (filters format version {int(arrays['version'])})")
    freq, space = arrays.get("freq"), arrays.get("space")
    if freq is None and space is None:
        raise PdsError(f"{path} holds no freq or space statistic; make filters with `pds filters`")
    first = freq if freq is not None else space
    if first.ndim != 3 or first.shape[1] != first.shape[2]:
        raise PdsError(f"{path}: statistics must be [channels, size, size], got {_shape_text(first.shape)}")
    channels, size = first.shape[0], first.shape[1]
    return Filters(
        freq=freq,
        space=space,
        size=int(arrays["size"]) if "size" in arrays else size,
        channels=int(arrays["channels"]) if "channels" in arrays else channels,
        count=int(arrays["count"]) if "count" in arrays else 0,
        source=str(arrays["source"]) if "source" in arrays else str(path),
        mean=arrays.get("mean"),
        spectrum=arrays.get("spectrum"),
    )


def load_reference_npy(freq_path=None, space_path=None, *, channels: int, size: int) -> Filters:
    """The reference implementation's freq_mask.npy / space_mask.npy (mask_gen_demo.py), reshaped
    to [C, H, W] as the reference does (it reshapes whatever it loads to the model's shape)."""
    if freq_path is None and space_path is None:
        raise PdsError("give a frequency or a space .npy file")
    shape = (int(channels), int(size), int(size))
    loaded = {}
    for name, p in (("freq", freq_path), ("space", space_path)):
        if p is None:
            continue
        p = Path(p)
        if not p.is_file():
            raise PdsError(f"{name} filter file {p} not found")
        try:
            array = np.load(p, allow_pickle=False)
        except Exception as e:
            raise PdsError(f"cannot read {p}: not a .npy file ({type(e).__name__})") from None
        if array.size != math.prod(shape):
            raise PdsError(
                f"{p} has {array.size} values but a {_shape_text(shape)} image needs {math.prod(shape)}"
                f" (the filters were made for another image size or channel count)"
            )
        loaded[name] = array.astype(np.float32).reshape(shape)
    source = ", ".join(str(p) for p in (freq_path, space_path) if p is not None)
    return Filters(loaded.get("freq"), loaded.get("space"), size=size, channels=channels, count=0, source=source)


class StatisticsAccumulator:
    """Streaming filter statistics: feed batches [B, C, H, W] (float in [0, 1], or uint8),
    read `result()`. Sums of |fft2 x|^2 and x^2 are kept in float64, so the order and size of
    the batches do not matter."""

    # Tolerance on the [0, 1] range: resampling filters overshoot by a hair.
    RANGE_SLACK = 1e-3

    def __init__(self, *, freq: bool = True, space: bool = True):
        if not (freq or space):
            raise ValueError("accumulate at least one of freq and space")
        self.want_freq, self.want_space = freq, space
        self.freq_sum = self.space_sum = self.pixel_sum = None
        self.count = 0
        self.shape: tuple[int, int, int] | None = None

    def _as_float64(self, batch) -> torch.Tensor:
        x = torch.as_tensor(batch)
        if x.dtype == torch.uint8:
            x = x.to(torch.float64) / 255.0
        else:
            x = x.detach().to("cpu", torch.float64)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise PdsError(f"image batches must be [B, C, H, W], got a tensor shaped {tuple(x.shape)}")
        if x.shape[-1] != x.shape[-2]:
            raise PdsError(f"filters need square images, got {x.shape[-2]}x{x.shape[-1]}")
        if self.shape is None:
            self.shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self.shape:
            raise PdsError(f"images of different shapes: {_shape_text(self.shape)} and {_shape_text(x.shape[1:])}")
        lo, hi = float(x.min()), float(x.max())
        if lo < -self.RANGE_SLACK or hi > 1 + self.RANGE_SLACK:
            raise PdsError(f"image values must lie in [0, 1] for filter statistics, got [{lo:.3g}, {hi:.3g}]")
        return x

    def add(self, batch) -> None:
        x = self._as_float64(batch)
        if x.shape[0] == 0:
            return
        if self.want_freq:
            power = (torch.fft.fft2(x).abs() ** 2).sum(dim=0)
            self.freq_sum = power if self.freq_sum is None else self.freq_sum + power
            total = x.sum(dim=0)
            self.pixel_sum = total if self.pixel_sum is None else self.pixel_sum + total
        if self.want_space:
            energy = (x**2).sum(dim=0)
            self.space_sum = energy if self.space_sum is None else self.space_sum + energy
        self.count += x.shape[0]

    def result(self, source: str = "") -> Filters:
        if self.count == 0:
            raise PdsError(f"no images to compute filters from{' in ' + source if source else ''}")
        freq = torch.log1p(self.freq_sum / self.count).numpy() if self.want_freq else None
        space = (self.space_sum / self.count).numpy() if self.want_space else None
        mean = spectrum = None
        if self.want_freq:
            m = self.pixel_sum / self.count
            # E|F(x - m)|^2 = E|F x|^2 - |F m|^2; the clamp takes rounding below zero.
            variance = (self.freq_sum / self.count - torch.fft.fft2(m).abs() ** 2).clamp(min=0)
            mean, spectrum = m.numpy(), (variance / (m.shape[-1] * m.shape[-2])).numpy()
        c, h, _ = self.shape
        return Filters(freq=freq, space=space, size=h, channels=c, count=self.count, source=source, mean=mean,
                       spectrum=spectrum)


def compute_statistics(batches: Iterable, *, source: str = "", freq: bool = True, space: bool = True) -> Filters:
    """Filter statistics over an iterable of image batches [B, C, H, W] in [0, 1]."""
    acc = StatisticsAccumulator(freq=freq, space=space)
    for batch in batches:
        acc.add(batch)
    return acc.result(source)


def filter_from_statistic(m: np.ndarray, alpha: float, what: str = "frequency") -> np.ndarray:
    """alpha / (m / max(m) + alpha - 1), float64; a one-line PdsError when that is not a
    positive finite filter (alpha <= 0, or alpha - 1 + min(m)/max(m) <= 0)."""
    m = np.asarray(m, dtype=np.float64)
    peak = m.max()
    if not np.isfinite(peak) or peak <= 0:
        raise PdsError(f"the {what} statistic is all zero or not finite: cannot make a filter from it")
    r = m / peak
    # alpha > 0 keeps the filter positive; alpha - 1 + min(r) > 0 keeps its denominator so.
    # For statistics that reach 0 somewhere (a black pixel) that means alpha > 1.
    bound = max(0.0, 1.0 - float(r.min()))
    if not (math.isfinite(alpha) and alpha > bound):
        raise PdsError(f"alpha must be greater than {bound:.3g} for these {what} filters, got {alpha:g} (the reference uses 5)")
    return alpha / (r + alpha - 1.0)


class Preconditioner:
    """M = F^-1 diag(R) F diag(S). `noise(z)` = M z, `grad(g)` = M M^T g, in float32 on `device`.

    R is symmetrised, R(k) <- (R(k) + R(-k)) / 2, so that F^-1 R F is a real symmetric operator
    and real FFTs suffice. For a real input this equals the reference's `.real` of the complex
    result exactly (the real part of F^-1 R F y is F^-1 R_sym F y); statistics of real images
    are symmetric anyway, up to rounding.
    """

    def __init__(self, freq_filter=None, space_filter=None, *, device="cpu", alpha: float | None = None, source: str = ""):
        self.device = torch.device(device)
        self.alpha, self.source = alpha, source
        self.shape: tuple[int, int, int] | None = None
        self.freq_half = None  # R_sym in rfft2 layout [C, H, W//2+1], float32
        self.space = self.space_sq = None  # S and S^2, [C, H, W] float32
        if freq_filter is not None:
            r = torch.as_tensor(np.asarray(freq_filter), dtype=torch.float64)
            self._set_shape(r.shape)
            flipped = torch.roll(torch.flip(r, dims=(-2, -1)), shifts=(1, 1), dims=(-2, -1))  # R(-k)
            r = (r + flipped) / 2
            self.freq_half = r[..., : r.shape[-1] // 2 + 1].to(self.device, torch.float32)
        if space_filter is not None:
            s = torch.as_tensor(np.asarray(space_filter), dtype=torch.float64)
            self._set_shape(s.shape)
            self.space = s.to(self.device, torch.float32)
            self.space_sq = (s**2).to(self.device, torch.float32)

    def _set_shape(self, shape) -> None:
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise PdsError(f"filters must be [channels, size, size], got {_shape_text(shape)}")
        if self.shape is not None and shape != self.shape:
            raise PdsError(f"frequency and space filters differ in shape: {_shape_text(self.shape)} and {_shape_text(shape)}")
        self.shape = shape

    @classmethod
    def from_filters(cls, filters: Filters, alpha: float = 5.0, device="cpu") -> "Preconditioner":
        alpha = float(alpha)
        freq = filter_from_statistic(filters.freq, alpha, "frequency") if filters.freq is not None else None
        space = filter_from_statistic(filters.space, alpha, "space") if filters.space is not None else None
        return cls(freq, space, device=device, alpha=alpha, source=filters.describe())

    def check_shape(self, channels: int, size: int) -> None:
        want = (int(channels), int(size), int(size))
        if self.shape is not None and self.shape != want:
            raise PdsError(f"filters are {_shape_text(self.shape)} but the model makes {_shape_text(want)} images")

    def _check(self, x: torch.Tensor) -> None:
        if self.shape is not None and tuple(x.shape[-3:]) != self.shape:
            raise PdsError(f"filters are {_shape_text(self.shape)} but the images are {_shape_text(x.shape[-3:])}")

    def _freq(self, y: torch.Tensor) -> torch.Tensor:
        """F^-1 R F y (float32, real FFTs)."""
        if self.freq_half is None:
            return y
        spec = torch.fft.rfft2(y) * self.freq_half.to(y.device)
        return torch.fft.irfft2(spec, s=y.shape[-2:])

    def noise(self, z: torch.Tensor) -> torch.Tensor:
        """M z = F^-1 R F (S z)."""
        self._check(z)
        if self.space is not None:
            z = z * self.space.to(z.device)
        return self._freq(z)

    def grad(self, g: torch.Tensor) -> torch.Tensor:
        """M M^T g = F^-1 R F (S^2 F^-1 R F g)."""
        self._check(g)
        g = self._freq(g)
        if self.space_sq is not None:
            g = g * self.space_sq.to(g.device)
        return self._freq(g)

    def describe(self) -> str:
        kinds = "+".join(k for k, v in (("freq", self.freq_half), ("space", self.space)) if v is not None) or "identity"
        alpha = f", alpha {self.alpha:g}" if self.alpha is not None else ""
        return f"PDS preconditioner ({kinds}{alpha})" + (f" from {self.source}" if self.source else "")
