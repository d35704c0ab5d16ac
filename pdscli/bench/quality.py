"""Quality next to speed: the exact spectral KL on the analytic model, a spectral statistic
against reference images on a network, and where those reference images come from."""

from __future__ import annotations

import math

import numpy as np
import torch

from pdscli.bench.config import ANALYTIC, BenchConfig, error_line
from pdscli.bench.model import BenchModel
from pdscli.errors import PdsError
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.divergence import gaussian_kl
from pdscli.evaluate.measures import mixture_quality, mode_tv
from pdscli.evaluate.mixture import MixtureImageModel
from pdscli.images import image_files, load_image
from pdscli.train.datasets import load_digits


def finite_or_none(v):
    return float(v) if v is not None and math.isfinite(float(v)) else None


class ExactQuality:
    """Spectral KL to the analytic model's exact spectrum (pdscli.evaluate.analytic, docs/exactness.md)."""

    metric = "spectral_kl"
    description = ("mean over all Fourier coefficients of KL(N(0, v_hat) || N(0, lam)): the samples' per-frequency "
                   "variance against the exact one (0 = exact; the floor is what exact samples of the same count score)")

    def __init__(self, gaussian: GaussianImageModel, seed: int = 0):
        self.g, self.seed, self._floors = gaussian, seed, {}

    def measure(self, x: torch.Tensor) -> dict:
        x = x.to(torch.float32)
        value = self.g.spectral_kl(x)
        high = float(self.g.variance_ratio_by_band(x, 4)[-1])
        return {"metric": self.metric, "value": finite_or_none(value), "high_band_variance_ratio": finite_or_none(high),
                "samples": int(x.shape[0]), "floor": self.floor(int(x.shape[0]))}

    def floor(self, n: int) -> float:
        if n not in self._floors:
            exact = self.g.sample(n, torch.Generator(device=self.g.device).manual_seed(10_000 + self.seed))
            self._floors[n] = float(self.g.spectral_kl(exact))
        return self._floors[n]


class ReferenceQuality:
    """Spectral KL against a folder of reference images, in radial frequency bands.

    With mu the reference's mean image and F the orthonormal 2-D DFT, the power of a set of
    images in band b of channel c is P[c, b] = mean over images and coefficients of band b of
    |F(x - mu)|^2. The statistic is the mean over (c, b) of 1/2 (r - 1 - ln r), r = P_gen / P_ref:
    the analytic model's exactness figure with the reference's measured spectrum in place of
    the exact one. It sees second-order statistics only (too much or too little energy per
    frequency band, a brightness or colour shift through the DC band): the leftover noise or
    over-smoothing of too few steps. It is blind to structure, phase and content."""

    metric = "spectral_kl_vs_reference"
    description = ("mean over channels and 8 radial frequency bands of KL between the generated and the reference "
                   "power per band (second-order statistics only; not FID); the floor is what as many held-out "
                   "reference images score against the rest")
    BANDS = 8

    def __init__(self, images: torch.Tensor, seed: int = 0):
        self.images, self.seed, self._floors = images, seed, {}
        self.mean = images.mean(dim=0)
        size = images.shape[-1]
        f = torch.fft.fftfreq(size, dtype=torch.float64)
        radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
        self.band = torch.clamp((radius / 0.5 * self.BANDS).floor().long(), max=self.BANDS - 1)
        self.ref_power = self.band_power(images)

    def band_power(self, x: torch.Tensor) -> torch.Tensor:
        """[C, BANDS] mean power of x - mu per radial band."""
        coeff = torch.fft.fft2(x.double() - self.mean, norm="ortho")
        power = (coeff.abs() ** 2).mean(dim=0)  # [C, H, W]
        flat_band = self.band.reshape(-1)
        out = torch.zeros(power.shape[0], self.BANDS, dtype=torch.float64)
        out.index_add_(1, flat_band, power.reshape(power.shape[0], -1))
        return out / torch.bincount(flat_band, minlength=self.BANDS).double()

    def _kl(self, power: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        r = power / ref
        return float(gaussian_kl(r).mean()), float(r[:, -1].mean())

    def measure(self, x: torch.Tensor) -> dict:
        # Clipped to [0, 1] as saved images are: the reference images live there too.
        value, high = self._kl(self.band_power(x.detach().cpu().clamp(0, 1)), self.ref_power)
        return {"metric": self.metric, "value": finite_or_none(value), "high_band_variance_ratio": finite_or_none(high),
                "samples": int(x.shape[0]), "floor": self.floor(int(x.shape[0]))}

    def floor(self, n: int) -> float | None:
        """n held-out reference images against the rest (None when there are too few to split)."""
        if n not in self._floors:
            total = self.images.shape[0]
            if total < n + 2:
                self._floors[n] = None
            else:
                order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))
                held, rest = self.images[order[:n]], self.images[order[n:]]
                self._floors[n] = self._kl(self.band_power(held), self.band_power(rest))[0]
        return self._floors[n]


class MixtureQuality:
    """Mode proportions on the mixture model (pdscli.evaluate.measures): TV from the true weights."""

    metric = "mode_tv"
    description = ("total variation between the share of samples in each mode (most likely mode at sigma 0) and the "
                   "mixture's weights; also the per-mode spectral KL (the floor is what exact samples of the same count score)")

    def __init__(self, mixture: MixtureImageModel, seed: int = 0):
        self.m, self.seed, self._floors = mixture, seed, {}

    def measure(self, x: torch.Tensor) -> dict:
        q = mixture_quality(self.m, x.to(torch.float32))
        return {"metric": self.metric, "value": finite_or_none(q["mode_tv"]), "mean_mode_kl": q["mean_mode_kl"],
                "mode_shares": q["mode_shares"], "samples": int(x.shape[0]), "floor": self.floor(int(x.shape[0]))}

    def floor(self, n: int) -> float:
        if n not in self._floors:
            exact, _ = self.m.sample(n, torch.Generator(device=self.m.device).manual_seed(10_000 + self.seed))
            self._floors[n] = mode_tv(self.m, exact)
        return self._floors[n]


def make_quality(model: BenchModel, reference: torch.Tensor | None, seed: int):
    if model.kind == ANALYTIC and model.mixture is not None:
        return MixtureQuality(model.mixture, seed)
    if model.kind == ANALYTIC:
        return ExactQuality(model.gaussian, seed)
    if reference is not None:
        return ReferenceQuality(reference, seed)
    return None


def load_reference(cfg: BenchConfig, model: BenchModel) -> torch.Tensor:
    """Up to --reference-limit images of --reference at the model's size: float64 [N, C, H, W]
    in [0, 1], read as `pds filters` reads them (centre square crop, resize)."""
    files = image_files(cfg.reference)[: cfg.reference_limit]
    c, size, _ = model.shape
    if c not in (1, 3):
        raise PdsError(f"--reference needs a 1- or 3-channel model, this one has {c} channels")
    images = []
    for path in files:
        try:
            images.append(load_image(path, size=size, channels=c))
        except Exception as e:  # Pillow raises many types for a broken file
            raise PdsError(f"cannot read reference image {path}: {error_line(e)}") from None
    if len(images) < 2:
        raise PdsError(f"--reference {cfg.reference} holds {len(images)} image; the statistic needs at least 2")
    return torch.from_numpy(np.stack(images)).double()


def reference_images(cfg: BenchConfig, model: BenchModel) -> tuple[torch.Tensor | None, str | None]:
    """(images, where from): --reference; for the built-in model, the digits it was trained on
    (scikit-learn's, shipped with it: no download); else (None, None)."""
    if cfg.reference is not None:
        return load_reference(cfg, model), f"--reference {cfg.reference}"
    if not model.is_builtin:
        return None, None
    try:
        images = load_digits(size=model.shape[1], channels=model.shape[0])
    except PdsError:  # scikit-learn missing: no quality figure rather than no bench
        return None, None
    return images[: cfg.reference_limit].double(), "the built-in model's training data (scikit-learn digits)"
