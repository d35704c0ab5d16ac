"""What every sampler's step shares: the score call at a float level, the grid's levels of a
step, Tweedie's denoised estimate, the callback's report, the preconditioner's two maps and the
one refusal of a preconditioner.

The callback contract (every sampler in `pdscli.samplers`): at the end of step i it is called
with {"i", "n", "sigma", "x", "denoised", "nfe"}: i of n steps, the grid level sigma[i] (float),
the state x after the step, denoised = D(x_e) = x_e + sigma_e^2 s(x_e, sigma_e) at one of the
step's score evaluations (the data prediction, not clipped: the PC family's last one, the
predictor's; the two-call samplers' first one, at the step's own level), and the score calls
made so far in this call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pdscli.errors import PdsError
from pdscli.samplers.grids import Steps


def eval_score(score, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """s(x, sigma) with sigma as the [B] float32 tensor of the contract."""
    return score(x, torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device))


def levels(steps: Steps, i: int) -> tuple[float, float, float]:
    """Step i's (sigma, sigma_hi, sigma_lo) as floats."""
    return float(steps.sigma[i]), float(steps.sigma_hi[i]), float(steps.sigma_lo[i])


def tweedie(x: torch.Tensor, sigma: float, s: torch.Tensor) -> torch.Tensor:
    """Tweedie's D(x) = x + sigma^2 s(x, sigma): the data prediction at noise level sigma."""
    return x + sigma**2 * s


def report(callback, i: int, n: int, sigma: float, x: torch.Tensor, denoised: torch.Tensor, nfe: int) -> None:
    """Step i's info to `callback` (None: nothing); the keys are this module's contract."""
    if callback is not None:
        callback({"i": i, "n": n, "sigma": sigma, "x": x, "denoised": denoised, "nfe": nfe})


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def precond_maps(precond) -> tuple[Callable, Callable]:
    """(grad, draw): g -> M M^T g and z -> M z of a `pdscli.precondition.Preconditioner`, or identities."""
    if precond is None:
        return identity, identity
    return precond.grad, precond.noise


# The samplers that take a preconditioner (their update has M M^T s with M z noise).
PRECONDITIONED = "pds, ddpm and accel-sde"


def no_precond(name: str, precond) -> None:
    """Refuse a preconditioner for sampler `name`, which has no use for one.

    M M^T s is not the velocity of any flow that carries p_sigma to p_sigma' (only M = I is),
    and the prior sigma_max M z is not N(0, sigma_max^2 I): an ODE solver's result would not be
    the ODE's solution, and the data-prediction solvers' D has no M behind it either."""
    if precond is not None:
        raise PdsError(f"{name} takes no preconditioner (filters); use {PRECONDITIONED} with filters, "
                       "or drop --masks/--freq-mask/--space-mask")
