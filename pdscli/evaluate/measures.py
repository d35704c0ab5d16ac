"""Quality measures on the mixture model (the exact second moments are in `pdscli.evaluate.moments`).

  * `mode_shares`, `mode_tv`, `per_mode_spectral_kl`: each sample goes to its most likely
    component (at sigma = 0), and the shares are compared with the weights (total variation)
    and each component's samples with its spectrum (the Gaussian model's `spectral_kl`).
"""

from __future__ import annotations

import torch

from pdscli.evaluate.mixture import MixtureImageModel


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
