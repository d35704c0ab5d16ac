"""An exact non-Gaussian score model: a mixture of stationary Gaussian image models.

    p(x) = sum_k w_k N(x; mu_k, Sigma_k)        Sigma_k circulant per channel (spectrum lam_k)

Noised with sigma each component stays Gaussian (covariance Sigma_k + sigma^2 I), so the score is
closed form:

    score(x, sigma) = sum_k r_k(x, sigma) score_k(x, sigma),
    r_k = softmax_k( log w_k + log N(x; mu_k, Sigma_k + sigma^2 I) )

with score_k the component's own exact score (`GaussianImageModel.score`). The log densities are
diagonal in the orthonormal DFT: log N = -1/2 sum_f |F(x - mu_k)|_f^2 / (lam_kf + sigma^2)
- 1/2 sum_f log(2 pi (lam_kf + sigma^2)), computed in float64.

Unlike a single Gaussian, a sampler can get the mode proportions wrong here (modes separate at
high noise, where few-step samplers take their largest steps): `pdscli.evaluate.measures`
assigns each sample to its most likely mode and compares the shares with the weights.

Default components (3 x 32 x 32, channels uncorrelated, all with mean 0.5): a smooth mode, a very
smooth one with large contrast, and a faint rough texture; weights 0.5 / 0.3 / 0.2. The noise range
and snr are those of the Gaussian model (sigma 0.01 to 378 * size / 64, snr 0.075).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdscli.errors import PdsError
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.score import ScoreModel


@dataclass(frozen=True)
class Component:
    weight: float
    mean: float
    std: float
    power: float


# One mean for all: a VE sampler starts from N(0, sigma_max^2 I), whose zero-frequency
# coefficient is off the data's by mean * sqrt(HW); with different means that offset alone
# tilts the mode shares (means 0.35 / 0.6 / 0.5 gave every converged ODE solver a TV of 0.11),
# hiding the solvers' own errors. The modes differ in their spectra: they separate at moderate
# noise, where few-step samplers take their largest steps.
DEFAULT_COMPONENTS = (
    Component(weight=0.5, mean=0.5, std=0.10, power=1.0),
    Component(weight=0.3, mean=0.5, std=0.25, power=1.5),
    Component(weight=0.2, mean=0.5, std=0.06, power=0.5),
)


class MixtureImageModel:
    """A mixture of `GaussianImageModel`s with an exact score (float32 out, float64 inside)."""

    def __init__(self, image_size: int = 32, channels: int = 3, components=DEFAULT_COMPONENTS, *,
                 sigma_min: float = 0.01, sigma_max: float | None = None, num_scales: int = 2000,
                 snr: float = 0.075, device="cpu"):
        components = tuple(components)
        if not components or any(not c.weight > 0 for c in components):
            raise PdsError("a mixture needs at least one component, every weight positive")
        total = sum(c.weight for c in components)
        self.weights = torch.tensor([c.weight / total for c in components], dtype=torch.float64)
        self.components = [
            GaussianImageModel(image_size, channels, mean=c.mean, std=c.std, power=c.power, sigma_min=sigma_min,
                               sigma_max=sigma_max, num_scales=num_scales, snr=snr, device=device)
            for c in components
        ]
        self.spec = components
        first = self.components[0]
        self.image_size, self.channels, self.device = first.image_size, first.channels, first.device
        self.settings = first.settings

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _spectra(self, x: torch.Tensor, sigma):
        """(F_ortho x, [B, K] log w_k + log N_k, per-component variances lam_k + sigma^2), float64, CPU.

        F(x - mu_k) = F x - mu_k sqrt(HW) at the zero frequency only (mu_k is constant per image),
        so one transform and one |F x|^2 serve every component; the zero frequency is corrected
        per component."""
        self.components[0]._check(x)
        b = x.shape[0]
        s2 = self.components[0]._per_sample(sigma, b, "cpu").reshape(b, 1, 1, 1) ** 2
        spec = torch.fft.fft2(x.detach().to("cpu", torch.float64), norm="ortho")
        power = spec.real**2 + spec.imag**2
        dc = spec[..., 0, 0]  # [B, C]
        root_n = float(self.image_size)
        levels, inverse = torch.unique(s2.reshape(-1), return_inverse=True)  # usually one level per call
        logs, variances = [], []
        for w, comp in zip(self.weights, self.components):
            var = comp.lam[None] + s2  # [B, C, H, W]
            quad = (power / var).flatten(1).sum(1)
            dc_k = dc - comp.mean * root_n
            quad = quad + ((dc_k.abs() ** 2 - dc.abs() ** 2) / var[..., 0, 0]).sum(1)
            logdet = torch.log(2 * math.pi * (comp.lam[None] + levels[:, None, None, None])).flatten(1).sum(1)[inverse]
            logs.append(math.log(float(w)) - 0.5 * (quad + logdet))
            variances.append(var)
        return spec, torch.stack(logs, dim=1), variances

    def log_densities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """log w_k + log N(x; mu_k, Sigma_k + sigma^2 I) for every sample and component, [B, K] float64."""
        return self._spectra(x, sigma)[1]

    def responsibilities(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """P(component k | x at noise level sigma), [B, K] float64."""
        return torch.softmax(self.log_densities(x, sigma), dim=1)

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """grad log p_sigma(x), exact: x [B, C, H, W] float32, sigma [B] -> [B, C, H, W] float32.

        sum_k r_k score_k = -F^-1 [ F x sum_k r_k / (lam_k + sigma^2) - (zero frequency) sum_k r_k
        mu_k sqrt(HW) / (lam_k0 + sigma^2) ]: one inverse transform for the whole mixture."""
        spec, logs, variances = self._spectra(x, sigma)
        r = torch.softmax(logs, dim=1)
        gain = torch.zeros_like(variances[0])
        dc_shift = torch.zeros_like(variances[0][..., 0, 0])
        for k, (comp, var) in enumerate(zip(self.components, variances)):
            rk = r[:, k, None, None, None] / var
            gain += rk
            dc_shift += comp.mean * float(self.image_size) * rk[..., 0, 0]
        total = spec * gain
        total[..., 0, 0] -= dc_shift
        return -torch.fft.ifft2(total, norm="ortho").real.to(x.device, torch.float32)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact draws and their components: ([n, C, H, W] float32, [n] long)."""
        modes = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        x = torch.empty((n, *self.shape), dtype=torch.float32, device=self.device)
        for k, comp in enumerate(self.components):
            idx = (modes == k).nonzero().flatten()
            if len(idx):
                x[idx] = comp.sample(len(idx), generator=generator)
        return x, modes

    def moment_matched(self) -> GaussianImageModel:
        """The stationary Gaussian with the mixture's mean and spectrum (its second-order statistics,
        what PDS filters of its samples would hold). With unequal means the spread of the means
        adds to the zero frequency's variance."""
        g = GaussianImageModel(self.image_size, self.channels, sigma_min=self.settings.sigma_min,
                               sigma_max=self.settings.sigma_max, num_scales=self.settings.num_scales,
                               snr=self.settings.snr, device=self.device)
        means = torch.tensor([c.mean for c in self.spec], dtype=torch.float64)
        mean = float((self.weights * means).sum())
        lam = sum(float(w) * c.lam for w, c in zip(self.weights, self.components))
        lam[:, 0, 0] += float((self.weights * (means - mean) ** 2).sum()) * self.image_size**2
        g.mean, g.lam = mean, lam
        g._lam_half = lam[..., : self.image_size // 2 + 1].to(g.device)
        return g

    def describe(self) -> str:
        c, s = self.channels, self.image_size
        parts = ", ".join(f"{float(w):.2g} x (mean {m.mean:g}, std {m.std:g}, power {m.power:g})" for w, m in zip(self.weights, self.spec))
        return f"mixture of {len(self.spec)} stationary Gaussians {c}x{s}x{s}: {parts}"


def mixture_score_model(image_size: int = 32, channels: int = 3, device="cpu", **kwargs) -> ScoreModel:
    """The mixture model as a `ScoreModel` (name "mixture"); kwargs go to MixtureImageModel."""
    model = MixtureImageModel(image_size, channels, device=device, **kwargs)
    info = {
        "backend": "analytic",
        "precision": "fp32",
        "description": model.describe(),
        "weights": [float(w) for w in model.weights],
    }
    return ScoreModel(score=model.score, settings=model.settings, name="mixture", device=model.device, info=info)
