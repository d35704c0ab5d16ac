"""Filters (statistics, files) and the preconditioner M built from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdscli.errors import PdsError
from pdscli.precondition import (
    Filters,
    Preconditioner,
    StatisticsAccumulator,
    compute_statistics,
    filter_from_statistic,
    load_filters,
    load_reference_npy,
)

SHAPE = (2, 4, 4)


def _images(n=32, shape=SHAPE, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g)
    return (x + torch.roll(x, 1, dims=-1)) / 2  # correlated neighbours: a non-flat spectrum


@pytest.fixture(scope="module")
def filters():
    return compute_statistics([_images()], source="test images")


def _dense(op, shape=SHAPE):
    """The matrix of a linear map on [C, H, W] images, column j = op(e_j), float64."""
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float32).reshape(n, *shape)
    return op(basis).reshape(n, n).T.double()


# -- the operator ---------------------------------------------------------------------------


def test_mmt_is_symmetric_positive_definite_and_equals_m_times_mt(filters):
    precond = Preconditioner.from_filters(filters, alpha=2.0)
    mmt = _dense(precond.grad)
    m = _dense(precond.noise)
    torch.testing.assert_close(mmt, mmt.T, rtol=0, atol=1e-5)
    assert float(torch.linalg.eigvalsh(mmt).min()) > 0
    torch.testing.assert_close(mmt, m @ m.T, rtol=0, atol=1e-5)
    # Not the identity: the filters do something.
    assert float((mmt - torch.eye(len(mmt), dtype=torch.float64)).abs().max()) > 0.1


def test_ones_are_the_identity():
    ones = np.ones(SHAPE)
    precond = Preconditioner(ones, ones)
    x = torch.randn(3, *SHAPE)
    torch.testing.assert_close(precond.grad(x), x, rtol=0, atol=1e-6)
    torch.testing.assert_close(precond.noise(x), x, rtol=0, atol=1e-6)
    # Constant statistics give filter alpha / (1 + alpha - 1) = 1: the identity too.
    flat = Filters(freq=np.full(SHAPE, 3.0), space=np.full(SHAPE, 0.25), size=4, channels=2)
    precond = Preconditioner.from_filters(flat, alpha=5.0)
    torch.testing.assert_close(precond.grad(x), x, rtol=0, atol=1e-6)


def test_noise_has_covariance_mmt(filters):
    precond = Preconditioner.from_filters(filters, alpha=2.0)
    g = torch.Generator().manual_seed(1)
    z = precond.noise(torch.randn((40000, *SHAPE), generator=g)).reshape(40000, -1).double()
    cov = z.T @ z / len(z)
    mmt = _dense(precond.grad)
    assert float((cov - mmt).abs().max()) < 0.05 * float(mmt.abs().max())


def _reference_ops(freq_mask, space_mask):
    """sampling.py of the reference: complex dft2d / idft2d, `.real` at the end."""

    def dft2d(x):
        return torch.fft.fft(torch.fft.fft(x, dim=2), dim=3)

    def idft2d(x):
        return torch.fft.ifft(torch.fft.ifft(x, dim=2), dim=3)

    def grad(g):
        return idft2d(freq_mask * dft2d(space_mask.pow(2) * idft2d(freq_mask * dft2d(g)))).real

    def noise(z):
        return idft2d(dft2d(z * space_mask) * freq_mask).real

    return grad, noise


def test_matches_the_reference_formulas(filters):
    alpha = 5.0
    precond = Preconditioner.from_filters(filters, alpha=alpha)
    freq = torch.from_numpy(filters.freq / filters.freq.max())
    space = torch.from_numpy(filters.space / filters.space.max())
    ref_grad, ref_noise = _reference_ops(((freq + alpha - 1) / alpha).pow(-1), ((space + alpha - 1) / alpha).pow(-1))
    x = torch.randn(5, *SHAPE)
    torch.testing.assert_close(precond.grad(x), ref_grad(x).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(precond.noise(x), ref_noise(x).float(), rtol=0, atol=1e-5)


def test_asymmetric_frequency_filter_is_the_real_part():
    """For a filter with R(k) != R(-k), M z is still the reference's real part exactly."""
    g = torch.Generator().manual_seed(2)
    freq = 1 + torch.rand(SHAPE, generator=g, dtype=torch.float64)
    precond = Preconditioner(freq.numpy(), None)
    _, ref_noise = _reference_ops(freq.float(), torch.ones(1))
    z = torch.randn(4, *SHAPE)
    torch.testing.assert_close(precond.noise(z), ref_noise(z).float(), rtol=0, atol=1e-5)


def test_space_filter_values(filters):
    """noise(1) with only a space filter is S = alpha / (m / max m + alpha - 1)."""
    space_only = Filters(freq=None, space=filters.space, size=4, channels=2)
    s = Preconditioner.from_filters(space_only, alpha=3.0).noise(torch.ones(1, *SHAPE))[0]
    m = filters.space / filters.space.max()
    np.testing.assert_allclose(s.numpy(), 3.0 / (m + 2.0), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_invalid_alpha(filters, alpha):
    with pytest.raises(PdsError, match="alpha must be greater than"):
        Preconditioner.from_filters(filters, alpha=alpha)


def test_alpha_bound_depends_on_the_statistics():
    m = np.array([0.2, 0.5, 1.0])
    # alpha - 1 + min(m)/max(m) must stay positive: alpha > 0.8 here.
    assert filter_from_statistic(m, 0.9).min() == pytest.approx(1.0)
    with pytest.raises(PdsError, match=r"greater than 0\.8 for these"):
        filter_from_statistic(m, 0.8)
    # A statistic reaching 0 (a black pixel) needs alpha > 1.
    with pytest.raises(PdsError, match="greater than 1 "):
        filter_from_statistic(np.array([0.0, 1.0]), 1.0)
    with pytest.raises(PdsError, match="all zero"):
        filter_from_statistic(np.zeros(3), 5.0)


def test_shape_checks(filters):
    precond = Preconditioner.from_filters(filters)
    precond.check_shape(2, 4)
    with pytest.raises(PdsError, match="^filters are 2x4x4 but the model makes 3x32x32 images$"):
        precond.check_shape(3, 32)
    with pytest.raises(PdsError, match="filters are 2x4x4 but the images are 2x8x8"):
        precond.grad(torch.zeros(1, 2, 8, 8))
    with pytest.raises(PdsError, match="differ in shape"):
        Preconditioner(np.ones((2, 4, 4)), np.ones((2, 8, 8)))


# -- statistics -----------------------------------------------------------------------------


def test_statistics_are_the_reference_recipe():
    x = _images(10)
    f = compute_statistics([x])
    expected_freq = np.log(1 + (np.abs(np.fft.fft2(x.double().numpy())) ** 2).mean(axis=0))
    np.testing.assert_allclose(f.freq, expected_freq, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f.space, (x.double().numpy() ** 2).mean(axis=0), rtol=1e-6)
    assert (f.count, f.size, f.channels, f.kinds) == (10, 4, 2, "freq+space")


def test_statistics_stream_in_any_batches():
    x = _images(20)
    whole = compute_statistics([x])
    parts = compute_statistics([x[:3], x[3:4], x[4:17], x[17:]])
    np.testing.assert_allclose(parts.freq, whole.freq, rtol=1e-6)
    np.testing.assert_allclose(parts.space, whole.space, rtol=1e-6)
    single = compute_statistics(list(x))  # [C, H, W] items are batches of one
    np.testing.assert_allclose(single.freq, whole.freq, rtol=1e-6)
    assert parts.count == single.count == 20


def test_statistics_accept_uint8_and_numpy():
    x = (_images(4) * 255).round().to(torch.uint8)
    a = compute_statistics([x])
    b = compute_statistics([x.numpy().astype(np.float32) / 255])
    np.testing.assert_allclose(a.freq, b.freq, rtol=1e-5, atol=1e-6)


def test_statistics_errors():
    with pytest.raises(PdsError, match="no images"):
        compute_statistics([])
    with pytest.raises(PdsError, match=r"\[0, 1\]"):
        compute_statistics([torch.full((1, *SHAPE), 2.0)])
    with pytest.raises(PdsError, match="different shapes"):
        compute_statistics([torch.zeros(1, *SHAPE), torch.zeros(1, 3, 4, 4)])
    acc = StatisticsAccumulator(space=False)
    acc.add(_images(2))
    assert acc.result().space is None and acc.result().kinds == "freq"


# -- files ----------------------------------------------------------------------------------


def test_save_and_load(tmp_path, filters):
    path = filters.save(tmp_path / "f.npz")
    back = load_filters(path)
    np.testing.assert_array_equal(back.freq, filters.freq)
    np.testing.assert_array_equal(back.space, filters.space)
    assert (back.size, back.channels, back.count, back.source) == (4, 2, 32, "test images")
    freq_only = Filters(filters.freq, None, size=4, channels=2, count=0)
    assert load_filters(freq_only.save(tmp_path / "g.npz")).space is None
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_load_filters_errors(tmp_path):
    with pytest.raises(PdsError, match="not found"):
        load_filters(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PdsError, match="not a .npz"):
        load_filters(tmp_path / "junk.npz")
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(PdsError, match="no freq or space"):
        load_filters(tmp_path / "empty.npz")


def test_filters_validation():
    with pytest.raises(PdsError, match="both are missing"):
        Filters(None, None, size=4, channels=2)
    with pytest.raises(PdsError, match="shaped 2x4x4, expected 3x4x4"):
        Filters(np.ones((2, 4, 4)), None, size=4, channels=3)
    with pytest.raises(PdsError, match="NaN"):
        Filters(np.full((2, 4, 4), np.nan), None, size=4, channels=2)


def test_reference_npy(tmp_path, filters):
    # The reference saves [C, H, W]; it reshapes whatever it loads, so a flat file works too.
    np.save(tmp_path / "freq_mask.npy", filters.freq)
    np.save(tmp_path / "space_mask.npy", filters.space.reshape(-1))
    f = load_reference_npy(tmp_path / "freq_mask.npy", tmp_path / "space_mask.npy", channels=2, size=4)
    np.testing.assert_array_equal(f.freq, filters.freq)
    np.testing.assert_array_equal(f.space, filters.space)
    only = load_reference_npy(space_path=tmp_path / "space_mask.npy", channels=2, size=4)
    assert only.freq is None and only.kinds == "space"
    with pytest.raises(PdsError, match="has 32 values but a 3x4x4 image needs 48"):
        load_reference_npy(tmp_path / "freq_mask.npy", channels=3, size=4)
    with pytest.raises(PdsError, match="not found"):
        load_reference_npy(tmp_path / "nope.npy", channels=2, size=4)
