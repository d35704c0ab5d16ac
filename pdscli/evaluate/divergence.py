"""The Gaussian KL that every spectral quality figure is built on.

For a zero-mean Gaussian coefficient with variance v measured against one with variance lam,
KL(N(0, v) || N(0, lam)) = 1/2 (r - 1 - ln r) with r = v / lam: 0 at r = 1, and a coefficient
20 % too wide (r = 1.44) costs 0.038. The analytic model's spectral KL, the exact recursions'
figures and bench's reference statistic are means of it over Fourier coefficients or bands.
"""

from __future__ import annotations

import torch


def gaussian_kl(ratio: torch.Tensor) -> torch.Tensor:
    """KL(N(0, r lam) || N(0, lam)) = 1/2 (r - 1 - ln r), elementwise in the variance ratio r."""
    return 0.5 * (ratio - 1 - torch.log(ratio))


def mean_gaussian_kl(variance: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean of `gaussian_kl` over all coefficients, r = variance / reference."""
    return float(gaussian_kl(variance / reference).mean())
