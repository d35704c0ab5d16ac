"""Accelerated samplers and step grids, checked against the exact analytic model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.samplers import accelerated as A
from pdscli.errors import PdsError
from pdscli.noise import SampleNoise
from pdscli.precondition import Preconditioner
from pdscli.samplers import REGISTRY, get_sampler, nfe_count

from pdscli.samplers.grids import SCHEDULES, edm, geometric, make_steps, steps_from_levels

ACCELERATED = sorted(n for n, s in REGISTRY.items() if not s.pc_grid)
DETERMINISTIC = sorted(n for n, s in REGISTRY.items() if s.deterministic)


@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(16, 1)


def fixed_noise(z):
    """noise() for a deterministic sampler: it draws once, the prior."""
    it = iter([z])
    return lambda: next(it)


def exact_output(model, z):
    """The closed-form ODE solution from sigma_max z to sigma_min, then the same Tweedie denoise."""
    st = model.settings
    x = model.ode_solution(st.sigma_max * z, st.sigma_max, st.sigma_min)
    return x + st.sigma_min**2 * model.score(x, torch.full((len(z),), st.sigma_min))


def rms(a, b) -> float:
    return float((a - b).double().pow(2).mean().sqrt())


# -- coefficients ----------------------------------------------------------------------------


def quad(f, a, b, n=200_001) -> float:
    """Composite Simpson in float64 (a reference for the closed forms)."""
    x = np.linspace(a, b, n)
    y = f(x)
    h = (b - a) / (n - 1)
    return float(h / 3 * (y[0] + y[-1] + 4 * y[1:-1:2].sum() + 2 * y[2:-1:2].sum()))


@pytest.mark.parametrize("sigma", [1e3, 1e4, 50.0, 1.0, 0.05])
def test_multistep_weight_is_float64_exact_at_large_sigma(sigma):
    hi, lo, prev = sigma, sigma / 1.3, sigma * 1.3
    w = A.abar_linear_weight(hi, hi, lo, prev)
    integral = quad(lambda u: 1 / (1 + u * u) - 1 / (1 + hi * hi), hi, lo)
    gap = quad(lambda u: -2 * u / (1 + u * u) ** 2, hi, prev)  # abar(prev) - abar(hi)
    assert math.isfinite(w)
    assert w == pytest.approx(integral / gap, rel=1e-6)
    # For sigma >> 1 (abar ~ 1/sigma^2) the weight tends to sigma (r - 1) r / (r + 1), r = 1.3.
    if sigma >= 1e3:
        assert w == pytest.approx(sigma * 0.3 * 1.3 / 2.3, rel=1e-4)


def test_abar_gap_and_atan_gap_keep_their_digits():
    a, b = 1000.0, 990.0
    exact = (b * b - a * a) / ((1 + a * a) * (1 + b * b))
    assert A.abar_gap(a, b) == pytest.approx(exact, rel=1e-13)
    assert A.atan_gap(b, a) == pytest.approx(math.atan(b) - math.atan(a), rel=1e-9)
    # Why the weights are float64: the naive float32 weight at sigma ~ 1e4 (arctans ~ pi/2 that
    # differ by ~3e-5, minus a term of the same size) is off by ~0.6 %; the float64 one by ~1e-11.
    f = np.float32
    hi, lo, prev = f(1e4), f(1e4 / 1.3), f(1.3e4)
    abar32 = lambda s: f(1) / (f(1) + s * s)  # noqa: E731
    naive = (np.arctan(lo) - np.arctan(hi) - abar32(hi) * (lo - hi)) / (abar32(prev) - abar32(hi))
    w = A.abar_linear_weight(1e4, 1e4, 1e4 / 1.3, 1.3e4)
    assert abs(float(naive) - w) / abs(w) > 1e-3


def test_sde_noise_scales_finite_and_exact():
    for hi, lo in ((1e3, 900.0), (1e4, 9e3), (0.02, 0.01)):
        pre, post = A.sde_noise_scales(hi, lo)
        d = hi * hi - lo * lo
        assert math.isfinite(pre) and math.isfinite(post)
        assert pre == pytest.approx(math.sqrt(d / 2), rel=1e-12)
        assert post == pytest.approx(math.sqrt(d * (1 + lo * lo) / (2 * (1 + hi * hi))), rel=1e-12)


def test_coinciding_nodes_give_nan_and_skip_the_correction():
    assert math.isnan(A.abar_linear_weight(2.0, 2.0, 1.0, 2.0))
    x = torch.zeros(3, 1, 2, 2)
    delta = torch.ones_like(x)
    assert torch.equal(A._add_correction(x, math.nan, delta), x)
    delta[1, 0, 0, 0] = float("nan")  # one sample's correction is broken: only it is skipped
    out = A._add_correction(x, 2.0, delta)
    assert torch.equal(out[1], x[1]) and torch.all(out[0] == 2) and torch.all(out[2] == 2)


# -- grids -----------------------------------------------------------------------------------


def test_geometric_grid(model):
    st = model.settings
    s = geometric(st, 9)
    assert s.sigma[0] == st.sigma_max and s.sigma[-1] == st.sigma_min and s.sigma_max == st.sigma_max
    ratios = s.sigma[1:] / s.sigma[:-1]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-12)
    assert torch.equal(s.sigma_hi, s.sigma)
    assert torch.equal(s.sigma_lo[:-1], s.sigma[1:]) and s.sigma_lo[-1] == 0
    assert s.sigma.dtype == torch.float64


def test_edm_grid(model):
    st = model.settings
    s = edm(st, 12)
    assert s.sigma[0] == st.sigma_max and s.sigma[-1] == st.sigma_min
    root = s.sigma ** (1 / 7)
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(11), rtol=1e-10)
    assert s.sigma_lo[-1] == 0 and bool((s.sigma[1:] < s.sigma[:-1]).all())


def test_make_steps_and_errors(model):
    st = model.settings
    assert set(SCHEDULES) == {"geometric", "edm"}
    assert torch.equal(make_steps("edm", st, 5).sigma, edm(st, 5).sigma)
    with pytest.raises(PdsError, match="--schedule must be one of "):
        make_steps("linear", st, 5)
    with pytest.raises(PdsError, match="at least 2"):
        geometric(st, 1)
    with pytest.raises(PdsError):
        steps_from_levels(torch.tensor([1.0, 2.0]))


# -- the samplers' contract --------------------------------------------------------------------


def test_registered_in_sampling():
    for name in ACCELERATED:
        assert get_sampler(name) is REGISTRY[name].fn
    assert nfe_count("accel-ode", 10) == 10 and nfe_count("accel-ode2", 10) == 19 and nfe_count("ddpm", 7) == 7


@pytest.mark.parametrize("name", ACCELERATED)
def test_last_step_is_tweedie_and_nfe_is_counted(model, name):
    st = model.settings
    steps = geometric(st, 6)
    g = torch.Generator().manual_seed(3)
    seen = []
    calls = []

    def score(x, sigma):
        assert sigma.dtype == torch.float32 and sigma.shape == (x.shape[0],)
        calls.append(1)
        return model.score(x, sigma)

    def callback(info):
        seen.append((info["nfe"], info["x"].clone()))

    out = get_sampler(name)(score, lambda: torch.randn(4, 1, 16, 16, generator=g), steps, callback=callback)
    before = seen[-2][1]
    tweedie = before + st.sigma_min**2 * model.score(before, torch.full((4,), st.sigma_min))
    assert torch.allclose(out, tweedie, atol=1e-6)
    assert torch.equal(out, seen[-1][1])
    assert len(calls) == seen[-1][0] == nfe_count(name, 6)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_refuse_a_preconditioner(model, name):
    pre = Preconditioner(freq_filter=np.ones((1, 16, 16)))
    with pytest.raises(PdsError, match="takes no preconditioner"):
        get_sampler(name)(model.score, lambda: torch.randn(2, 1, 16, 16), geometric(model.settings, 4), precond=pre)


@pytest.mark.parametrize("name", ["ddpm", "accel-sde"])
def test_stochastic_samplers_take_the_preconditioner(model, name):
    steps = geometric(model.settings, 8)

    def run(pre):
        noise = SampleNoise(5, range(3), (1, 16, 16))
        return get_sampler(name)(model.score, noise, steps, precond=pre)

    plain = run(None)
    assert torch.allclose(run(Preconditioner(freq_filter=np.ones((1, 16, 16)))), plain, atol=1e-4)
    strong = Preconditioner(freq_filter=np.full((1, 16, 16), 1.2))
    assert not torch.allclose(run(strong), plain, atol=1e-3)  # M is really used


@pytest.mark.parametrize("name", ["ddpm", "accel-sde", "accel-ode"])
def test_a_sample_never_depends_on_its_batch(model, name):
    steps = geometric(model.settings, 7)
    big = get_sampler(name)(model.score, SampleNoise(9, range(4), (1, 16, 16)), steps)
    small = get_sampler(name)(model.score, SampleNoise(9, [2, 3], (1, 16, 16)), steps)
    assert torch.allclose(big[2:], small, atol=1e-5)


# -- orders of convergence on the exact model ---------------------------------------------------


def slope(ns, errs) -> float:
    return float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


def test_deterministic_orders_against_the_closed_form(model):
    """From the same x_T: ddim is first order, the accelerated forms second order (40-160 steps)."""
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = exact_output(model, z)
    ns = [40, 80, 160]
    errs = {name: [rms(get_sampler(name)(model.score, fixed_noise(z), geometric(model.settings, n)), exact) for n in ns]
            for name in ("ddim", "accel-ode", "accel-ode2")}
    assert -1.15 < slope(ns, errs["ddim"]) < -0.85
    assert slope(ns, errs["accel-ode"]) <= -1.7
    assert slope(ns, errs["accel-ode2"]) <= -1.7
    for i in range(len(ns)):
        assert errs["accel-ode"][i] < 0.5 * errs["ddim"][i]
    # At equal score calls the one-call multistep form beats the two-call one (159 vs 160 calls).
    assert errs["accel-ode"][2] < rms(A.accel_ode2(model.score, fixed_noise(z), geometric(model.settings, 80)), exact)


def test_accel_sde_beats_ddpm_at_few_steps(model):
    """Spectral KL (docs/exactness.md's measure), same step count = same number of score calls.
    Exact values (scripts/exactness_accel.py): ddpm 0.54 / 0.079, accel-sde 0.063 / 0.0026."""
    for n in (10, 20):
        kl = {}
        for name in ("ddpm", "accel-sde"):
            g = torch.Generator().manual_seed(n)
            out = get_sampler(name)(model.score, lambda: torch.randn(256, 1, 16, 16, generator=g), geometric(model.settings, n))
            kl[name] = model.spectral_kl(out)
        assert kl["accel-sde"] < 0.25 * kl["ddpm"], kl
