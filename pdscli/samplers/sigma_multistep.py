"""Linear multistep solvers of the VE probability-flow ODE in sigma: iPNDM, iPNDM-v and the
gradient-estimation sampler.

Same signature as every sampler in `pdscli.samplers`:

    sampler(score, noise, steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> x

    name                 kind           score calls (n = len(steps))   update (step sigma -> sigma_lo, dt = sigma_lo - sigma)
    ipndm                deterministic  n                              Adams-Bashforth, uniform-step weights, order <= 4
    ipndm-v              deterministic  n                              Adams-Bashforth, weights of the actual steps, order <= 4
    gradient-estimation  deterministic  n                              x + dt (d + (gamma - 1)(d - d_prev)), gamma = 2

The ODE is EDM's form for sigma(t) = t: dx/dsigma = d(x, sigma) = (x - D) / sigma = -sigma s(x, sigma),
with D = x + sigma^2 s the data prediction. All three keep the slopes d of the last steps and
step in sigma (not in log sigma as DPM-Solver++ does):

  * iPNDM (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator",
    arXiv 2204.13902, the improved PNDM): the k-step Adams-Bashforth rule with the weights of
    equal steps (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24), k = min(4, i + 1),
    whatever the grid. Exact for polynomial slopes only on an equally spaced grid; on a smooth
    uneven grid the mismatch is O(h^3) per step, so it is second order there.
  * iPNDM-v: the same rule with the weights of the grid's actual steps: the integral over
    [sigma, sigma_lo] of the polynomial through the last k slopes. Fourth order on any grid.
    (ComfyUI's `sample_ipndm_v`, after Zhou et al.'s diff-solvers, uses approximate third- and
    fourth-order weights that agree with these on equal steps only.)
  * gradient estimation (Permenter & Yuan 2023, "Interpreting and Improving Diffusion Models
    from an Optimization Perspective", arXiv 2306.04848): after the first (Euler) step, the
    slope is extrapolated by gamma - 1 times its last change. Formally first order; its
    strength is the first few steps of a short grid.

As everywhere in `pdscli.samplers`, the step whose sigma_lo is 0 (the last step of a grid) is
the Tweedie denoise x' = D(x, sigma_min); its slope enters no later step. Weights are float64;
the state stays float32. No preconditioner: M M^T s is the velocity of no flow (see ddim).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from pdscli.samplers.common import eval_score, levels, no_precond, report, tweedie
from pdscli.samplers.grids import Steps

MAX_ORDER = 4  # iPNDM's and ComfyUI's default
GE_GAMMA = 2.0  # Permenter & Yuan's gamma (ComfyUI's default)


def adams_weights(nodes: tuple[float, ...]) -> tuple[float, ...]:
    """Weights w with integral_0^1 p(u) du = sum_j w_j p(u_j) for every polynomial p of degree
    < len(nodes): the Adams-Bashforth weights for slopes known at `nodes`, in units of the step
    (u = (sigma' - sigma) / dt: 0 is this step's node, -1 the previous node of an equal step)."""
    u = np.asarray(nodes, dtype=np.float64)
    out = []
    for j in range(len(u)):
        # Lagrange basis polynomial of node j, integrated exactly over [0, 1].
        basis = np.polynomial.Polynomial([1.0])
        for m in range(len(u)):
            if m != j:
                basis = basis * np.polynomial.Polynomial([-u[m], 1.0]) / (u[j] - u[m])
        antiderivative = basis.integ()
        out.append(float(antiderivative(1.0) - antiderivative(0.0)))
    return tuple(out)


@lru_cache(maxsize=None)
def uniform_weights(order: int) -> tuple[float, ...]:
    """The equal-step Adams-Bashforth weights of `order` (iPNDM's), newest slope first."""
    return adams_weights(tuple(-float(k) for k in range(order)))


def _adams(name: str, score, noise, steps: Steps, precond, callback, *, variable: bool) -> torch.Tensor:
    no_precond(name, precond)
    x = steps.sigma_max * noise()
    n = len(steps)
    slopes: list[tuple[float, torch.Tensor]] = []  # (sigma of the evaluation, d), newest first
    for i in range(n):
        sigma, _, lo = levels(steps, i)
        s = eval_score(score, x, sigma)
        denoised = tweedie(x, sigma, s)
        if lo == 0:
            x = denoised
        else:
            d = -sigma * s
            slopes = [(sigma, d), *slopes[: MAX_ORDER - 1]]
            dt = lo - sigma
            if variable:
                weights = adams_weights(tuple((node - sigma) / dt for node, _ in slopes))
            else:
                weights = uniform_weights(len(slopes))
            step = weights[0] * slopes[0][1]
            for w, (_, older) in zip(weights[1:], slopes[1:]):
                step = step + w * older
            x = x + dt * step
        report(callback, i, n, sigma, x, denoised, i + 1)
    return x


@torch.no_grad()
def ipndm(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> torch.Tensor:
    """iPNDM: Adams-Bashforth in sigma with equal-step weights, up to 4 slopes. n calls."""
    return _adams("ipndm", score, noise, steps, precond, callback, variable=False)


@torch.no_grad()
def ipndm_v(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> torch.Tensor:
    """iPNDM-v: Adams-Bashforth in sigma with the actual steps' weights, up to 4 slopes. n calls."""
    return _adams("ipndm-v", score, noise, steps, precond, callback, variable=True)


@torch.no_grad()
def gradient_estimation(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False,
                        callback=None) -> torch.Tensor:
    """Permenter & Yuan's gradient-estimation sampler (gamma = 2). n calls."""
    no_precond("gradient-estimation", precond)
    x = steps.sigma_max * noise()
    n = len(steps)
    previous = None
    for i in range(n):
        sigma, _, lo = levels(steps, i)
        s = eval_score(score, x, sigma)
        denoised = tweedie(x, sigma, s)
        if lo == 0:
            x = denoised
        else:
            d = -sigma * s
            slope = d if previous is None else d + (GE_GAMMA - 1.0) * (d - previous)
            x = x + (lo - sigma) * slope
            previous = d
        report(callback, i, n, sigma, x, denoised, i + 1)
    return x
