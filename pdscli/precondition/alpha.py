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
(`pdscli.evaluate.moments`) on analytic Gaussians of several sizes, sigma ranges and snrs, every step count from 2
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

from pdscli import flag_rules
from pdscli.errors import PdsError

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


def auto_step_range(sampler: str, sigma_min: float = 0.01, sigma_max: float = 378.0,
                    most: int = 4096) -> tuple[int, int] | None:
    """The fewest and most steps (up to `most`) at which auto keeps `sampler`'s filter on for this
    sigma range, or None where it never does (what --alpha's help says)."""
    if not _table(sampler):
        return None
    on = [n for n in range(MIN_STEPS, most + 1)
          if auto_excess(n, sigma_min, sigma_max, sampler) > 1.0 / (ALPHA_MAX - 1.0)]
    return (on[0], on[-1]) if on else None


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def parse_alpha(value) -> float:
    """A numeric --alpha (auto and None are the callers' to resolve), by the flag's one rule."""
    return float(flag_rules.alpha(value))


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
