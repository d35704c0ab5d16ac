"""Samplers for variance-exploding score models: predictor-corrector (PC) and PDS.

Every sampler has one signature, in the style of k-diffusion:

    sampler(score, noise, steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> x

`score(x, sigma)` is the model (x [B, C, H, W] float32, sigma [B] float32), `noise()` returns a
fresh N(0, I) batch (its first draw makes the prior), `steps` a `Steps` grid, `precond` a
`pdscli.precondition.Preconditioner` (None = identity). The result is the denoised x of the last
step (not clipped).

The PC loop follows score_sde / PDS (sampling.py, sde_lib.py of the reference) step by step:
start x = sigma_max * M z; each step one Langevin corrector step, then one reverse-diffusion
predictor step, both evaluating the score at the continuous sigma(t); the predictor moves
sigma_hi -> sigma_lo of the discrete ladder. PDS is the same loop with M != I.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

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
    if n_steps is not None and speed_up is not None:
        raise PdsError("give a number of steps or a speed-up, not both")
    if speed_up is not None:
        speed_up = float(speed_up)
        if not (math.isfinite(speed_up) and speed_up > 0):
            raise PdsError(f"the speed-up must be a positive number, got {speed_up:g}")
        n = int(settings.num_scales / speed_up)  # the reference's int(config.model.num_scales / speed_up)
        if n < 1:
            raise PdsError(f"a speed-up of {speed_up:g} leaves no steps of the model's {settings.num_scales}")
        k = speed_up
    elif n_steps is not None:
        n = int(n_steps)
        if n < 1:
            raise PdsError(f"the number of steps must be at least 1, got {n_steps}")
        k = settings.num_scales / n
    else:
        n, k = settings.num_scales, 1.0
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


# -- the two updates ------------------------------------------------------------------------


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _norms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norms, [B] float64."""
    return torch.linalg.vector_norm(x.flatten(1), dim=1).double()


def langevin_step(score, noise, x, sigma, *, snr, precond=None, per_sample_step=False):
    """One Langevin corrector step at noise level sigma ([B] float32); returns (x, x_mean).

    g = M M^T s(x, sigma), z = M z0; step = 2 (snr |z| / |g|)^2 with the norms averaged over the
    batch (the reference) or per sample; x_mean = x + step g, x = x_mean + sqrt(2 step) z.
    """
    grad = precond.grad if precond is not None else _identity
    draw = precond.noise if precond is not None else _identity
    g = grad(score(x, sigma))
    z = draw(noise())
    g_norm, z_norm = _norms(g), _norms(z)
    if per_sample_step:
        step = 2 * (snr * z_norm / g_norm) ** 2
        step = step.float()[:, None, None, None]
    else:
        # The reference's batch-mean norms couple the samples of a batch (see `pc`).
        step = (2 * (snr * z_norm.mean() / g_norm.mean()) ** 2).float()
    x_mean = x + step * g
    return x_mean + torch.sqrt(2 * step) * z, x_mean


def reverse_diffusion_step(score, noise, x, sigma, sigma_hi: float, sigma_lo: float, *, precond=None):
    """One reverse-diffusion predictor step from sigma_hi to sigma_lo; returns (x, x_mean).

    D = sigma_hi^2 - sigma_lo^2 (float64); x_mean = x + D M M^T s(x, sigma); x = x_mean + sqrt(D) M z.
    """
    grad = precond.grad if precond is not None else _identity
    draw = precond.noise if precond is not None else _identity
    d = float(sigma_hi) ** 2 - float(sigma_lo) ** 2
    x_mean = x + d * grad(score(x, sigma))
    return x_mean + math.sqrt(d) * draw(noise()), x_mean


# -- samplers -------------------------------------------------------------------------------


def _check_snr(snr: float) -> float:
    snr = float(snr)
    if not (math.isfinite(snr) and snr > 0):
        raise PdsError(f"snr must be a positive number, got {snr:g}")
    return snr


@torch.no_grad()
def _pc_loop(score, noise, steps: Steps, *, precond, snr, per_sample_step, callback, corrector: bool, predictor: bool):
    snr = _check_snr(snr)
    z = noise()
    x = steps.sigma_max * (precond.noise(z) if precond is not None else z)
    x_mean = x
    n, nfe = len(steps), 0
    for i in range(n):
        # The score's sigma: [B] float32 on x's device (the contract), same for both updates.
        sigma = torch.full((x.shape[0],), float(steps.sigma[i]), dtype=torch.float32, device=x.device)
        if corrector:
            x, x_mean = langevin_step(score, noise, x, sigma, snr=snr, precond=precond, per_sample_step=per_sample_step)
            nfe += 1
        if predictor:
            x, x_mean = reverse_diffusion_step(score, noise, x, sigma, steps.sigma_hi[i], steps.sigma_lo[i], precond=precond)
            nfe += 1
        if callback is not None:
            callback({"i": i, "n": n, "sigma": float(steps.sigma[i]), "x": x, "denoised": x_mean, "nfe": nfe})
    return x_mean


def pc(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> torch.Tensor:
    """Predictor-corrector sampling (2 score evaluations per step): Langevin corrector, then
    reverse-diffusion predictor; returns the last predictor's x_mean (the reference's denoise).

    With a `precond` this is PDS. per_sample_step=False uses the reference's batch-mean norms
    for the Langevin step size, so a sample's image depends (slightly) on the rest of its batch;
    per_sample_step=True makes every sample independent of the batch it lands in.
    """
    return _pc_loop(score, noise, steps, precond=precond, snr=snr, per_sample_step=per_sample_step,
                    callback=callback, corrector=True, predictor=True)


def pds(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> torch.Tensor:
    """Preconditioned diffusion sampling: `pc` with the preconditioner M (None = vanilla PC)."""
    return pc(score, noise, steps, precond=precond, snr=snr, per_sample_step=per_sample_step, callback=callback)


def predictor(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> torch.Tensor:
    """Reverse-diffusion predictor only (1 score evaluation per step); snr and per_sample_step
    are unused. Its samples never depend on the batch."""
    return _pc_loop(score, noise, steps, precond=precond, snr=snr, per_sample_step=per_sample_step,
                    callback=callback, corrector=False, predictor=True)


def corrector(score, noise, steps: Steps, *, precond=None, snr=0.16, per_sample_step=False, callback=None) -> torch.Tensor:
    """Annealed Langevin corrector only (1 score evaluation per step) at the grid's sigmas.
    Returns the last corrector step's x_mean (without its noise); the reference returns that x
    with the noise, a difference of about 2 * snr * sigma_min per pixel."""
    return _pc_loop(score, noise, steps, precond=precond, snr=snr, per_sample_step=per_sample_step,
                    callback=callback, corrector=True, predictor=False)


SAMPLERS: dict[str, Callable] = {"pc": pc, "pds": pds, "predictor": predictor, "corrector": corrector}

# Score evaluations per step. Accelerated samplers declare theirs in pdscli.accelerated.
NFE_PER_STEP: dict[str, int] = {"pc": 2, "pds": 2, "predictor": 1, "corrector": 1}


def available_samplers() -> dict[str, Callable]:
    from pdscli import accelerated  # lazily: it imports this module

    return {**SAMPLERS, **accelerated.SAMPLERS}


def get_sampler(name: str) -> Callable:
    """The sampler called `name` on the command line; a PdsError listing the choices if unknown."""
    table = available_samplers()
    try:
        return table[name]
    except KeyError:
        raise PdsError(f"unknown sampler {name!r}; choose one of: {', '.join(table)}") from None


def nfe_count(name: str, n_steps: int) -> int | None:
    """Score evaluations the sampler `name` spends on `n_steps` steps (None: unknown sampler)."""
    if name in NFE_PER_STEP:
        return NFE_PER_STEP[name] * int(n_steps)
    from pdscli import accelerated

    return accelerated.nfe_count(name, n_steps)
