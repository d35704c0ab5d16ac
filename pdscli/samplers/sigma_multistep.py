"""Linear multistep solvers of the VE probability-flow ODE in sigma: iPNDM, iPNDM-v and the
gradient-estimation sampler.

The common signature of `pdscli.samplers` (no keywords of their own):

    sampler(score, noise, steps, *, precond=None, callback=None) -> x

    name                 kind           score calls (n = len(steps))   update (step sigma -> sigma_lo, dt = sigma_lo - sigma)
    ipndm                deterministic  n                              Adams-Bashforth, uniform-step weights, order <= 4
    ipndm-v              deterministic  n                              Adams-Bashforth, variable-step weights, order <= 4
    gradient-estimation  deterministic  n                              x + dt (d + (gamma - 1)(d - d_prev)), gamma = 2

The ODE is EDM's form for sigma(t) = t: dx/dsigma = d(x, sigma) = (x - D) / sigma = -sigma s(x, sigma),
with D = x + sigma^2 s the data prediction. All three keep the slopes d of the last steps and
step in sigma (not in log sigma as DPM-Solver++ does):

  * iPNDM (Zhang & Chen 2022, "Fast Sampling of Diffusion Models with Exponential Integrator",
    arXiv 2204.13902, the improved PNDM): the k-step Adams-Bashforth rule with the weights of
    equal steps (1; 3/2, -1/2; 23/12, -16/12, 5/12; 55/24, -59/24, 37/24, -9/24), k = min(4, i + 1),
    whatever the grid. Exact for polynomial slopes only on an equally spaced grid; on a smooth
    uneven grid the mismatch is O(h^3) per step, so it is second order there.
  * iPNDM-v: the same rule with weights that follow the grid's steps (`variable_weights`): exact
    variable-step AB2, plus the third- and fourth-order corrections of Zhou et al.'s diff-solvers
    (as ComfyUI's `sample_ipndm_v` runs them), approximations of the variable-step ones; second order on
    a smooth grid, and at 10-15 NFE on the exact Gaussian model the best of these solvers. (The
    exact variable-step Adams-Bashforth weights, `adams_weights`, are fourth order but measure
    10-100x worse in KL at 5-15 NFE here: the higher-order terms amplify on steps this large.)
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


def variable_weights(h: tuple[float, ...]) -> tuple[float, ...]:
    """iPNDM-v's weights, newest slope first, for the step h[0] and the earlier steps h[1:] (signed
    sigma differences, newest first; len(h) = the order): the variable-step AB2 weights plus
    Zhou et al.'s third- and fourth-order corrections: AB3 on equal steps, and on equal steps the
    fourth-order term weighs the third backward difference 11/24 where AB4 has 3/8. The
    corrections are multiples of the second and third divided differences of the slopes (in units
    of the steps). ComfyUI's `sample_ipndm_v` has -a b as the last weight of the fourth-order term,
    where the divided difference has -b h2 / h3: the same when the step ratio is constant (a
    log-uniform grid), but its weights then do not sum to 1 on other grids (the Karras grid: error
    slope -0.75 over 20-160 steps; -2.0 with the divided difference).

    With r = h0 / h1, a = h1 / h2 and b = h1 (h1 + h2) / (h2 (h2 + h3)):
      order 2: (1 + r/2, -r/2)
      order 3: + t3 (1, -(1 + a), a),              t3 = (1 - h0^2 / (3 h1 (h1 + h2))) / 2
      order 4: + t4 (1, -(1 + a + b), a + b (1 + h2 / h3), -b h2 / h3),
               t4 = [(1 - h0 / (3 s1)) / 2 + (1 - h0 / (2 s1)) h0 / (6 s2)] h0 s1 s2 / (h1 (h1 + h2) (h1 + h2 + h3)),
               s1 = h0 + h1, s2 = h0 + h1 + h2.
    """
    if len(h) == 1:
        return (1.0,)
    h0, h1 = h[0], h[1]
    r = h0 / h1
    w = [1.0 + r / 2, -r / 2, 0.0, 0.0][: len(h)]
    if len(h) >= 3:
        h2 = h[2]
        a = h1 / h2
        t3 = (1.0 - h0 * h0 / (3.0 * h1 * (h1 + h2))) / 2.0
        for k, c in enumerate((1.0, -(1.0 + a), a)):
            w[k] += t3 * c
    if len(h) >= 4:
        h3 = h[3]
        s1, s2 = h0 + h1, h0 + h1 + h2
        b = h1 * (h1 + h2) / (h2 * (h2 + h3))
        t4 = ((1.0 - h0 / (3.0 * s1)) / 2.0 + (1.0 - h0 / (2.0 * s1)) * h0 / (6.0 * s2)) \
            * h0 * s1 * s2 / (h1 * (h1 + h2) * (h1 + h2 + h3))
        for k, c in enumerate((1.0, -(1.0 + a + b), a + b * (1.0 + h2 / h3), -b * h2 / h3)):
            w[k] += t4 * c
    return tuple(w)


def _ipndm_weights(nodes: tuple[float, ...]) -> tuple[float, ...]:
    return uniform_weights(len(nodes) - 1)


def _ipndm_v_weights(nodes: tuple[float, ...]) -> tuple[float, ...]:
    return variable_weights(tuple(nodes[k] - nodes[k + 1] for k in range(len(nodes) - 1)))


def _gradient_estimation_weights(nodes: tuple[float, ...]) -> tuple[float, ...]:
    # d + (gamma - 1)(d - d_prev): the newest slope weighs gamma, the one before 1 - gamma
    return (1.0,) if len(nodes) == 2 else (GE_GAMMA, 1.0 - GE_GAMMA)


def _multistep_in_sigma(name: str, score, noise, steps: Steps, precond, callback, rule) -> torch.Tensor:
    """x' = x + (sigma_lo - sigma) sum_j w_j d_j over the last slopes d_j (newest first), with
    w = rule((sigma_lo, sigma, sigma_prev, ...)): the levels the step goes to and the slopes sit at."""
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
            slopes = [(sigma, -sigma * s), *slopes[: MAX_ORDER - 1]]
            weights = rule((lo, *(node for node, _ in slopes)))
            step = weights[0] * slopes[0][1]
            for w, (_, older) in zip(weights[1:], slopes[1:]):
                step = step + w * older
            x = x + (lo - sigma) * step
        report(callback, i, n, sigma, x, denoised, i + 1)
    return x


@torch.no_grad()
def ipndm(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """iPNDM: Adams-Bashforth in sigma with equal-step weights, up to 4 slopes. n calls."""
    return _multistep_in_sigma("ipndm", score, noise, steps, precond, callback, _ipndm_weights)


@torch.no_grad()
def ipndm_v(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """iPNDM-v: Adams-Bashforth in sigma with variable-step weights, up to 4 slopes. n calls."""
    return _multistep_in_sigma("ipndm-v", score, noise, steps, precond, callback, _ipndm_v_weights)


@torch.no_grad()
def gradient_estimation(score, noise, steps: Steps, *, precond=None, callback=None) -> torch.Tensor:
    """Permenter & Yuan's gradient-estimation sampler (gamma = 2). n calls."""
    return _multistep_in_sigma("gradient-estimation", score, noise, steps, precond, callback,
                               _gradient_estimation_weights)
