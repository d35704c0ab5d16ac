"""The PDS filter strength alpha: the reference's fixed value, and `--alpha auto` per step count.

PDS's filter is alpha / (m / max(m) + alpha - 1): 1 where the data has most energy, at most
1 + e where it has least, with the excess e = 1 / (alpha - 1). A small alpha is a strong
preconditioner; alpha -> infinity (e -> 0) is none (vanilla). The reference fixes alpha = 5
(`ALPHA_REFERENCE`, the one default every command reads).

On the exact (Gaussian) model a fixed alpha is wrong at both ends (docs/samplers.md, "PDS and
the reference's knobs"): at 2-7 steps alpha = 5 makes the preconditioned predictor diverge
(KL 1.8e3 against vanilla's 21 at 5 steps); at 15-20 steps the best alpha (~3) sits next to that
cliff; from ~100 steps the predictor's fixed bias (it keeps the marginals only for M M^T = I)
costs more than vanilla's shrinking error. So `--alpha auto` takes the excess from a table over
the step in log sigma,

    h = ln(sigma_max / sigma_min) / (n_steps - 1),

log e interpolated linearly in log h between the knots below, one table per sampler. The knots
come from `scripts/calibrate_alpha.py`: the exact second-moment recursion of each sampler
(below) on analytic Gaussians of several sizes, sigma ranges and snrs, every step count from 2
to 2000, keeping at each knot the weakest of the per-model optima that is never worse than
vanilla even with the excess doubled (a margin from the cliff). Where no alpha helps on every
calibration model (2 steps; many steps, where vanilla's own error is smaller than any filter's
bias) the table says "off" and the run drops the filter: `choose_alpha` says why, the run warns
on stderr and records it in run.json. The step in log sigma, not the step count, is the
variable because the optimum follows it across sigma ranges (8.6 to 1348 measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from pdscli.errors import PdsError
from pdscli.precondition.operator import filter_from_statistic
from pdscli.samplers.accelerated import sde_noise_scales
from pdscli.samplers.grids import geometric, pc_steps

ALPHA_REFERENCE = 5.0  # the reference implementation's fixed alpha: the default of every command
ALPHA_MAX = 1e6  # what `auto_alpha` returns for "off" (the filter is then within 1e-6 of 1)
MIN_STEPS = 3  # at 2 steps no alpha is better than vanilla on any calibration model

# (h knot, excess e = 1 / (alpha - 1)) per sampler, h increasing; e = 0 is "off".
# Written by scripts/calibrate_alpha.py (tests/test_alpha.py re-checks them on the exact models).
AUTO_TABLES: dict[str, tuple[tuple[float, float], ...]] = {
    "pds": (
        (0.004, 0),
        (0.005584, 0),
        (0.007795, 0),
        (0.01088, 0),
        (0.01519, 0),
        (0.02121, 0),
        (0.0296, 0),
        (0.04133, 0),
        (0.05769, 0.007812),
        (0.08053, 0.01562),
        (0.1124, 0.03125),
        (0.1569, 0.0625),
        (0.2191, 0.08839),
        (0.3058, 0.125),
        (0.427, 0.1768),
        (0.596, 0.1768),
        (0.832, 0.125),
        (1.162, 0.08839),
        (1.621, 0.0221),
        (2.264, 0.01562),
        (3.16, 0.01562),
        (4.411, 0.0221),
        (6.158, 0.03125),
        (8.596, 0.03125),
        (12, 0.03125),
    ),
    "ddpm": (
        (0.004, 0),
        (0.005584, 0),
        (0.007795, 0),
        (0.01088, 0),
        (0.01519, 0),
        (0.02121, 0),
        (0.0296, 0.003906),
        (0.04133, 0.007812),
        (0.05769, 0.01562),
        (0.08053, 0.0221),
        (0.1124, 0.04419),
        (0.1569, 0.0625),
        (0.2191, 0.08839),
        (0.3058, 0.1768),
        (0.427, 0.25),
        (0.596, 0.1768),
        (0.832, 0.125),
        (1.162, 0.0625),
        (1.621, 0.01562),
        (2.264, 0.005524),
        (3.16, 0.005524),
        (4.411, 0),
        (6.158, 0),
        (8.596, 0),
        (12, 0),
    ),
    "accel-sde": (
        (0.004, 0),
        (0.005584, 0),
        (0.007795, 0),
        (0.01088, 0),
        (0.01519, 0),
        (0.02121, 0),
        (0.0296, 0),
        (0.04133, 0),
        (0.05769, 0),
        (0.08053, 0),
        (0.1124, 0),
        (0.1569, 0),
        (0.2191, 0),
        (0.3058, 0.001953),
        (0.427, 0.01105),
        (0.596, 0.03125),
        (0.832, 0.08839),
        (1.162, 0.0625),
        (1.621, 0.03125),
        (2.264, 0.01562),
        (3.16, 0),
        (4.411, 0),
        (6.158, 0),
        (8.596, 0),
        (12, 0),
    ),
}
# The PC family shares the PC loop's table (`predictor` alone runs the PC grid's predictor, like ddpm).
AUTO_TABLES_ALIAS = {"pc": "pds", "predictor": "pds", "corrector": "pds"}


def log_step(n_steps: int, sigma_min: float, sigma_max: float) -> float:
    """h = ln(sigma_max / sigma_min) / (n_steps - 1): the step in log sigma (inf for one step)."""
    n = int(n_steps)
    if n < 2:
        return math.inf
    return math.log(float(sigma_max) / float(sigma_min)) / (n - 1)


def _table(sampler: str) -> tuple[tuple[float, float], ...] | None:
    return AUTO_TABLES.get(AUTO_TABLES_ALIAS.get(sampler, sampler))


def auto_excess(n_steps: int, sigma_min: float, sigma_max: float, sampler: str = "pds") -> float:
    """The calibrated excess e = 1 / (alpha - 1) for n_steps of `sampler`; 0 = filter off."""
    table = _table(sampler)
    if not table or int(n_steps) < MIN_STEPS:
        return 0.0
    h = log_step(n_steps, sigma_min, sigma_max)
    hs = np.log([k for k, _ in table])
    es = np.array([e for _, e in table], dtype=np.float64)
    # Interpolate log e where both neighbours are on, e itself where one is off (no log of 0);
    # outside the knots the nearest knot holds.
    x = float(np.clip(math.log(h), hs[0], hs[-1]))
    j = int(np.clip(np.searchsorted(hs, x), 1, len(hs) - 1))
    w = (x - hs[j - 1]) / (hs[j] - hs[j - 1])
    lo, hi = es[j - 1], es[j]
    if lo > 0 and hi > 0:
        return float(math.exp((1 - w) * math.log(lo) + w * math.log(hi)))
    return float((1 - w) * lo + w * hi)


def auto_alpha(n_steps: int, num_scales: int | None = None, *, sigma_min: float = 0.01, sigma_max: float = 378.0,
               sampler: str = "pds") -> float:
    """The calibrated alpha for n_steps of `sampler` on a VE model with this sigma range;
    ALPHA_MAX where the table says off. num_scales is accepted (callers pass what they have)
    but does not enter: the optimum follows the step in log sigma, not the speed-up."""
    n = int(n_steps)
    if n < 1:
        raise PdsError(f"the number of steps must be at least 1, got {n_steps}")
    if not (0 < float(sigma_min) < float(sigma_max)):
        raise PdsError(f"need 0 < sigma_min < sigma_max, got {sigma_min} and {sigma_max}")
    e = auto_excess(n, sigma_min, sigma_max, sampler)
    if e <= 1.0 / (ALPHA_MAX - 1.0):
        return ALPHA_MAX
    return float(min(ALPHA_MAX, 1.0 + 1.0 / e))


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def check_alpha(value) -> None:
    """Fail now (before a slow model load) on an --alpha that is neither a positive number nor auto."""
    if value is None or _is_auto(value):
        return
    parse_alpha(value)


def parse_alpha(value) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise PdsError(f"--alpha must be a number or 'auto', got {value!r}") from None
    if not (math.isfinite(alpha) and alpha > 0):
        raise PdsError(f"--alpha must be a positive number or 'auto', got {value!r}")
    return alpha


def resolve_alpha(value, settings, n_steps: int, sampler: str = "pds") -> float:
    """`--alpha` as given: "auto" (auto_alpha for these settings, step count and sampler; ALPHA_MAX
    for off), a number, or None (ALPHA_REFERENCE)."""
    if value is None:
        return ALPHA_REFERENCE
    if _is_auto(value):
        return auto_alpha(n_steps, settings.num_scales, sigma_min=settings.sigma_min, sigma_max=settings.sigma_max,
                          sampler=sampler)
    return parse_alpha(value)


@dataclass(frozen=True)
class AlphaChoice:
    """What a run does with its filters: `alpha` None = filter off (vanilla); `note` says why."""

    alpha: float | None
    given: str
    note: str | None = None

    @property
    def off(self) -> bool:
        return self.alpha is None


# Samplers whose filters are off unless the user asks (--alpha given): measured to hurt there.
DEFAULT_AUTO = ("ddpm", "accel-sde")


def default_alpha_flag(sampler: str) -> str:
    """What an unset --alpha means for `sampler`: auto for ddpm / accel-sde (their filters hurt at
    many steps, and auto switches them off there), the reference's 5 for the PC family."""
    return "auto" if sampler in DEFAULT_AUTO else f"{ALPHA_REFERENCE:g}"


def choose_alpha(value, settings, n_steps: int, sampler: str = "pds") -> AlphaChoice:
    """--alpha for a run of n_steps of `sampler`: a number is used as given; auto (and an unset
    --alpha of ddpm / accel-sde) may switch the filter off, with a note saying why."""
    given = default_alpha_flag(sampler) if value is None else str(value).strip()
    if not _is_auto(given):
        return AlphaChoice(parse_alpha(given), given)
    alpha = auto_alpha(n_steps, settings.num_scales, sigma_min=settings.sigma_min, sigma_max=settings.sigma_max,
                       sampler=sampler)
    if alpha < ALPHA_MAX:
        return AlphaChoice(alpha, given)
    if not _table(sampler):
        why = f"--alpha auto is not calibrated for {sampler}"
    elif int(n_steps) < MIN_STEPS:
        why = f"at {n_steps} steps no filter strength beats vanilla on the exact model"
    else:
        h = log_step(n_steps, settings.sigma_min, settings.sigma_max)
        peak = max(_table(sampler), key=lambda knot: knot[1])[0]
        few = h > peak  # off above the table's peak: too few steps; below it: enough for vanilla
        why = (f"at {n_steps} steps no filter strength is safely better than vanilla on the exact model"
               if few else f"at {n_steps} steps vanilla is already as exact as any filter on the exact model")
    return AlphaChoice(None, given, f"--alpha auto: filter off for {sampler} ({why}); running without preconditioning")


# -- the calibration yardstick: samplers on the analytic model, without sampling ---------------
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
    r = q / model.lam
    w = _weights(model, model.lam)
    kl = (w * 0.5 * (r - 1 - torch.log(r))).sum(dim=(-3, -2, -1)) / w.sum()
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


def exact_spectral_kl(model, sampler: str, n_steps: int, alpha: float | None, *, statistic: np.ndarray | None = None,
                      snr: float | None = None) -> float:
    """Exact spectral KL of `sampler` with the frequency filter at this alpha (None: without)."""
    stat = expected_freq_statistic(model) if statistic is None else statistic
    return spectral_kl_of_moments(model, exact_moments(model, sampler, n_steps, squared_filter(stat, alpha), snr=snr))


def pc_spectral_kl(model, n_steps: int, alpha: float | None, *, statistic: np.ndarray | None = None,
                   snr: float | None = None) -> float:
    """Exact spectral KL of PC (alpha None) or PDS (frequency filter, this alpha) on the analytic
    model, on the reference grid `pc_steps(model.settings, n_steps)`."""
    return exact_spectral_kl(model, "pds", n_steps, alpha, statistic=statistic, snr=snr)
