"""Quality measures on the exact models.

  * `exact_second_moments` / `exact_spectral_kl`: a sampler's exact output spectrum on the
    Gaussian model (no sampling floor). Every sampler that is linear in its noise draws and
    treats the samples of a batch independently (all but the PC family, whose step size
    depends on norms) maps the draws z_0 (the prior), z_1, ... to x - mu = sum_j A_j z_j + b,
    with every A_j a Fourier multiplier (the model is stationary and diagonal in the DFT). One
    batched run with a unit impulse in draw j of sample j reads every A_j off at once; the
    second moment of each output coefficient is then sum_j |A_j|^2 + |F b|^2, exactly (up to
    float32 rounding), and its KL from the data spectrum is `GaussianImageModel.spectral_kl`'s
    measure without the estimate's 1/(4n) floor.
  * `mode_shares`, `mode_tv`, `per_mode_spectral_kl`: on the mixture model, each sample goes to
    its most likely component (at sigma = 0), and the shares are compared with the weights
    (total variation) and each component's samples with its spectrum (the Gaussian model's
    `spectral_kl`).
"""

from __future__ import annotations

import math

import torch

from pdscli.errors import PdsError
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.mixture import MixtureImageModel


def exact_second_moments(model: GaussianImageModel, sampler, steps, *, precond=None, max_draws: int | None = None) -> torch.Tensor:
    """E|F_ortho(x_out - mu)|^2 per coefficient, [C, H, W] float64, for `sampler` on `model`.

    The sampler must be linear in its draws and per-sample (see the module docstring);
    max_draws bounds how many noise draws it makes (default 2 len(steps) + 2)."""
    if model.channel_corr != 0.0:
        raise PdsError("exact_second_moments needs a model with uncorrelated channels")
    shape = model.shape
    probes = int(max_draws or 2 * len(steps) + 2)
    count = [0]

    def impulses() -> torch.Tensor:
        # Draw j: sample j holds a unit impulse at pixel (0, 0) of every channel, the others zero.
        j = count[0]
        count[0] += 1
        if j >= probes:
            raise RuntimeError(f"the sampler drew noise more than {probes} times")
        z = torch.zeros((probes, *shape), dtype=torch.float32, device=model.device)
        z[j, :, 0, 0] = 1.0
        return z

    mu = model.mean

    def centred(x, sigma):  # the same model with mean 0: the sampler is then linear, not affine
        return model.score(x + mu, sigma)

    response = sampler(centred, impulses, steps, precond=precond).detach().to("cpu", torch.float64)
    n = shape[1] * shape[2]
    gains = torch.fft.fft2(response, norm="ortho") * math.sqrt(n)  # [probes, C, H, W]: A_j per coefficient
    zeros = lambda: torch.zeros((1, *shape), dtype=torch.float32, device=model.device)
    bias = sampler(model.score, zeros, steps, precond=precond).detach().to("cpu", torch.float64) - mu
    return (gains.abs() ** 2).sum(0) + torch.fft.fft2(bias[0], norm="ortho").abs() ** 2


def kl_of_moments(model: GaussianImageModel, moments: torch.Tensor) -> float:
    """Mean over coefficients of KL(N(0, v) || N(0, lam)) = 1/2 (r - 1 - ln r), r = v / lam."""
    r = moments / model.lam
    return float((0.5 * (r - 1 - torch.log(r))).mean())


def exact_spectral_kl(model: GaussianImageModel, sampler, steps, *, precond=None) -> float:
    """The population spectral KL of a linear per-sample sampler's output (no sampling floor)."""
    return kl_of_moments(model, exact_second_moments(model, sampler, steps, precond=precond))


def assign_modes(model: MixtureImageModel, samples: torch.Tensor) -> torch.Tensor:
    """Each sample's most likely component under the clean data density, [N] long."""
    return model.log_densities(samples, 0.0).argmax(dim=1)


def mode_shares(model: MixtureImageModel, samples: torch.Tensor) -> torch.Tensor:
    """The share of samples assigned to each component, [K] float64."""
    k = len(model.components)
    return torch.bincount(assign_modes(model, samples), minlength=k).to(torch.float64) / len(samples)


def mode_tv(model: MixtureImageModel, samples: torch.Tensor) -> float:
    """Total variation between the assigned shares and the true weights: 1/2 sum |share - w|."""
    return float(0.5 * (mode_shares(model, samples) - model.weights).abs().sum())


def per_mode_spectral_kl(model: MixtureImageModel, samples: torch.Tensor, *, min_count: int = 2) -> list[float | None]:
    """Each component's spectral KL over the samples assigned to it (None with fewer than min_count)."""
    modes = assign_modes(model, samples)
    out: list[float | None] = []
    for k, comp in enumerate(model.components):
        mine = samples[modes == k]
        out.append(comp.spectral_kl(mine) if len(mine) >= min_count else None)
    return out


def mixture_quality(model: MixtureImageModel, samples: torch.Tensor) -> dict:
    """mode TV, shares and per-mode KL (plus their weight-averaged mean) of a set of samples."""
    per_mode = per_mode_spectral_kl(model, samples)
    known = [(float(w), kl) for w, kl in zip(model.weights, per_mode) if kl is not None]
    mean_kl = sum(w * kl for w, kl in known) / sum(w for w, _ in known) if known else None
    return {
        "mode_tv": mode_tv(model, samples),
        "mode_shares": [float(s) for s in mode_shares(model, samples)],
        "per_mode_kl": per_mode,
        "mean_mode_kl": mean_kl,
    }
