"""The analytic Gaussian model against dense linear algebra built independently of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pdscli.evaluate.analytic import GaussianImageModel, gaussian_score_model
from pdscli.errors import PdsError

SIZE, CH, RHO, STD, POWER = 6, 2, 0.3, 0.2, 1.2


def dense_covariance(size=SIZE, channels=CH, rho=RHO, std=STD, power=POWER):
    """Sigma = K (x) Circ, written out: Circ[p, q] = c(p - q), c = inverse DFT of the spectrum."""
    f = np.fft.fftfreq(size)
    spectrum = 1.0 / ((1.0 / size) ** 2 + f[:, None] ** 2 + f[None, :] ** 2) ** power
    spectrum *= std**2 / spectrum.mean()
    c = np.real(np.fft.ifft2(spectrum))
    idx = np.arange(size)
    di = (idx[:, None, None, None] - idx[None, None, :, None]) % size
    dj = (idx[None, :, None, None] - idx[None, None, None, :]) % size
    circ = c[di, dj].reshape(size * size, size * size)
    k = np.full((channels, channels), rho)
    np.fill_diagonal(k, 1.0)
    return np.kron(k, circ)


def _matrix_power(sym, p):
    w, v = np.linalg.eigh(sym)
    return (v * w**p) @ v.T


@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(SIZE, CH, std=STD, power=POWER, channel_corr=RHO)


@pytest.fixture(scope="module")
def cov():
    return dense_covariance()


def _flat(x):
    return x.double().reshape(x.shape[0], -1).numpy()


def test_score_is_exact(model, cov):
    g = torch.Generator().manual_seed(0)
    x = 0.5 + torch.randn((3, CH, SIZE, SIZE), generator=g)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    got = model.score(x, sigma)
    assert got.dtype == torch.float32 and got.shape == x.shape
    for b in range(3):
        want = -np.linalg.solve(cov + sigma[b].item() ** 2 * np.eye(len(cov)), _flat(x - 0.5)[b])
        np.testing.assert_allclose(_flat(got)[b], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_samples_have_the_covariance(model, cov):
    g = torch.Generator().manual_seed(1)
    x = _flat(model.sample(20000, g))
    assert abs(x.mean() - 0.5) < 0.01
    emp = np.cov(x, rowvar=False)
    assert np.abs(emp - cov).max() < 0.05 * np.abs(cov).max()
    assert math.sqrt(np.diag(cov).mean()) == pytest.approx(STD)


def test_ode_solution_is_the_dense_map(model, cov):
    g = torch.Generator().manual_seed(2)
    x = 0.5 + 3 * torch.randn((2, CH, SIZE, SIZE), generator=g)
    eye = np.eye(len(cov))
    got = model.ode_solution(x, 3.0, torch.tensor([0.1, 1.0]))
    for b, s_to in enumerate([0.1, 1.0]):
        a = _matrix_power(cov + s_to**2 * eye, 0.5) @ _matrix_power(cov + 9.0 * eye, -0.5)
        want = a @ _flat(x - 0.5)[b] + 0.5
        np.testing.assert_allclose(_flat(got)[b], want, rtol=1e-4, atol=1e-5)


def test_ode_solution_solves_the_probability_flow(model):
    """dx/dsigma = -sigma * score(x, sigma) along the map, and maps compose."""
    g = torch.Generator().manual_seed(3)
    x0 = 0.5 + 2 * torch.randn((2, CH, SIZE, SIZE), generator=g, dtype=torch.float32)
    s, h = 1.5, 1e-2
    forward, backward = model.ode_solution(x0, s, s + h), model.ode_solution(x0, s, s - h)
    derivative = (forward - backward) / (2 * h)
    want = -s * model.score(x0, torch.full((2,), s))
    torch.testing.assert_close(derivative, want, rtol=2e-3, atol=2e-3)
    composed = model.ode_solution(model.ode_solution(x0, 5.0, 0.7), 0.7, 0.02)
    torch.testing.assert_close(composed, model.ode_solution(x0, 5.0, 0.02), rtol=1e-4, atol=1e-5)


def test_variance_and_measures():
    model = GaussianImageModel(16, 1)
    g = torch.Generator().manual_seed(4)
    n = 2000
    x = model.sample(n, g)
    # Exact samples: KL at the estimation floor ~ 1/(4n), every band ratio ~ 1.
    assert model.spectral_kl(x) < 2 / (4 * n)
    torch.testing.assert_close(model.variance_ratio_by_band(x), torch.ones(4, dtype=torch.float64), rtol=0, atol=0.05)
    # Noised samples have variance(sigma) = lam + sigma^2.
    noisy = x + 0.1 * torch.randn(x.shape, generator=g)
    ratio = model.empirical_variance(noisy) / model.variance(0.1)
    assert float((ratio.mean() - 1).abs()) < 0.01
    # Too wide by 1.2 about the mean: variance x1.44 in every band, KL = (1.44 - 1 - ln 1.44) / 2.
    wide = 0.5 + 1.2 * (x - 0.5)
    torch.testing.assert_close(model.variance_ratio_by_band(wide), torch.full((4,), 1.44, dtype=torch.float64), rtol=0, atol=0.08)
    assert model.spectral_kl(wide) == pytest.approx(0.5 * (0.44 - math.log(1.44)), rel=0.15)
    # Blurred: the top band loses variance, the bottom one keeps it.
    blurred = (x + torch.roll(x, 1, -1) + torch.roll(x, 1, -2) + torch.roll(x, (1, 1), (-2, -1))) / 4
    bands = model.variance_ratio_by_band(blurred)
    assert bands[0] > 0.85 and bands[-1] < 0.5


def test_band_index():
    model = GaussianImageModel(16, 1)
    band = model.band_index(4)
    assert band[0, 0] == 0 and band[8, 8] == 3  # DC; the corner (0.5, 0.5) cycles/pixel
    assert set(band.unique().tolist()) == {0, 1, 2, 3}


def test_settings_and_score_model():
    model = GaussianImageModel()
    s = model.settings
    assert (s.sigma_min, s.sigma_max, s.num_scales, s.snr) == (0.01, 378.0 * 32 / 64, 2000, 0.075)
    assert s.shape == (3, 32, 32)
    assert GaussianImageModel(64, 1).settings.sigma_max == 378.0
    sm = gaussian_score_model(image_size=16, channels=1, num_scales=100)
    assert sm.name == "gaussian" and sm.settings.num_scales == 100 and sm.settings.shape == (1, 16, 16)
    out = sm.score(torch.rand(2, 1, 16, 16), torch.tensor([1.0, 2.0]))
    assert out.shape == (2, 1, 16, 16) and out.dtype == torch.float32


def test_errors():
    model = GaussianImageModel(8, 1)
    with pytest.raises(PdsError, match="makes 1x8x8 images"):
        model.score(torch.zeros(1, 3, 8, 8), torch.ones(1))
    with pytest.raises(PdsError, match="channel_corr"):
        GaussianImageModel(8, 3, channel_corr=1.0)
    with pytest.raises(PdsError, match="std"):
        GaussianImageModel(8, 3, std=0)
