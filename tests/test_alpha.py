"""`--alpha auto`: the rule, its exact yardstick, and PDS never worse than vanilla on the exact model."""

from __future__ import annotations

import math

import pytest
import torch

from pdscli.precondition import alpha as AL
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.errors import PdsError
from pdscli.precondition import Filters, Preconditioner, compute_statistics
from pdscli.samplers import pc_steps, pds


@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(16, 1)


@pytest.fixture(scope="module")
def cifar_like():
    return GaussianImageModel(16, 1, sigma_max=50.0, snr=0.16, num_scales=1000)


def auto(m, n):
    st = m.settings
    return AL.auto_alpha(n, st.num_scales, sigma_min=st.sigma_min, sigma_max=st.sigma_max)


# -- the rule ----------------------------------------------------------------------------------


def test_auto_alpha_shape(model):
    values = [auto(model, n) for n in (5, 10, 20, 30, 50, 100, 200, 400, 2000)]
    assert values == sorted(values)  # fewer steps -> stronger preconditioning
    assert values[0] == values[1] == AL.ALPHA_MIN == AL.ALPHA_REFERENCE
    assert values[-1] == values[-2] == AL.ALPHA_MAX  # off at many steps
    assert 5 < auto(model, 50) < 20 and 15 < auto(model, 100) < 40
    # num_scales does not enter (the optimum follows the step count, not the speed-up)
    assert AL.auto_alpha(50, 1000) == AL.auto_alpha(50, 2000) == AL.auto_alpha(50)


def test_auto_alpha_rejects_nonsense():
    with pytest.raises(PdsError):
        AL.auto_alpha(0, 2000)
    with pytest.raises(PdsError):
        AL.auto_alpha(10, 2000, sigma_min=1.0, sigma_max=0.5)


def test_resolve_alpha(model):
    st = model.settings
    assert AL.resolve_alpha("auto", st, 50) == auto(model, 50)
    assert AL.resolve_alpha(" AUTO ", st, 50) == auto(model, 50)
    assert AL.resolve_alpha("5", st, 50) == 5.0 and AL.resolve_alpha(7.5, st, 50) == 7.5
    for bad in ("five", "-1", "nan", "inf", None):
        with pytest.raises(PdsError, match="--alpha"):
            AL.resolve_alpha(bad, st, 50)


def test_alpha_max_is_vanilla(model):
    # "off" must really be off: the filter at ALPHA_MAX is 1 to float32 rounding.
    p = AL.squared_filter(AL.expected_freq_statistic(model), AL.ALPHA_MAX)
    assert float((p - 1).abs().max()) < 1e-5


# -- the exact yardstick agrees with the sampler --------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 5.0])
def test_recursion_matches_the_sampler(model, alpha):
    """pc_spectral_kl (no sampling) vs the spectral KL of `pds` samples at 20 steps."""
    stat = AL.expected_freq_statistic(model)
    pre = None if alpha is None else Preconditioner.from_filters(Filters(freq=stat, space=None, size=16, channels=1), alpha)
    g = torch.Generator().manual_seed(11)
    batch = 384
    x = pds(model.score, lambda: torch.randn(batch, 1, 16, 16, generator=g), pc_steps(model.settings, 20), precond=pre, snr=model.settings.snr)
    mc, exact = model.spectral_kl(x), AL.pc_spectral_kl(model, 20, alpha)
    # MC adds its own positive floor of about 1/(4 batch) and some scatter.
    assert abs(mc - exact) < 0.15 * exact + 2.5 / (4 * batch), (mc, exact)


# -- never worse than vanilla -----------------------------------------------------------------------


STEP_COUNTS = (10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 400, 600, 1000)


@pytest.mark.parametrize("which", ["model", "cifar_like"])
def test_auto_never_worse_than_vanilla_exactly(request, which):
    m = request.getfixturevalue(which)
    for n in STEP_COUNTS:
        van, a = AL.pc_spectral_kl(m, n, None), auto(m, n)
        assert AL.pc_spectral_kl(m, n, a) <= van * (1 + 1e-3), n
        # ... with a margin: still so with alpha halved (filters from other data, another size)
        assert AL.pc_spectral_kl(m, n, max(AL.ALPHA_MIN, a / 2)) <= van * (1 + 1e-3), n


def test_fixed_reference_alpha_is_worse_than_vanilla_at_many_steps(model):
    """Why auto exists: alpha = 5 loses to vanilla from ~100 steps on; auto does not."""
    for n in (100, 200):
        van = AL.pc_spectral_kl(model, n, None)
        assert AL.pc_spectral_kl(model, n, AL.ALPHA_REFERENCE) > 2 * van
        assert AL.pc_spectral_kl(model, n, auto(model, n)) < van


@pytest.fixture(scope="module")
def estimated_filters(model):
    """Filter statistics from exact samples (clamped to [0, 1]: the Gaussian's tails leave it)."""
    g = torch.Generator().manual_seed(5)
    return compute_statistics((model.sample(512, g).clamp(0, 1) for _ in range(4)), freq=True, space=False)


@pytest.mark.parametrize("n", [20, 50])
def test_auto_beats_vanilla_by_sampling(model, estimated_filters, n):
    """The real sampler with filters estimated from exact samples, the same noise for both."""
    batch = 256
    kl = {}
    for label, alpha in (("vanilla", None), ("auto", auto(model, n))):
        pre = None if alpha is None else Preconditioner.from_filters(estimated_filters, alpha)
        g = torch.Generator().manual_seed(n)
        x = pds(model.score, lambda: torch.randn(batch, 1, 16, 16, generator=g), pc_steps(model.settings, n), precond=pre, snr=model.settings.snr)
        kl[label] = model.spectral_kl(x)
    assert kl["auto"] < 0.5 * kl["vanilla"], kl
    assert math.isfinite(kl["auto"])
