"""Step grids for the accelerated samplers (`pdscli.accelerated`), as `pdscli.sampling.Steps`.

A grid of n steps evaluates the score at n noise levels sigma[0] = sigma_max > ... >
sigma[n-1] = sigma_min. Step i moves the state from sigma_hi[i] = sigma[i] to
sigma_lo[i] = sigma[i+1], and the last step goes from sigma_min to sigma_lo = 0: that step is
the final (Tweedie) denoise x + sigma_min^2 s(x, sigma_min). So n steps cost n score
evaluations for the one-call samplers, the denoise included.

    geometric(settings, n)     log sigma uniform (the VE SDE's own spacing, as in score_sde)
    edm(settings, n, rho=7)    Karras et al. 2022: uniform in sigma^(1/rho), denser near sigma_min

The CLI's `--schedule NAME` calls `make_steps(NAME, settings, n)`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from pdscli.errors import PdsError
from pdscli.sampling import Steps
from pdscli.settings import SamplingSettings


def _check(settings: SamplingSettings, n) -> int:
    n_int = int(n)
    if n_int != n or n_int < 2:
        # One step would have to be both sigma_max and sigma_min: there is no such grid.
        raise PdsError(f"a sampling grid needs at least 2 steps (sigma_max ... sigma_min), got {n}")
    if not (0 < settings.sigma_min < settings.sigma_max):
        raise PdsError(f"need 0 < sigma_min < sigma_max, got {settings.sigma_min} and {settings.sigma_max}")
    return n_int


def steps_from_levels(sigma: torch.Tensor, sigma_max: float | None = None) -> Steps:
    """Steps that evaluate at `sigma` (decreasing, float64) and go sigma[i] -> sigma[i+1], the
    last one to 0 (the denoise)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    if len(sigma) and not bool((sigma[1:] < sigma[:-1]).all() and (sigma > 0).all()):
        raise PdsError("noise levels must be positive and strictly decreasing")
    lo = torch.cat([sigma[1:], sigma.new_zeros(1)])
    top = float(sigma[0]) if sigma_max is None else float(sigma_max)
    return Steps(sigma_max=top, sigma=sigma, sigma_hi=sigma.clone(), sigma_lo=lo)


def geometric(settings: SamplingSettings, n: int) -> Steps:
    """n levels, log-uniform from sigma_max down to sigma_min (both included)."""
    n = _check(settings, n)
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    smax, smin = float(settings.sigma_max), float(settings.sigma_min)
    # exp of a linspace in log sigma, pinned at both ends so they are exact.
    sigma = torch.exp(math.log(smax) + t * (math.log(smin) - math.log(smax)))
    sigma[0], sigma[-1] = smax, smin
    return steps_from_levels(sigma, smax)


def edm(settings: SamplingSettings, n: int, rho: float = 7.0) -> Steps:
    """n levels uniform in sigma^(1/rho) from sigma_max to sigma_min (EDM's rho = 7)."""
    n = _check(settings, n)
    rho = float(rho)
    if not (math.isfinite(rho) and rho > 0):
        raise PdsError(f"rho must be a positive number, got {rho:g}")
    smax, smin = float(settings.sigma_max), float(settings.sigma_min)
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    sigma = (smax ** (1 / rho) + t * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sigma[0], sigma[-1] = smax, smin
    return steps_from_levels(sigma, smax)


SCHEDULES: dict[str, Callable[[SamplingSettings, int], Steps]] = {"geometric": geometric, "edm": edm}


def make_steps(name: str, settings: SamplingSettings, n: int) -> Steps:
    """The grid called `name` (`--schedule`) with n steps; a PdsError listing the choices if unknown."""
    try:
        build = SCHEDULES[name]
    except KeyError:
        raise PdsError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}") from None
    return build(settings, n)
