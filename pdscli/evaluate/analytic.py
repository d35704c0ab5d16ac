"""An analytic score model: a stationary Gaussian image prior whose score is exact.

The data distribution is x ~ N(mu, Sigma) on [C, H, W] images with
  * mean mu = `mean` (0.5) in every pixel,
  * covariance Sigma = K (x) Circ: a channel covariance K (1 on the diagonal, `channel_corr`
    off it) times, per channel, a circulant (periodic, stationary) spatial covariance whose
    eigenvalues follow a natural-image power spectrum  P(f) ~ 1 / (f0^2 + |f|^2)^power,
    f in cycles/pixel. It is scaled so every pixel has standard deviation `std`.

K = U diag(e) U^T, so in the decorrelated channel basis y = U^T (x - mu) every channel c is an
independent stationary field, diagonal in the 2-D DFT. With the orthonormal DFT (norm="ortho")
each coefficient Y[c, k] has variance lam[c, k] = e_c * P_k, and noising with sigma adds sigma^2:

  score(x, sigma) = -U F^-1 [ (lam + sigma^2)^-1 F U^T (x - mu) ]       (exact, closed form)

A sampler run on this model can be checked against ground truth no trained network gives:
`spectral_kl` and `variance_ratio_by_band` compare the empirical per-frequency variance of its
output with lam, and `ode_solution` is the exact probability-flow ODE map between noise levels.

Settings (documented choices):
  * sigma_min = 0.01 (every official VE config).
  * sigma_max = 378 * image_size / 64 unless given: the LSUN-bedroom value the PDS notes' exact
    experiment ran at 64x64, scaled with the image side so the prior's size relative to the
    data (which grows like sqrt(C*H*W)) stays the same at every resolution.
  * num_scales = 2000 and snr = 0.075: the 256-px configs (bedroom, church, CelebA-HQ, FFHQ
    256) that PDS accelerates.
"""

from __future__ import annotations

import torch

from pdscli.errors import PdsError
from pdscli.evaluate.divergence import mean_gaussian_kl
from pdscli.score import ScoreModel
from pdscli.settings import SamplingSettings


def _radial_frequency(size: int) -> torch.Tensor:
    """|f| in cycles/pixel on the unshifted [size, size] DFT grid (float64)."""
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


class GaussianImageModel:
    """Stationary Gaussian images with an exact score. All spectra are float64 on the CPU;
    the score runs in float32 on `device`."""

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        *,
        mean: float = 0.5,
        std: float = 0.15,
        power: float = 1.0,
        f0: float | None = None,
        channel_corr: float = 0.0,
        sigma_min: float = 0.01,
        sigma_max: float | None = None,
        num_scales: int = 2000,
        snr: float = 0.075,
        device="cpu",
    ):
        if image_size < 2 or channels < 1:
            raise PdsError(f"the gaussian model needs images of at least 2x2 pixels, got {channels}x{image_size}x{image_size}")
        if not std > 0:
            raise PdsError(f"the gaussian model's std must be positive, got {std}")
        if channels > 1 and not (-1 / (channels - 1) < channel_corr < 1):
            raise PdsError(f"channel_corr must lie in ({-1 / (channels - 1):.3g}, 1) for {channels} channels, got {channel_corr}")
        self.image_size, self.channels = int(image_size), int(channels)
        self.mean, self.std, self.power = float(mean), float(std), float(power)
        # The knee of the spectrum: one cycle per image, below which the power stops growing.
        self.f0 = float(f0) if f0 is not None else 1.0 / self.image_size
        self.channel_corr = float(channel_corr) if channels > 1 else 0.0
        self.device = torch.device(device)

        spectrum = 1.0 / (self.f0**2 + _radial_frequency(self.image_size) ** 2) ** self.power
        # Pixel variance of a circulant covariance = mean of its eigenvalues (orthonormal DFT).
        spectrum *= self.std**2 / spectrum.mean()
        k = torch.full((self.channels, self.channels), self.channel_corr, dtype=torch.float64)
        k.fill_diagonal_(1.0)
        eig, u = torch.linalg.eigh(k)
        self.channel_basis = u  # [C, C] float64, columns = decorrelated channels
        self.lam = eig[:, None, None] * spectrum[None]  # [C, H, W] float64
        half = self.image_size // 2 + 1
        self._lam_half = self.lam[..., :half].to(self.device)  # rfft2 layout, float64
        self._u = u.to(self.device, torch.float32)
        self._decorrelate = self.channel_corr != 0.0

        sigma_max = float(sigma_max) if sigma_max is not None else 378.0 * self.image_size / 64
        self.settings = SamplingSettings(
            sigma_min=float(sigma_min),
            sigma_max=sigma_max,
            num_scales=int(num_scales),
            snr=float(snr),
            image_size=self.image_size,
            num_channels=self.channels,
        ).validated()

    # -- shapes and bases ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-3:]) != self.shape:
            c, s = self.channels, self.image_size
            raise PdsError(f"the gaussian model makes {c}x{s}x{s} images, got a batch shaped {tuple(x.shape)}")

    def _white(self, d: torch.Tensor) -> torch.Tensor:
        """Channels -> decorrelated channels: U^T d."""
        if not self._decorrelate:
            return d
        return torch.einsum("ji,bjhw->bihw", self._u.to(d.device, d.dtype), d)

    def _color(self, y: torch.Tensor) -> torch.Tensor:
        """Decorrelated channels -> channels: U y."""
        if not self._decorrelate:
            return y
        return torch.einsum("ij,bjhw->bihw", self._u.to(y.device, y.dtype), y)

    def _scale_spectrum(self, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """F^-1 [factor * F x] per decorrelated channel; factor [B or 1, C, H, W//2+1] float64."""
        size = self.image_size
        spec = torch.fft.rfft2(x) * factor.to(x.device, torch.float32)
        return torch.fft.irfft2(spec, s=(size, size))

    def _per_sample(self, sigma, batch: int, device) -> torch.Tensor:
        """sigma as float64 [B, 1, 1, 1] on device, from a float or a [B] tensor."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1)
        if s.numel() == 1:
            s = s.expand(batch)
        if s.numel() != batch:
            raise ValueError(f"sigma has {s.numel()} values for a batch of {batch}")
        return s[:, None, None, None]

    # -- the model -------------------------------------------------------------------------
    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """grad log p_sigma(x), exact: x [B, C, H, W] float32, sigma [B] -> [B, C, H, W] float32."""
        self._check(x)
        s = self._per_sample(sigma, x.shape[0], x.device)
        # (lam + sigma^2)^-1 in float64: at sigma ~ 1e2 and lam ~ 1e-3 float32 would still do,
        # but the coefficients are cheap and the contract says float64.
        inv = 1.0 / (self._lam_half.to(x.device)[None] + s**2)
        y = self._white(x.float() - self.mean)
        return -self._color(self._scale_spectrum(y, inv))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact draws from the data distribution, [n, C, H, W] float32 on the model's device."""
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float32, device=self.device)
        y = self._scale_spectrum(z, self._lam_half.sqrt()[None])
        return self._color(y) + self.mean

    def variance(self, sigma: float = 0.0) -> torch.Tensor:
        """Exact variance of each orthonormal-DFT coefficient of the decorrelated channels of
        x_sigma = x + sigma * z: lam + sigma^2, [C, H, W] float64 (unshifted layout)."""
        return self.lam + float(sigma) ** 2

    def ode_solution(self, x_from: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """The probability-flow ODE's exact map from noise level sigma_from to sigma_to.

        Each Fourier coefficient of (x - mu) (decorrelated channels) scales by
        sqrt((lam + sigma_to^2) / (lam + sigma_from^2)). sigma_* are floats or [B] tensors.
        """
        self._check(x_from)
        b = x_from.shape[0]
        s_from = self._per_sample(sigma_from, b, x_from.device)
        s_to = self._per_sample(sigma_to, b, x_from.device)
        lam = self._lam_half.to(x_from.device)[None]
        factor = torch.sqrt((lam + s_to**2) / (lam + s_from**2))
        y = self._white(x_from.float() - self.mean)
        return self._color(self._scale_spectrum(y, factor)) + self.mean

    # -- quality measures against the closed form -------------------------------------------
    def empirical_variance(self, samples: torch.Tensor) -> torch.Tensor:
        """Per-coefficient variance of samples, like `variance()`: mean over the samples of
        |F_ortho U^T (x - mu)|^2, [C, H, W] float64. Uses the known mean mu, so a biased mean
        shows up as excess variance."""
        self._check(samples)
        x = samples.detach().to("cpu", torch.float64)
        y = x - self.mean
        if self._decorrelate:
            y = torch.einsum("ji,bjhw->bihw", self.channel_basis, y)
        coeff = torch.fft.fft2(y, norm="ortho")
        return (coeff.abs() ** 2).mean(dim=0)

    def spectral_kl(self, samples: torch.Tensor) -> float:
        """Mean over all C*H*W Fourier coefficients of KL( N(0, v_hat) || N(0, lam) ) =
        1/2 (r - 1 - ln r), r = v_hat / lam: how far each coefficient's empirical variance
        v_hat (see `empirical_variance`) is from the data's exact lam. 0 for a perfect
        sampler; with n exact samples the estimate's own floor is about 1/(4n)."""
        return mean_gaussian_kl(self.empirical_variance(samples), self.lam)

    def band_index(self, n_bands: int = 4) -> torch.Tensor:
        """Radial band of each DFT coefficient, [H, W] long: band b holds radii
        |f| in [b, b+1) * 0.5 / n_bands cycles/pixel; the last band also takes the corners
        (|f| > 0.5)."""
        radius = _radial_frequency(self.image_size)
        return torch.clamp((radius / 0.5 * n_bands).floor().long(), max=n_bands - 1)

    def variance_ratio_by_band(self, samples: torch.Tensor, n_bands: int = 4) -> torch.Tensor:
        """Mean of v_hat / lam over the coefficients of each radial band (all channels),
        [n_bands] float64, low to high frequency. 1 = right variance; >1 = too noisy,
        <1 = too smooth. The last entry is the high-frequency ratio."""
        r = self.empirical_variance(samples) / self.lam
        band = self.band_index(n_bands).expand_as(r)
        total = torch.zeros(n_bands, dtype=torch.float64).index_add_(0, band.reshape(-1), r.reshape(-1))
        count = torch.bincount(band.reshape(-1), minlength=n_bands).to(torch.float64)
        return total / count

    def describe(self) -> str:
        c, s = self.channels, self.image_size
        corr = f", channel correlation {self.channel_corr:g}" if self.channel_corr else ""
        return (
            f"stationary Gaussian {c}x{s}x{s}: mean {self.mean:g}, pixel std {self.std:g}, "
            f"spectrum 1/(f0^2+|f|^2)^{self.power:g} with f0 = {self.f0:.4g} cycles/pixel{corr}"
        )


def gaussian_score_model(image_size: int = 32, channels: int = 3, device="cpu", **kwargs) -> ScoreModel:
    """The analytic model as a `ScoreModel` (name "gaussian"); kwargs go to GaussianImageModel."""
    model = GaussianImageModel(image_size, channels, device=device, **kwargs)
    info = {
        "backend": "analytic",
        "precision": "fp32",
        "description": model.describe(),
        "std": model.std,
        "power": model.power,
        "f0": model.f0,
        "channel_corr": model.channel_corr,
    }
    return ScoreModel(score=model.score, settings=model.settings, name="gaussian", device=model.device, info=info)

