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

import torch

from pdscli.errors import PdsError
from pdscli.samplers.grids import Steps

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
