"""Teleportation: the high-noise phase of sampling in closed form, at no network call.

At high noise the score of a data set is close to that of the Gaussian with the data's mean and
covariance (Wang & Vastola, "The Unreasonable Effectiveness of Gaussian Score Approximation for
Diffusion Models", 2023). Taking that covariance stationary per channel, i.e. diagonal in the
orthonormal 2-D DFT with variance lam per coefficient (the data's spectrum), both reverse
processes are solved per Fourier coefficient of x - mu:

    probability-flow ODE, sigma_from -> sigma_to:   x' = mu + sqrt((lam + s_to^2) / (lam + s_from^2)) (x - mu)
    reverse SDE (the exact Gaussian transition):    x' = mu + a (x - mu) + sqrt(b) z,
        a = (lam + s_to^2) / (lam + s_from^2),   b = (lam + s_to^2) (s_from^2 - s_to^2) / (lam + s_from^2)

(the second is the posterior of x_to given x_from under x_from = x_to + sqrt(s_from^2 - s_to^2) n).
A sampler then spends its whole budget on a grid from sigma_to down: `TeleportNoise` hands it
x(sigma_to) / sigma_to as its first draw, which every sampler multiplies by its grid's sigma_max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pdscli.errors import PdsError


@dataclass(frozen=True)
class DataGaussian:
    """The data's Gaussian approximation: `mean` [C, H, W] and `spectrum` [C, H, W] (the variance of
    each orthonormal Fourier coefficient of x - mean, unshifted layout), float64 tensors."""

    mean: torch.Tensor
    spectrum: torch.Tensor

    def __post_init__(self):
        for name in ("mean", "spectrum"):
            object.__setattr__(self, name, torch.as_tensor(getattr(self, name)).detach().to("cpu", torch.float64))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    @property
    def pixel_std(self) -> float:
        """The data's standard deviation per pixel (the mean of the spectrum is the mean pixel variance)."""
        return float(self.spectrum.mean().sqrt())

    def _filter(self, x: torch.Tensor, gain: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """mean + F^-1 [gain F (x - mean) + extra], float32; gain and extra in the rfft2 half layout."""
        size = self.mean.shape[-2:]
        mean = self.mean.to(x.device)
        spec = torch.fft.rfft2(x.double() - mean, norm="ortho") * gain.to(x.device)
        if extra is not None:
            spec = spec + extra
        return (torch.fft.irfft2(spec, s=size, norm="ortho") + mean).float()

    def _half(self) -> torch.Tensor:
        return self.spectrum[..., : self.spectrum.shape[-1] // 2 + 1]

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The probability-flow ODE's exact map of this Gaussian from sigma_from to sigma_to."""
        lam = self._half()
        return self._filter(x, torch.sqrt((lam + sigma_to**2) / (lam + sigma_from**2)))

    def transition(self, x: torch.Tensor, sigma_from: float, sigma_to: float, z: torch.Tensor) -> torch.Tensor:
        """A draw of x(sigma_to) given x(sigma_from) under this Gaussian (the reverse SDE's exact
        transition); z is white N(0, I) noise shaped like x."""
        lam = self._half()
        a = (lam + sigma_to**2) / (lam + sigma_from**2)
        b = a * (sigma_from**2 - sigma_to**2)
        colored = torch.fft.rfft2(z.double(), norm="ortho") * b.sqrt().to(z.device)
        return self._filter(x, a, colored)


class TeleportNoise:
    """A sampler's noise source whose first draw is x(sigma_to) / sigma_to: the prior sample
    sigma_from * z carried to sigma_to by `gaussian` (its ODE map, or with `stochastic` its exact
    transition, drawing one more N(0, I) from `noise`). Every later draw is `noise`'s own, so a
    sample's images stay a function of its seed and index."""

    def __init__(self, noise, gaussian: DataGaussian, sigma_from: float, sigma_to: float, *, stochastic: bool):
        self.noise, self.gaussian = noise, gaussian
        self.sigma_from, self.sigma_to, self.stochastic = float(sigma_from), float(sigma_to), stochastic
        self.started = False

    def __call__(self) -> torch.Tensor:
        if self.started:
            return self.noise()
        self.started = True
        x = self.sigma_from * self.noise()
        if self.stochastic:
            x = self.gaussian.transition(x, self.sigma_from, self.sigma_to, self.noise())
        else:
            x = self.gaussian.flow(x, self.sigma_from, self.sigma_to)
        return x / self.sigma_to

    def __len__(self) -> int:
        return len(self.noise)


def spread(gaussian: DataGaussian) -> float:
    """The data's RMS distance from its mean, sqrt(E |x - mu|^2) = sqrt(sum of the spectrum): the
    scale below which the data's shape (not only its Gaussian approximation) steers the score.
    `--teleport auto` picks sigma_t as a multiple of it, so the choice carries across data sets."""
    return float(gaussian.spectrum.sum().sqrt())


# --teleport auto: sigma_t = ratio * spread per sampler, for budgets up to the first number of
# each pair (the first pair whose bound is >= the run's NFE applies; None there, and past the last
# pair, means no teleport). Read off docs/data/teleport.json (scripts/teleport_table.py; the
# tables are in docs/samplers.md, "Teleportation"): the ratio that is better than sampling from
# sigma_max on every model measured (the Gaussian's KL, the mixture's per-mode KL and mode TV, the
# built-in network's leftover high-frequency energy), the best of those on the mixture's mode TV.
# For example dpm++2m at 5 NFE, 0.3: KL 3.5e-3 against 6.0e-2 on the Gaussian, per-mode KL
# 9.0e-3 and mode TV 0.13 against 0.12 and 0.69 on the mixture, and the built-in network passes the
# digit check (0.25 is better on both exact models but puts 17 % of the digits in one class; lower
# ratios win on the Gaussian and lose modes on the mixture).
AUTO_RATIOS: dict[str, tuple[tuple[int, float | None], ...]] = {
    "dpm++2m": ((5, 0.3), (10, 0.4), (20, 0.6)),
    "dpm++3m": ((8, None), (10, 0.6), (15, 1.0)),
    "heun": ((20, 0.6),),
    "ipndm": ((5, 0.25), (8, 0.4), (10, 0.6)),
    # 6-9 NFE: worse on the Gaussian at every ratio measured.
    "dpm++2m-sde": ((5, 1.0), (9, None), (20, 0.6)),
}


@dataclass(frozen=True)
class TeleportChoice:
    """What --teleport decided: sigma_t (None: no teleport), the flag as given and why."""

    sigma_t: float | None
    given: str
    reason: str

    def to_dict(self) -> dict:
        return {"sigma_t": self.sigma_t, "given": self.given, "reason": self.reason}


def parse_teleport(value: str | None) -> str | float:
    """--teleport as given: "auto", "off" or a noise level (a positive number); None is auto."""
    if value is None:
        return "auto"
    text = str(value).strip().lower()
    if text in ("auto", "off"):
        return text
    try:
        sigma = float(text)
    except ValueError:
        sigma = float("nan")
    if not (math.isfinite(sigma) and sigma > 0):
        raise PdsError(f"--teleport must be auto, off or a positive noise level, got {value!r}")
    return sigma


def auto_ratio(sampler: str, nfe: int) -> float | None:
    """The measured ratio sigma_t / spread for `sampler` at `nfe` network calls, or None (no gain measured)."""
    for bound, ratio in AUTO_RATIOS.get(sampler, ()):
        if nfe <= bound:
            return ratio
    return None


def choose_teleport(value: str | float, *, gaussian: DataGaussian | None, sampler: str, nfe: int, sigma_min: float,
                    sigma_max: float, blocked: str | None = None) -> TeleportChoice:
    """sigma_t for a run. `value` from `parse_teleport`; `gaussian` the statistics at hand (None:
    none); `blocked` a reason this run cannot teleport (a preconditioner, the PC grid). A number
    that cannot be used is an error; auto falls back to no teleport and says why."""
    given = value if isinstance(value, str) else f"{value:g}"
    if value == "off":
        return TeleportChoice(None, given, "--teleport off")
    if isinstance(value, float):
        if blocked:
            raise PdsError(f"--teleport {given}: {blocked}")
        if gaussian is None:
            raise PdsError(f"--teleport {given} needs the data's statistics: pass --masks FILE made by `pds filters`")
        if not sigma_min < value < sigma_max:
            raise PdsError(f"--teleport {given} must lie between the model's sigma_min {sigma_min:g} and sigma_max {sigma_max:g}")
        return TeleportChoice(value, given, f"--teleport {given}")
    if blocked:
        return TeleportChoice(None, given, f"auto: off ({blocked})")
    if gaussian is None:
        return TeleportChoice(None, given, "auto: off (no data statistics at hand)")
    ratio = auto_ratio(sampler, nfe)
    if ratio is None:
        return TeleportChoice(None, given, f"auto: off (no measured gain for {sampler} at {nfe} network calls)")
    sigma_t = ratio * spread(gaussian)
    if not sigma_min < sigma_t < sigma_max:
        return TeleportChoice(None, given, f"auto: off (sigma_t {sigma_t:.4g} lies outside the model's noise range)")
    return TeleportChoice(sigma_t, given, f"auto: {ratio:g} x the data's spread {spread(gaussian):.4g} "
                                          f"for {sampler} at {nfe} network calls (docs/samplers.md, teleportation)")
