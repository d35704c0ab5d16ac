"""DDIM/DDPM-type samplers and their provably accelerated versions (Li et al., ICML 2024,
arXiv 2403.03852), written for variance-exploding score models.

The common signature of `pdscli.samplers` (no keywords of their own):

    sampler(score, noise, steps, *, precond=None, callback=None) -> x

    name        kind           score calls (n = len(steps))   update (step i: sigma_hi -> sigma_lo)
    ddim        deterministic  n                              x + (sigma_lo - sigma_hi) eps
    accel-ode   deterministic  n                              ddim + w (eps_prev - eps)   (two-step multistep)
    accel-ode2  deterministic  2n - 1                         ddim + w (eps(x_ddim) - eps) (two calls per step)
    ddpm        stochastic     n                              x + D s + sqrt(D) z
    accel-sde   stochastic     n                              x+ = x + sqrt(D/2) z;  x + D s(x+) + c z'

with eps = -sigma s(x, sigma) (the noise prediction), D = sigma_hi^2 - sigma_lo^2 and the
weights derived below. The VP updates of the paper / the authors' code map to these exactly
under x_ve = x_vp / sqrt(abar), abar = 1 / (1 + sigma^2), eps = -sigma s.

Start and finish (all samplers): x = sigma_max * z (ddpm / accel-sde: sigma_max * M z). A step
whose sigma_lo is 0 (the last step of `pdscli.samplers.grids` grids) is the Tweedie denoise
x + sigma^2 s(x, sigma) at its evaluation level sigma (sigma_min), with no noise and no
higher-order correction; it costs one score call, included in the counts above. For ddim it is
literally the DDIM step to sigma = 0.

Coefficients are computed in float64 from stable forms (at sigma ~ 1e3, abar ~ 1e-6 and the
naive differences of abar and of arctan lose most digits even in float64); the state stays
float32, as the design says.

No sampler here takes snr or per_sample_step (there is no Langevin step), and none couples the
samples of a batch: an image depends on its own noise only.
"""

from __future__ import annotations

import math
import torch

from pdscli.samplers.common import eval_score, levels, no_precond, precond_maps, report, tweedie
from pdscli.samplers.grids import Steps

# -- float64 coefficients ------------------------------------------------------------------


def abar(sigma: float) -> float:
    """The VP signal level of VE noise level sigma: 1 / (1 + sigma^2)."""
    return 1.0 / (1.0 + float(sigma) ** 2)


def abar_gap(sigma_a: float, sigma_b: float) -> float:
    """abar(sigma_a) - abar(sigma_b), without subtracting two numbers of size ~1/sigma^2."""
    a, b = float(sigma_a), float(sigma_b)
    return (b - a) * (b + a) / ((1.0 + a * a) * (1.0 + b * b))


def atan_gap(a: float, b: float) -> float:
    """arctan(a) - arctan(b) for a, b >= 0, as one arctan: both are ~pi/2 at large sigma."""
    a, b = float(a), float(b)
    return math.atan((a - b) / (1.0 + a * b))


def abar_linear_weight(sigma: float, sigma_hi: float, sigma_lo: float, sigma_node: float) -> float:
    """w such that integrating the VE probability-flow ODE dx/dsigma = eps from sigma_hi to
    sigma_lo, with eps linear in abar through (sigma, eps) and (sigma_node, eps_node), gives

        x + (sigma_lo - sigma_hi) eps + w (eps_node - eps).

    w = [int_{sigma_hi}^{sigma_lo} (abar(u) - abar(sigma)) du] / (abar(sigma_node) - abar(sigma)),
    and int abar du = arctan. With sigma_node = the previous level this is the authors' accelerated
    DDIM term (their sqrt(abar_{t-1}) / (abar_t - abar_{t+1}) [...] coefficient, rewritten in VE
    variables). NaN when the nodes coincide; the samplers then skip the correction.
    """
    integral = atan_gap(sigma_lo, sigma_hi) - abar(sigma) * (float(sigma_lo) - float(sigma_hi))
    gap = abar_gap(sigma_node, sigma)
    if gap == 0.0:
        return math.nan
    return integral / gap


def sde_noise_scales(sigma_hi: float, sigma_lo: float) -> tuple[float, float]:
    """The two noise scales of the accelerated stochastic step, (sqrt(D/2), sqrt(D abar_hi / (2 abar_lo))).

    The authors' README step, Y+ = Y + sqrt((1-a)/2) Z, Y' = (Y+ + (1-a) s(Y+)) / sqrt(a) +
    sqrt((1-a)/2) Z' with a = abar_hi / abar_lo, is in VE variables x+ = x + sqrt(D/2) z,
    x' = x+ + D s(x+) + sqrt(D (1 + sigma_lo^2) / (2 (1 + sigma_hi^2))) z'.
    """
    hi, lo = float(sigma_hi), float(sigma_lo)
    d = (hi - lo) * (hi + lo)
    return math.sqrt(d / 2.0), math.sqrt(d * (1.0 + lo * lo) / (2.0 * (1.0 + hi * hi)))


# -- shared pieces -------------------------------------------------------------------------


def _add_correction(x: torch.Tensor, w: float, delta: torch.Tensor) -> torch.Tensor:
    """x + w delta where that is finite, per sample; x where it is not.

    The authors skip the accelerated term when it holds a NaN (for the whole batch); we decide
    per sample so that an image never depends on the rest of its batch. A non-finite w (nodes
    that coincide) skips it everywhere: the step is then plain DDIM."""
    if not math.isfinite(w):
        return x
    term = w * delta
    ok = torch.isfinite(term).flatten(1).all(dim=1)
    if bool(ok.all()):
        return x + term
    return x + torch.where(ok[:, None, None, None], term, torch.zeros_like(term))


# -- deterministic samplers ----------------------------------------------------------------


@torch.no_grad()
def ddim(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """DDIM = Euler in sigma on the probability-flow ODE dx/dsigma = eps = -sigma s(x, sigma).
    First order; n score calls."""
    no_precond("ddim", precond)
    x = steps.sigma_max * noise()
    n = len(steps)
    for i in range(n):
        sigma, hi, lo = levels(steps, i)
        s = eval_score(score, x, sigma)
        x_eval = x
        x = x + sigma**2 * s if lo == 0 else x + (lo - hi) * (-sigma * s)
        if callback is not None:
            report(callback, i, n, sigma, x, tweedie(x_eval, sigma, s), i + 1)
    return x


@torch.no_grad()
def accel_ode(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """The authors' accelerated deterministic sampler (one score call per step): the DDIM step
    plus w (eps_prev - eps), i.e. eps taken linear in abar through this step's and the previous
    step's evaluations and integrated exactly: a two-step multistep method, second order.
    The first step (no previous evaluation) is plain DDIM, as in the authors' code; n calls."""
    no_precond("accel-ode", precond)
    x = steps.sigma_max * noise()
    n = len(steps)
    prev = None  # (sigma, eps) of the previous evaluation
    for i in range(n):
        sigma, hi, lo = levels(steps, i)
        s = eval_score(score, x, sigma)
        x_eval = x
        if lo == 0:
            x = x + sigma**2 * s
        else:
            eps = -sigma * s
            x = x + (lo - hi) * eps
            if prev is not None:
                x = _add_correction(x, abar_linear_weight(sigma, hi, lo, prev[0]), prev[1] - eps)
            prev = (sigma, eps)
        if callback is not None:
            report(callback, i, n, sigma, x, tweedie(x_eval, sigma, s), i + 1)
    return x


@torch.no_grad()
def accel_ode2(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """Two-call accelerated deterministic step: eps at x, a DDIM step to sigma_lo, eps there, and
    the exact integral of eps linear in abar between the two (a Heun / DPM-Solver-2-type single
    step: no history, second order). 2 calls per step, 1 for the final denoise: 2n - 1."""
    no_precond("accel-ode2", precond)
    x = steps.sigma_max * noise()
    n, nfe = len(steps), 0
    for i in range(n):
        sigma, hi, lo = levels(steps, i)
        s = eval_score(score, x, sigma)
        nfe += 1
        x_eval = x
        if lo == 0:
            x = x + sigma**2 * s
        else:
            eps = -sigma * s
            x_ddim = x + (lo - hi) * eps
            eps_lo = -lo * eval_score(score, x_ddim, lo)
            nfe += 1
            x = _add_correction(x_ddim, abar_linear_weight(sigma, hi, lo, lo), eps_lo - eps)
        if callback is not None:
            report(callback, i, n, sigma, x, tweedie(x_eval, sigma, s), nfe)
    return x


# -- stochastic samplers -------------------------------------------------------------------


@torch.no_grad()
def ddpm(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """Reverse diffusion only (score_sde's predictor; the DDPM step in VE variables):
    x' = x + D M M^T s(x, sigma) + sqrt(D) M z. n calls. With M != I this is the PDS predictor,
    a heuristic: it keeps the marginals only for M M^T = I (docs/samplers.md)."""
    grad, draw = precond_maps(precond)
    x = steps.sigma_max * draw(noise())
    n = len(steps)
    for i in range(n):
        sigma, hi, lo = levels(steps, i)
        s = eval_score(score, x, sigma)
        x_eval = x
        if lo == 0:
            x = x + sigma**2 * s
        else:
            d = (hi - lo) * (hi + lo)
            x = x + d * grad(s) + math.sqrt(d) * draw(noise())
        if callback is not None:
            report(callback, i, n, sigma, x, tweedie(x_eval, sigma, s), i + 1)
    return x


@torch.no_grad()
def accel_sde(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """The accelerated stochastic sampler (the authors' README form, one call per step): half
    the step's noise first, the score at that perturbed point, then the drift and the other
    half of the noise. The final denoise adds no noise first. n calls. With M, both draws are
    M z and the drift D M M^T s: a heuristic, as for ddpm."""
    grad, draw = precond_maps(precond)
    x = steps.sigma_max * draw(noise())
    n = len(steps)
    for i in range(n):
        sigma, hi, lo = levels(steps, i)
        if lo == 0:
            s = eval_score(score, x, sigma)
            x_eval = x
            x = x + sigma**2 * s
        else:
            pre, post = sde_noise_scales(hi, lo)
            d = (hi - lo) * (hi + lo)
            x_eval = x + pre * draw(noise())
            s = eval_score(score, x_eval, sigma)
            x = x_eval + d * grad(s) + post * draw(noise())
        if callback is not None:
            report(callback, i, n, sigma, x, tweedie(x_eval, sigma, s), i + 1)
    return x
