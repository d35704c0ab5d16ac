"""Grids fitted to the data's statistics (`--schedule stats`): the sigma levels that minimise a
sampler's exact error on the Gaussian approximation of the data.

For data x ~ N(mu, Sigma) with Sigma diagonal in the orthonormal DFT (variance lam_k per
coefficient: the stationary approximation PDS filters describe), the exact score is
s(x, sigma) = -(x - mu) / (lam + sigma^2), coefficient by coefficient. Every sampler outside the
PC family is linear in its noise draws on such a score and treats the coefficients independently,
so its output is x - mu = sum_j A_j z_j with one gain A_j per coefficient and draw: one run on a
"batch" of impulses reads them all (draw j is 1 in row j, 0 elsewhere), and the output variance
v_k = sum_j A_jk^2 is exact. (Its translation equivariance makes mu irrelevant.) The error is

    KL(grid) = sum_k w_k 1/2 (r_k - 1 - ln r_k) / sum_k w_k,   r_k = v_k / lam_k,

the spectral KL of `pdscli.evaluate` without a sampling floor. `fit_levels` minimises it over the
n - 2 inner levels of a grid that keeps sigma_max and sigma_min (log sigma gaps as free variables,
a pattern search started from the log-uniform and Karras grids: never worse than the better of
the two on this measure). Fitting takes well under a second at 10 levels and seconds at 50; the
levels are cached in a JSON file per (sampler, n, sigma range, spectrum) under the user's cache
(`cache_dir()`), so a run pays it once.

Spectra: `spectrum_of_model` for the exact models (their own lam; the mixture's moment-matched
Gaussian), `spectrum_of_statistic` for PDS's frequency statistic log(1 + E|fft2 x|^2) (a filters
file's `freq`; its zero frequency mixes the mean with the variance and is left out). Coefficients
with near-equal variances are merged into at most `BINS` log-spaced bins with their counts as
weights, which changes the KL by far less than the fit gains.

Measured (docs/samplers.md, "Grids fitted to the statistics"; scripts/peers.py) on the exact
Gaussian model, the fitted grid against log-uniform, Karras, AYS and GITS per solver and budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdscli.errors import PdsError
from pdscli.fsutil import atomic_write_json
from pdscli.samplers import sampler_info
from pdscli.samplers.grids import Steps, edm, geometric, steps_from_levels

STATS_GRID = "stats"  # the --schedule name
BINS = 256  # merged spectrum size: enough that the merged KL is within ~1% of the full one
FIT_VERSION = 1  # part of the cache key: bump when the fit or the objective changes
# No log sigma gap longer than MAX_GAP times the log-uniform grid's: the Gaussian approximation
# cannot see where modes separate, and a network's errors are largest where one step spans
# decades. (On the mixture model the fit still costs mode balance at 8-10 NFE, capped or not:
# docs/samplers.md.)
MAX_GAP = 2.0


@dataclass(frozen=True)
class Spectrum:
    """Variances lam [K] (float64, > 0) of the orthonormal Fourier coefficients, with weights [K]."""

    lam: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def of(cls, variances, bins: int = BINS) -> Spectrum:
        """All coefficients' variances merged into at most `bins` log-spaced bins (weighted by count)."""
        lam = torch.as_tensor(variances, dtype=torch.float64).reshape(-1)
        lam = lam[torch.isfinite(lam) & (lam > 0)]
        if lam.numel() == 0:
            raise PdsError("the statistics hold no positive variance to fit a grid to")
        log = lam.log()
        lo, hi = float(log.min()), float(log.max())
        if hi - lo < 1e-12:
            return cls(lam[:1].clone(), torch.tensor([float(lam.numel())], dtype=torch.float64))
        index = ((log - lo) / (hi - lo) * (bins - 1)).round().long()
        counts = torch.bincount(index, minlength=bins).to(torch.float64)
        sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, log)
        keep = counts > 0
        return cls((sums[keep] / counts[keep]).exp(), counts[keep])

    def key(self) -> str:
        data = np.round(np.log(self.lam.numpy()), 6).tobytes() + np.round(self.weights.numpy(), 6).tobytes()
        return hashlib.sha256(data).hexdigest()[:16]


def spectrum_of_model(model) -> Spectrum:
    """An exact model's spectrum: the Gaussian's lam, or the mixture's moment-matched Gaussian's."""
    gauss = model.moment_matched() if hasattr(model, "moment_matched") else model
    return Spectrum.of(gauss.lam)


def spectrum_of_statistic(freq) -> Spectrum:
    """PDS's frequency statistic log(1 + E|fft2 x|^2) [C, H, W] (unnormalised FFT) -> the
    orthonormal coefficients' second moments E|F x|^2 / HW, the zero frequency left out."""
    freq = torch.as_tensor(np.asarray(freq), dtype=torch.float64)
    if freq.ndim != 3:
        raise PdsError(f"a frequency statistic is [C, H, W], got shape {tuple(freq.shape)}")
    power = torch.expm1(freq) / (freq.shape[-2] * freq.shape[-1])
    power[:, 0, 0] = math.nan  # the mean is folded into it
    return Spectrum.of(power)


# ---------------------------------------------------------------------------- the exact measure


def output_variances(sampler, spectrum: Spectrum, steps: Steps, *, draws: int) -> torch.Tensor:
    """v [K]: the output variance of each coefficient for `sampler` on the centred Gaussian."""
    lam = spectrum.lam
    count = [0]

    def score(x, sigma):
        s = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        return -x / (lam + s * s)

    def impulses():
        j = count[0]
        count[0] += 1
        z = torch.zeros((draws, 1, 1, len(lam)), dtype=torch.float64)
        if j < draws:
            z[j] = 1.0
        else:  # more draws than rows: the variance would be wrong, so the result must not be used
            z.fill_(math.nan)
        return z

    out = sampler(score, impulses, steps)
    return (out.to(torch.float64) ** 2).sum(dim=0).reshape(-1)


def grid_kl(sampler, spectrum: Spectrum, steps: Steps, *, draws: int = 1) -> float:
    """The exact spectral KL of `sampler` on `steps` (inf if the run blew up)."""
    v = output_variances(sampler, spectrum, steps, draws=draws)
    r = v / spectrum.lam
    kl = float((spectrum.weights * 0.5 * (r - 1 - torch.log(r))).sum() / spectrum.weights.sum())
    return kl if math.isfinite(kl) else math.inf


# ---------------------------------------------------------------------------- the fit


def _levels(theta: np.ndarray, log_max: float, log_min: float) -> torch.Tensor:
    gaps = np.exp(theta - theta.max())
    gaps = gaps / gaps.sum() * (log_max - log_min)
    log_sigma = log_max - np.concatenate([[0.0], np.cumsum(gaps)])
    sigma = torch.as_tensor(np.exp(log_sigma), dtype=torch.float64)
    sigma[0], sigma[-1] = math.exp(log_max), math.exp(log_min)
    return sigma


def _theta_of(levels: torch.Tensor) -> np.ndarray:
    return np.log(-np.diff(np.log(levels.numpy())))


def fit_levels(sampler, spectrum: Spectrum, settings, n: int, *, draws: int = 1, max_evals: int | None = None,
               max_gap: float = MAX_GAP) -> tuple[torch.Tensor, float, dict[str, float]]:
    """(levels [n], their KL, the start grids' KLs): n levels from sigma_max to sigma_min that
    minimise `grid_kl`, found by a pattern search in the log sigma gaps."""
    n = int(n)
    if n < 2:
        raise PdsError(f"a sampling grid needs at least 2 steps (sigma_max ... sigma_min), got {n}")
    smax, smin = float(settings.sigma_max), float(settings.sigma_min)
    log_max, log_min = math.log(smax), math.log(smin)
    starts = {"geometric": geometric(settings, n), "edm": edm(settings, n)}

    cap = max_gap * (log_max - log_min) / (n - 1)

    def allowed(sigma: torch.Tensor) -> bool:
        gaps = -torch.diff(sigma.log())
        return bool((gaps > 0).all() and (gaps <= cap * (1 + 1e-9)).all())

    def kl_of(theta: np.ndarray) -> float:
        sigma = _levels(theta, log_max, log_min)
        if not allowed(sigma):
            return math.inf
        return grid_kl(sampler, spectrum, steps_from_levels(sigma, smax), draws=draws)

    start_kl = {name: grid_kl(sampler, spectrum, s, draws=draws) for name, s in starts.items()}
    best_name = min((name for name in starts if allowed(starts[name].sigma)), key=start_kl.get)
    theta = _theta_of(starts[best_name].sigma)
    best = start_kl[best_name]
    if n == 2:
        return starts["geometric"].sigma, best, start_kl
    budget = max_evals if max_evals is not None else 40 * (n - 1) + 200
    evals, delta = 0, 0.5
    while delta > 1e-2 and evals < budget:
        improved = False
        for i in range(len(theta)):
            for sign in (1.0, -1.0):
                trial = theta.copy()
                trial[i] += sign * delta
                value = kl_of(trial)
                evals += 1
                if value < best:
                    theta, best, improved = trial, value, True
                    break
        if not improved:
            delta /= 2
    return _levels(theta, log_max, log_min), best, start_kl


# ---------------------------------------------------------------------------- cached grids


def cache_dir() -> Path:
    """Where fitted grids are kept: $PDS_CACHE_DIR, else $XDG_CACHE_HOME/pds, else ~/.cache/pds."""
    if os.environ.get("PDS_CACHE_DIR"):
        return Path(os.environ["PDS_CACHE_DIR"]) / "grids"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pds" / "grids"


def fitted_steps(name: str, sampler, spectrum: Spectrum, settings, n: int, *, draws: int = 1,
                 cache: Path | None = None) -> Steps:
    """The fitted grid of n levels for sampler `name`, from the cache or fitted now (and cached).

    A cache that cannot be read or written is skipped: the grid is then fitted for this run only."""
    folder = cache_dir() if cache is None else Path(cache)
    key = f"v{FIT_VERSION}-{name}-{n}-{float(settings.sigma_min):.6g}-{float(settings.sigma_max):.6g}-{spectrum.key()}"
    path = folder / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")
    try:
        record = json.loads(path.read_text())
        if record.get("key") == key and len(record["levels"]) == n:
            return steps_from_levels(torch.tensor(record["levels"], dtype=torch.float64), float(settings.sigma_max))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    levels, kl, start_kl = fit_levels(sampler, spectrum, settings, n, draws=draws)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "sampler": name, "levels": [float(s) for s in levels], "kl": kl,
                                 "start_kl": start_kl})
    except OSError:
        pass
    return steps_from_levels(levels, float(settings.sigma_max))


def grid_for_filters(sampler: str, filters, settings, n: int) -> Steps:
    """`--schedule stats`: the fitted grid of n levels for registered `sampler`, from PDS filters'
    frequency statistic (images in [0, 1], the model's data range)."""
    if filters is None or getattr(filters, "freq", None) is None:
        raise PdsError(f"--schedule {STATS_GRID} needs a frequency statistic: filters from `pds filters` hold one")
    info = sampler_info(sampler)
    draws = 1 if info.deterministic else 2 * int(n) + 2
    return fitted_steps(sampler, info.fn, spectrum_of_statistic(filters.freq), settings, n, draws=draws)
