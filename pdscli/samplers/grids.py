"""Step grids: `Steps`, the reference PC grid (`pc_steps`) and the grids of the other samplers.

`pc_steps` is score_sde's / PDS's own grid, exactly. For the other grids: a grid of n steps evaluates the score at n noise levels sigma[0] = sigma_max > ... >
sigma[n-1] = sigma_min. Step i moves the state from sigma_hi[i] = sigma[i] to
sigma_lo[i] = sigma[i+1], and the last step goes from sigma_min to sigma_lo = 0: that step is
the final (Tweedie) denoise x + sigma_min^2 s(x, sigma_min). So n steps cost n score
evaluations for the one-call samplers, the denoise included.

    geometric(settings, n)     log sigma uniform (the VE SDE's own spacing, as in score_sde)
    edm(settings, n, rho=7)    Karras et al. 2022: uniform in sigma^(1/rho), denser near sigma_min

The CLI's `--schedule NAME` calls `make_steps(NAME, settings, n)`; NAME is one of GRIDS, the PC
grid (`pc`) or a SCHEDULES grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from pdscli import flag_rules
from pdscli.errors import PdsError
from pdscli.settings import SamplingSettings


# Time at which the reference stops integrating a VE SDE (before any speed-up).
VE_EPS = 1e-5


@dataclass(frozen=True)
class Steps:
    """A step grid. Step i evaluates the score at sigma[i] and moves the state from noise level
    sigma_hi[i] to sigma_lo[i]; the prior is N(0, sigma_max^2 M M^T). float64 [N] CPU tensors."""

    sigma_max: float
    sigma: torch.Tensor
    sigma_hi: torch.Tensor
    sigma_lo: torch.Tensor

    def __post_init__(self):
        # Accept any 1-D sequence; store float64 CPU tensors so coefficients are computed in float64.
        for name in ("sigma", "sigma_hi", "sigma_lo"):
            value = torch.as_tensor(getattr(self, name)).detach().to("cpu", torch.float64).reshape(-1)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "sigma_max", float(self.sigma_max))
        n = len(self.sigma)
        if n == 0 or len(self.sigma_hi) != n or len(self.sigma_lo) != n:
            raise ValueError(f"Steps need equally long, non-empty sigma grids, got {n}, {len(self.sigma_hi)}, {len(self.sigma_lo)}")

    def __len__(self) -> int:
        return len(self.sigma)


def count_steps(settings: SamplingSettings, n_steps: int | None = None, speed_up: float | None = None) -> int:
    """How many steps a grid has: n_steps, or int(num_scales / speed_up) (the reference's
    `--speed_up`), or num_scales; a PdsError if both are given or none remains."""
    if n_steps is not None and speed_up is not None:
        raise PdsError("give a number of steps or a speed-up, not both")
    if speed_up is not None:
        # speed_up is a positive number here: --speed-up's rule (pdscli.flag_rules) checked it.
        n = int(settings.num_scales / speed_up)  # the reference's int(config.model.num_scales / speed_up)
        if n < 1:
            raise PdsError(f"a speed-up of {speed_up:g} leaves no steps of the model's {settings.num_scales}")
        return n
    if n_steps is None:
        return settings.num_scales
    n = int(n_steps)
    if n < 1:
        raise PdsError(f"the number of steps must be at least 1, got {n_steps}")
    return n


def pc_steps(settings: SamplingSettings, n_steps: int | None = None, *, speed_up: float | None = None, eps: float | None = None) -> Steps:
    """The reference PC grid for a VE model, in float64.

    N = n_steps, or int(num_scales / speed_up) (the reference's `--speed_up`), or num_scales.
    Times t_i = linspace(1, eps, N); the score is evaluated at sigma(t_i) = sigma_min *
    (sigma_max / sigma_min)^t_i; the predictor uses the discrete ladder of the N-step SDE,
    sigma_j = exp(linspace(log sigma_min, log sigma_max, N))[j] with j = floor(t_i (N - 1)),
    moving from sigma_j to sigma_{j-1} (0 when j = 0).

    eps defaults to 1e-5 * k, as the reference multiplies its eps by the speed-up k; given
    n_steps, k = num_scales / n_steps, so `n_steps=num_scales/k` and `speed_up=k` make the same grid.

    The reference computes t and the ladder in float32 (torch's default dtype): its sigmas agree
    with these to ~1e-7 relative, and j agrees unless float32 rounding lands t_i (N - 1) on the
    other side of an integer (it does not for the official settings; see tests/test_sampling.py).
    """
    n = count_steps(settings, n_steps, speed_up)
    k = float(speed_up) if speed_up is not None else settings.num_scales / n
    eps = VE_EPS * k if eps is None else float(eps)
    if not (0 < eps <= 1):
        raise PdsError(f"eps (the last time step) must lie in (0, 1], got {eps:g}")

    smin, smax = float(settings.sigma_min), float(settings.sigma_max)
    t = torch.linspace(1.0, eps, n, dtype=torch.float64)
    sigma = smin * (smax / smin) ** t
    ladder = torch.exp(torch.linspace(math.log(smin), math.log(smax), n, dtype=torch.float64))
    j = torch.floor(t * (n - 1)).long()
    sigma_hi = ladder[j]
    sigma_lo = torch.where(j > 0, ladder[(j - 1).clamp(min=0)], torch.zeros_like(sigma_hi))
    return Steps(sigma_max=smax, sigma=sigma, sigma_hi=sigma_hi, sigma_lo=sigma_lo)


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
PC_GRID = "pc"  # score_sde's own PC grid (`pc_steps`), the PC family's default
GRIDS = (PC_GRID, *SCHEDULES)  # every grid `--schedule` names


def check_grid(name: str) -> str:
    """`name` if it names a grid, else a PdsError listing the choices."""
    if name not in GRIDS:
        raise flag_rules.not_one_of("--schedule", name, GRIDS)
    return name


def min_steps(name: str) -> int:
    """The fewest steps grid `name` has: 1 on the PC grid, 2 on the others (sigma_max ... sigma_min)."""
    return 1 if check_grid(name) == PC_GRID else 2


def make_steps(name: str, settings: SamplingSettings, n: int | None = None, *, speed_up: float | None = None) -> Steps:
    """The grid called `name` (`--schedule`: pc, geometric, edm) with n steps, or
    int(num_scales / speed_up), or num_scales (`count_steps`); a PdsError listing the choices if
    unknown. The PC grid with a speed-up k is the reference's (its eps scales with k)."""
    if check_grid(name) == PC_GRID:
        return pc_steps(settings, n, speed_up=speed_up)
    return SCHEDULES[name](settings, count_steps(settings, n, speed_up))
