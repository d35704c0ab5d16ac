"""EDM's samplers (Karras, Aittala, Aila, Laine 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", arXiv 2206.00364) and Euler ancestral, for VE score models.

The common signature of `pdscli.samplers` (no keywords of their own):

    sampler(score, noise, steps, *, precond=None, callback=None) -> x

    name             kind           score calls (n = len(steps))   what it is
    heun             deterministic  2n - 1                         EDM Algorithm 1: Heun on dx/dsigma = -sigma s
    edm-sde          stochastic     2n - 1                         EDM Algorithm 2: churn (add noise up to
                                                                   sigma_hat = (1 + gamma) sigma), then a Heun step
    euler-a          stochastic     n                              Euler ancestral: an Euler step down to
                                                                   sigma_down, then fresh noise back up to sigma_lo

In EDM's notation the VE model is sigma(t) = t, s(t) = 1, and the ODE is dx/dsigma = (x - D) / sigma
with D = x + sigma^2 s the data prediction, i.e. dx/dsigma = -sigma s(x, sigma).

As for every sampler here the step whose sigma_lo is 0 is the Tweedie denoise D(x, sigma_min)
(EDM's own last step is an Euler step to sigma = 0, which is the same thing) and adds no churn.
Churn in EDM: gamma = min(S_churn / n, sqrt(2) - 1) at levels S_tmin <= sigma <= S_tmax, else 0;
the added noise has standard deviation S_noise sqrt(sigma_hat^2 - sigma^2). The constants
`edm-sde` uses are measured (docs/samplers.md); `edm_sde_with` makes other settings.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from pdscli.samplers.common import eval_score, levels, no_precond, report, tweedie
from pdscli.samplers.grids import Steps

# EDM Algorithm 2's constants for `edm-sde` (measured on the built-in model and the exact models;
# the paper's ImageNet values are S_churn 40, S_tmin 0.05, S_tmax 50, S_noise 1.003).
S_CHURN = 40.0
S_TMIN = 0.05
S_TMAX = 50.0
S_NOISE = 1.0


def _heun(score, noise, steps: Steps, callback, *, churn: float, tmin: float, tmax: float, s_noise: float) -> torch.Tensor:
    x = steps.sigma_max * noise()
    n, nfe = len(steps), 0
    gamma_max = min(churn / n, math.sqrt(2.0) - 1.0) if churn > 0 else 0.0
    for i in range(n):
        sigma, _, lo = levels(steps, i)
        if lo > 0 and gamma_max > 0 and tmin <= sigma <= tmax:
            sigma_hat = sigma * (1.0 + gamma_max)
            x = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * noise()
        else:
            sigma_hat = sigma
        denoised = tweedie(x, sigma_hat, eval_score(score, x, sigma_hat))
        nfe += 1
        if lo == 0:
            x = denoised
        else:
            slope = (x - denoised) / sigma_hat
            x_euler = x + (lo - sigma_hat) * slope
            slope_lo = -lo * eval_score(score, x_euler, lo)  # (x_euler - D(x_euler, lo)) / lo
            nfe += 1
            x = x + (lo - sigma_hat) * 0.5 * (slope + slope_lo)
        report(callback, i, n, sigma, x, denoised, nfe)
    return x


@torch.no_grad()
def heun(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """EDM's deterministic 2nd-order Heun sampler: 2 calls per step, 1 for the final denoise (2n - 1)."""
    no_precond("heun", precond)
    return _heun(score, noise, steps, callback, churn=0.0, tmin=0.0, tmax=math.inf, s_noise=1.0)


@torch.no_grad()
def edm_sde_with(score, noise, steps: Steps, *, churn: float = S_CHURN, tmin: float = S_TMIN, tmax: float = S_TMAX,
                 s_noise: float = S_NOISE, precond=None, callback=None) -> torch.Tensor:
    """EDM's stochastic sampler with explicit churn settings (2n - 1 calls)."""
    no_precond("edm-sde", precond)
    return _heun(score, noise, steps, callback, churn=float(churn), tmin=float(tmin), tmax=float(tmax), s_noise=float(s_noise))


# The registered `edm-sde`: EDM Algorithm 2 with this module's constants.
edm_sde = partial(edm_sde_with, churn=S_CHURN, tmin=S_TMIN, tmax=S_TMAX, s_noise=S_NOISE)


@torch.no_grad()
def euler_ancestral(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """Euler ancestral: per step an Euler (DDIM) step to sigma_down, then noise sigma_up z, with
    sigma_up^2 = sigma_lo^2 (sigma^2 - sigma_lo^2) / sigma^2 and sigma_down^2 = sigma_lo^2 - sigma_up^2
    (the DDPM posterior's split of sigma_lo^2). n calls."""
    no_precond("euler-a", precond)
    x = steps.sigma_max * noise()
    n = len(steps)
    for i in range(n):
        sigma, _, lo = levels(steps, i)
        denoised = tweedie(x, sigma, eval_score(score, x, sigma))
        if lo == 0:
            x = denoised
        else:
            up = lo * math.sqrt((sigma - lo) * (sigma + lo)) / sigma
            down = lo * lo / sigma
            x = x + (down - sigma) * (x - denoised) / sigma + up * noise()
        report(callback, i, n, sigma, x, denoised, i + 1)
    return x
