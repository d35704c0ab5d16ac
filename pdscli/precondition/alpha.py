"""`--alpha auto`: the PDS filter strength from the number of steps.

PDS's filter is alpha / (m / max(m) + alpha - 1): it is 1 where the data has most energy and
tops out near alpha / (alpha - 1) where it has least, so a small alpha is a strong
preconditioner and alpha -> infinity is no preconditioner (vanilla PC). The reference fixes
alpha = 5. On the exact (Gaussian) model that is right at 10 to 30 steps and wrong beyond
~50-100: the preconditioned predictor D M M^T s + sqrt(D) M z keeps the marginals only for
M M^T = I, so its bias does not shrink with the step, while vanilla's error does.

The rule (calibrated, see below and docs/samplers.md):

    h = ln(sigma_max / sigma_min) / (n_steps - 1)           the step in log sigma
    1 / (alpha - 1) = SLOPE * (h - H0)                        when h > H0
    alpha = clip(that, ALPHA_MIN, ALPHA_MAX); ALPHA_MAX (= off, to 1e-6) when h <= H0

Why this shape: vanilla PC's excess high-frequency variance is first order in h; PDS's bias is
first order in the filter's excess (max filter - 1 ~ 1 / (alpha - 1)); cancelling the two gives
1 / (alpha - 1) proportional to h, and below some h the bias is not worth paying at all. The
floor ALPHA_MIN = 5 (the reference value) keeps the preconditioned predictor away from
its instability: at 10-20 steps alpha <= 3 diverges on the exact model.

SLOPE and H0 come from `scripts/calibrate_alpha.py`: the exact second-moment recursion of the
PC / PDS loop (`pc_spectral_kl`, below) on the analytic model for several sizes and both
official setting families, choosing the pair that is never worse than vanilla at any step
count of the grid and closest to the per-step-count optimum. The PDS journal paper
(arXiv 2302.06504) states a relation between alpha and the number of iterations; its text
could not be read here, so this rule is our calibration, not the paper's formula.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pdscli.errors import PdsError

ALPHA_REFERENCE = 5.0  # the reference implementation's fixed alpha
ALPHA_MIN = 5.0  # never stronger than the reference: below ~3 the predictor diverges at 10-20 steps
ALPHA_MAX = 1e6  # "off": the filter is within 1e-6 of 1 everywhere (exactly vanilla to float32 rounding)
# Fitted by scripts/calibrate_alpha.py (tests/test_alpha.py re-checks them on the exact model).
SLOPE = 0.775
H0 = 0.035


def log_step(n_steps: int, sigma_min: float, sigma_max: float) -> float:
    """h = ln(sigma_max / sigma_min) / (n_steps - 1): the PC ladder's step in log sigma."""
    n = int(n_steps)
    if n < 2:
        return math.inf
    return math.log(float(sigma_max) / float(sigma_min)) / (n - 1)


def auto_alpha(n_steps: int, num_scales: int | None = None, *, sigma_min: float = 0.01, sigma_max: float = 378.0) -> float:
    """The calibrated PDS alpha for n_steps PC steps of a VE model with this sigma range.

    num_scales (the model's full step count) is accepted so that callers can pass what they
    have, but it does not enter: on the exact model the best alpha at a given step count is the
    same for num_scales 1000 and 2000 -- it follows the step in log sigma, not the speed-up
    num_scales / n_steps (docs/samplers.md, calibration table).
    """
    n = int(n_steps)
    if n < 1:
        raise PdsError(f"the number of steps must be at least 1, got {n_steps}")
    if not (0 < float(sigma_min) < float(sigma_max)):
        raise PdsError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    excess = SLOPE * (log_step(n, sigma_min, sigma_max) - H0)
    if excess <= 1.0 / (ALPHA_MAX - 1.0):
        return ALPHA_MAX
    return float(min(ALPHA_MAX, max(ALPHA_MIN, 1.0 + 1.0 / excess)))


def resolve_alpha(value, settings, n_steps: int) -> float:
    """`--alpha` as given on the command line: "auto" (auto_alpha for these settings and step
    count) or a number (the reference uses 5)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return auto_alpha(n_steps, settings.num_scales, sigma_min=settings.sigma_min, sigma_max=settings.sigma_max)
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise PdsError(f"--alpha must be a number or 'auto', got {value!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise PdsError(f"--alpha must be a positive number or 'auto', got {value!r}")
    return alpha


# -- the calibration yardstick: PC / PDS on the analytic model, without sampling --------------
#
# The analytic model is diagonal in the (orthonormal) Fourier basis and, for stationary data, so
# is a frequency-only PDS preconditioner (the space statistic is flat, its filter ~1). Every PC
# update is then linear per coefficient, so the second moment q_k = E|F(x - mu)|_k^2 -- what
# `GaussianImageModel.spectral_kl` measures from samples -- follows a closed recursion:
#   start       q = sigma_max^2 P (+ HW mu^2 at DC: the prior's mean is 0, the data's is mu)
#   corrector   q <- (1 - e P/A)^2 q + 2 e P,  e = 2 (snr |Mz| / |MM^T s|)^2, A = lam + sigma^2
#   predictor   q <- (1 - D P/A)^2 q + D P     (no noise on the last step: the output is x_mean)
# with P = R^2 the squared filter. The only approximation: the corrector's batch-mean norms are
# replaced by sqrt of their expectations (exact as the dimension grows; tests/test_alpha.py checks
# it against `pdscli.samplers.pds` by Monte Carlo).


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
    from pdscli.precondition.operator import filter_from_statistic

    if alpha is None:
        return torch.ones(statistic.shape, dtype=torch.float64)
    return torch.as_tensor(filter_from_statistic(statistic, alpha), dtype=torch.float64) ** 2


def pc_second_moments(model, steps, p: torch.Tensor, snr: float) -> torch.Tensor:
    """E|F_ortho(x_out - mu)|^2 per coefficient for `pdscli.samplers.pc` with M M^T = diag(p).
    p is [C, H, W], or [K, C, H, W] for K preconditioners at once."""
    lam = model.lam
    hw = model.image_size**2
    q = float(steps.sigma_max) ** 2 * p.clone()
    q[..., :, 0, 0] += hw * model.mean**2
    dims = (-3, -2, -1)
    total_p = p.sum(dim=dims, keepdim=True)
    for i in range(len(steps)):
        sigma, hi, lo = float(steps.sigma[i]), float(steps.sigma_hi[i]), float(steps.sigma_lo[i])
        a = lam + sigma**2
        e = 2.0 * snr**2 * total_p / (p**2 * q / a**2).sum(dim=dims, keepdim=True)
        q = (1 - e * p / a) ** 2 * q + 2 * e * p
        d = hi**2 - lo**2
        q = (1 - d * p / a) ** 2 * q + (d * p if lo > 0 else 0.0)
    return q


def spectral_kl_of_moments(model, q: torch.Tensor) -> torch.Tensor | float:
    """`GaussianImageModel.spectral_kl` of a population with second moments q (no sampling):
    a float for q [C, H, W], a [K] tensor for q [K, C, H, W]; inf where the run diverged."""
    r = q / model.lam
    kl = (0.5 * (r - 1 - torch.log(r))).mean(dim=(-3, -2, -1))
    kl = torch.where(torch.isfinite(kl), kl, torch.full_like(kl, math.inf))
    return float(kl) if kl.ndim == 0 else kl


def pc_spectral_kl(model, n_steps: int, alpha: float | None, *, statistic: np.ndarray | None = None, snr: float | None = None) -> float:
    """Exact spectral KL of PC (alpha None) or PDS (frequency filter, this alpha) on the analytic
    model, on the reference grid `pc_steps(model.settings, n_steps)`."""
    from pdscli.samplers import pc_steps

    stat = expected_freq_statistic(model) if statistic is None else statistic
    steps = pc_steps(model.settings, n_steps)
    snr = model.settings.snr if snr is None else float(snr)
    return spectral_kl_of_moments(model, pc_second_moments(model, steps, squared_filter(stat, alpha), snr))
