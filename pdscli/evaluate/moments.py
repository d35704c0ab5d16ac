"""Exact second moments of the samplers' outputs on the analytic Gaussian model: figures without
a sampling floor, for docs/exactness.md, docs/samplers.md, `--alpha auto`'s calibration and the tests.

Two ways to the same quantity, E|F_ortho(x_out - mu)|^2 per Fourier coefficient:

  * `exact_second_moments`, for any sampler that is linear in its noise draws and treats the
    samples of a batch independently (all but the PC family, whose step size depends on
    norms). It maps the draws z_0 (the prior), z_1, ... to x - mu = sum_j A_j z_j + b, with every
    A_j a Fourier multiplier (the model is stationary and diagonal in the DFT). One batched run
    with a unit impulse in draw j of sample j reads every A_j off at once; the second moment of
    each output coefficient is then sum_j |A_j|^2 + |F b|^2, exactly (up to float32 rounding).
  * The closed recursions (`pc_second_moments`, `ddpm_second_moments`,
    `accel_sde_second_moments`), for pc / pds / predictor / ddpm / accel-sde with a
    frequency-only PDS filter, the PC family included; on a `ReducedModel` they are ~10x faster.

Their KL from the data spectrum (`kl_of_moments`, `spectral_kl_of_moments`) is
`GaussianImageModel.spectral_kl`'s measure without the estimate's 1/(4n) floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pdscli.errors import PdsError
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.divergence import gaussian_kl, mean_gaussian_kl
from pdscli.precondition.operator import filter_from_statistic
from pdscli.samplers.accelerated import sde_noise_scales
from pdscli.samplers.grids import geometric, pc_steps


def exact_second_moments(model: GaussianImageModel, sampler, steps, *, precond=None, max_draws: int | None = None) -> torch.Tensor:
    """E|F_ortho(x_out - mu)|^2 per coefficient, [C, H, W] float64, for `sampler` on `model`.

    The sampler must be linear in its draws and per-sample (see the module docstring);
    max_draws bounds how many noise draws it makes (default 2 len(steps) + 2)."""
    if model.channel_corr != 0.0:
        raise PdsError("exact_second_moments needs a model with uncorrelated channels")
    shape = model.shape
    probes = int(max_draws or 2 * len(steps) + 2)
    count = [0]

    def impulses() -> torch.Tensor:
        # Draw j: sample j holds a unit impulse at pixel (0, 0) of every channel, the others zero.
        j = count[0]
        count[0] += 1
        if j >= probes:
            raise RuntimeError(f"the sampler drew noise more than {probes} times")
        z = torch.zeros((probes, *shape), dtype=torch.float32, device=model.device)
        z[j, :, 0, 0] = 1.0
        return z

    mu = model.mean

    def centred(x, sigma):  # the same model with mean 0: the sampler is then linear, not affine
        return model.score(x + mu, sigma)

    response = sampler(centred, impulses, steps, precond=precond).detach().to("cpu", torch.float64)
    n = shape[1] * shape[2]
    gains = torch.fft.fft2(response, norm="ortho") * math.sqrt(n)  # [probes, C, H, W]: A_j per coefficient
    zeros = lambda: torch.zeros((1, *shape), dtype=torch.float32, device=model.device)
    bias = sampler(model.score, zeros, steps, precond=precond).detach().to("cpu", torch.float64) - mu
    return (gains.abs() ** 2).sum(0) + torch.fft.fft2(bias[0], norm="ortho").abs() ** 2


def kl_of_moments(model: GaussianImageModel, moments: torch.Tensor) -> float:
    """Mean over coefficients of KL(N(0, v) || N(0, lam)) = 1/2 (r - 1 - ln r), r = v / lam."""
    return mean_gaussian_kl(moments, model.lam)


def exact_spectral_kl(model: GaussianImageModel, sampler, steps, *, precond=None) -> float:
    """The population spectral KL of a linear per-sample sampler's output (no sampling floor)."""
    return kl_of_moments(model, exact_second_moments(model, sampler, steps, precond=precond))



# -- the recursions ------------------------------------------------------------------------------
#
# The analytic model is diagonal in the (orthonormal) Fourier basis and, for stationary data, so
# is a frequency-only PDS preconditioner (the space statistic is flat, its filter ~1). Every
# update of pc / ddpm / accel-sde is then linear per coefficient, so the second moment
# q_k = E|F(x - mu)|_k^2 -- what `GaussianImageModel.spectral_kl` measures from samples --
# follows a closed recursion (P = R^2 the squared filter, A = lam + sigma^2 at the score's sigma):
#   start       q = sigma_max^2 P (+ HW mu^2 at DC: the prior's mean is 0, the data's is mu)
#   corrector   q <- (1 - e P/A)^2 q + 2 e P,  e = 2 (snr |Mz| / |MM^T s|)^2
#   predictor   q <- (1 - D P/A)^2 q + D P     (no noise on the last step: the output is x_mean)
#   accel-sde   q <- q + D/2 P, then q <- (1 - D P/A)^2 q + c^2 P  (sde_noise_scales)
#   denoise     q <- (1 - sigma^2/A)^2 q       (the grids' last step, unpreconditioned)
# The only approximation: the corrector's batch-mean norms are replaced by sqrt of their
# expectations (exact as the dimension grows; tests/test_alpha.py checks it by Monte Carlo).


@dataclass(frozen=True)
class ReducedModel:
    """An analytic model's distinct Fourier coefficients, each once with its multiplicity: the
    recursions below give the same numbers ~10x faster (coefficients with the same variance and
    filter evolve identically). The DC coefficient stays first, on its own. lam [1, 1, U]."""

    lam: torch.Tensor
    weights: torch.Tensor
    mean: float
    image_size: int
    settings: object
    channel_corr: float = 0.0


def reduce_model(model) -> ReducedModel:
    """`model` (GaussianImageModel, uncorrelated channels) with duplicate coefficients merged."""
    if getattr(model, "channel_corr", 0.0):
        raise PdsError("the exact PDS recursion needs uncorrelated channels")
    flat = model.lam.reshape(-1, model.image_size**2)  # [C, HW]; DC is column 0 of each channel
    dc = flat[:, 0]
    rest, counts = torch.unique(flat[:, 1:].reshape(-1), return_counts=True)
    dcs, dc_counts = torch.unique(dc, return_counts=True)
    if len(dcs) != 1:
        raise PdsError("the reduced recursion needs channels with the same spectrum")
    lam = torch.cat([dcs, rest]).to(torch.float64)[None, None]
    weights = torch.cat([dc_counts, counts]).to(torch.float64)[None, None]
    return ReducedModel(lam, weights, model.mean, model.image_size, model.settings)


def _weights(model, like: torch.Tensor):
    w = getattr(model, "weights", None)
    return torch.ones_like(like) if w is None else w


def expected_freq_statistic(model) -> np.ndarray:
    """The PDS frequency statistic log(1 + E|fft2(x)|^2) of the analytic model, exactly
    (unnormalised FFT: HW lam, plus (HW mu)^2 at DC). Single-channel or uncorrelated channels."""
    if getattr(model, "channel_corr", 0.0):
        raise PdsError("the exact PDS recursion needs uncorrelated channels")
    hw = model.image_size**2
    power = hw * model.lam.clone()
    power[:, 0, 0] += (hw * model.mean) ** 2
    return torch.log1p(power).numpy()


def squared_filter(statistic: np.ndarray, alpha: float | None) -> torch.Tensor:
    """P = R^2 for a frequency statistic and alpha; all ones for alpha None (vanilla)."""
    if alpha is None:
        return torch.ones(statistic.shape, dtype=torch.float64)
    return torch.as_tensor(filter_from_statistic(statistic, alpha), dtype=torch.float64) ** 2


def _prior(model, steps, p: torch.Tensor) -> torch.Tensor:
    q = float(steps.sigma_max) ** 2 * p.clone()
    q[..., :, 0, 0] += model.image_size**2 * model.mean**2
    return q


def pc_second_moments(model, steps, p: torch.Tensor, snr: float, *, corrector: bool = True,
                      predictor: bool = True) -> torch.Tensor:
    """E|F_ortho(x_out - mu)|^2 per coefficient for `pdscli.samplers.pc` (or the predictor- /
    corrector-only loop) with M M^T = diag(p). p is [C, H, W], or [K, C, H, W] for K at once."""
    lam = model.lam
    q = _prior(model, steps, p)
    dims = (-3, -2, -1)
    w = _weights(model, lam)
    total_p = (w * p).sum(dim=dims, keepdim=True)
    for i in range(len(steps)):
        sigma, hi, lo = float(steps.sigma[i]), float(steps.sigma_hi[i]), float(steps.sigma_lo[i])
        a = lam + sigma**2
        if corrector:
            e = 2.0 * snr**2 * total_p / (w * p**2 * q / a**2).sum(dim=dims, keepdim=True)
            q = (1 - e * p / a) ** 2 * q + 2 * e * p
        if predictor:
            d = hi**2 - lo**2
            q = (1 - d * p / a) ** 2 * q + (d * p if lo > 0 else 0.0)
    return q


def _sde_second_moments(model, steps, p: torch.Tensor, noise_variances) -> torch.Tensor:
    """The reverse-SDE samplers' recursion on a grid whose last step is the denoise:
    `noise_variances(hi, lo, d) -> (before, after)` are the variances (per unit of p) of the
    noise added before the score evaluation and after the update."""
    lam = model.lam
    q = _prior(model, steps, p)
    for i in range(len(steps)):
        sigma, hi, lo = float(steps.sigma[i]), float(steps.sigma_hi[i]), float(steps.sigma_lo[i])
        a = lam + sigma**2
        if lo == 0:
            q = (1 - sigma**2 / a) ** 2 * q
        else:
            d = (hi - lo) * (hi + lo)
            before, after = noise_variances(hi, lo, d)
            q = (1 - d * p / a) ** 2 * (q + before * p) + after * p
    return q


def ddpm_second_moments(model, steps, p: torch.Tensor) -> torch.Tensor:
    """The same for `pdscli.samplers` ddpm: all the step's noise after the update."""
    return _sde_second_moments(model, steps, p, lambda hi, lo, d: (0.0, d))


def _accel_sde_variances(hi: float, lo: float, d: float) -> tuple[float, float]:
    pre, post = sde_noise_scales(hi, lo)
    return pre**2, post**2


def accel_sde_second_moments(model, steps, p: torch.Tensor) -> torch.Tensor:
    """The same for accel-sde (half the noise first, the score at the perturbed point)."""
    return _sde_second_moments(model, steps, p, _accel_sde_variances)


def spectral_kl_of_moments(model, q: torch.Tensor) -> torch.Tensor | float:
    """`GaussianImageModel.spectral_kl` of a population with second moments q (no sampling):
    a float for q [C, H, W], a [K] tensor for q [K, C, H, W]; inf where the run diverged."""
    w = _weights(model, model.lam)
    kl = (w * gaussian_kl(q / model.lam)).sum(dim=(-3, -2, -1)) / w.sum()
    kl = torch.where(torch.isfinite(kl), kl, torch.full_like(kl, math.inf))
    return float(kl) if kl.ndim == 0 else kl


def exact_moments(model, sampler: str, n_steps: int, p: torch.Tensor, *, snr: float | None = None) -> torch.Tensor:
    """Second moments of `sampler` (pds / pc, predictor, ddpm, accel-sde) at n_steps on its default grid."""
    snr = model.settings.snr if snr is None else float(snr)
    if sampler in ("pds", "pc"):
        return pc_second_moments(model, pc_steps(model.settings, n_steps), p, snr)
    if sampler == "predictor":
        return pc_second_moments(model, pc_steps(model.settings, n_steps), p, snr, corrector=False)
    if sampler == "ddpm":
        return ddpm_second_moments(model, geometric(model.settings, n_steps), p)
    if sampler == "accel-sde":
        return accel_sde_second_moments(model, geometric(model.settings, n_steps), p)
    raise PdsError(f"no exact recursion for sampler {sampler!r}")


def recursion_spectral_kl(model, sampler: str, n_steps: int, alpha: float | None, *, statistic: np.ndarray | None = None,
                          snr: float | None = None) -> float:
    """Exact spectral KL of `sampler` with the frequency filter at this alpha (None: without)."""
    stat = expected_freq_statistic(model) if statistic is None else statistic
    return spectral_kl_of_moments(model, exact_moments(model, sampler, n_steps, squared_filter(stat, alpha), snr=snr))


def pc_spectral_kl(model, n_steps: int, alpha: float | None, *, statistic: np.ndarray | None = None,
                   snr: float | None = None) -> float:
    """Exact spectral KL of PC (alpha None) or PDS (frequency filter, this alpha) on the analytic
    model, on the reference grid `pc_steps(model.settings, n_steps)`."""
    return recursion_spectral_kl(model, "pds", n_steps, alpha, statistic=statistic, snr=snr)
