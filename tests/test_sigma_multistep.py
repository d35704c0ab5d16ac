"""iPNDM, iPNDM-v and gradient estimation (pdscli.samplers.sigma_multistep): weights, orders on the
exact probability-flow ODE of the Gaussian model, and the contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.noise import SampleNoise
from pdscli.samplers import REGISTRY
from pdscli.samplers.grids import edm, geometric, steps_from_levels
from pdscli.samplers.sigma_multistep import adams_weights, uniform_weights, variable_weights



@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(16, 1)


def test_uniform_weights_are_the_adams_bashforth_constants():
    expected = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    for order, weights in expected.items():
        assert np.allclose(uniform_weights(order), weights, atol=1e-13)


def test_variable_weights_integrate_cubics_exactly_on_uneven_nodes():
    nodes = (0.0, -0.7, -1.9, -2.4)
    weights = adams_weights(nodes)
    for p in (np.polynomial.Polynomial([1.0]), np.polynomial.Polynomial([0.3, -2.0, 0.5, 1.7])):
        exact = p.integ()(1.0) - p.integ()(0.0)
        assert abs(sum(w * p(u) for w, u in zip(weights, nodes)) - exact) < 1e-12
    cubic = np.polynomial.Polynomial([0, 0, 0, 0, 1.0])  # degree 4: not exact with 4 nodes
    assert abs(sum(w * cubic(u) for w, u in zip(weights, nodes)) - 0.2) > 1e-3


def exact_output(model, z):
    st = model.settings
    x = model.ode_solution(st.sigma_max * z, st.sigma_max, st.sigma_min)
    return x + st.sigma_min**2 * model.score(x, torch.full((len(z),), st.sigma_min))


def errors(model, name, ns, grid=geometric):
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = exact_output(model, z)
    return [float((REGISTRY[name].fn(model.score, iter([z]).__next__, grid(model.settings, n)) - exact)
                  .double().pow(2).mean().sqrt()) for n in ns]


@pytest.mark.parametrize("name,grid,low,high", [
    ("ipndm", geometric, -2.4, -1.8), ("ipndm-v", geometric, -2.3, -1.7), ("gradient-estimation", geometric, -1.2, -0.6),
    ("ipndm-v", edm, -2.2, -1.4),  # consistent on a grid of varying step ratio too
])
def test_order_on_the_exact_ode(model, name, grid, low, high):
    """Log-log slope of the error against the closed form over 20-160 steps."""
    ns = [20, 40, 80, 160]
    errs = errors(model, name, ns, grid)
    assert low < float(np.polyfit(np.log(ns), np.log(errs), 1)[0]) < high, errs


def test_variable_weights_are_consistent_and_equal_steps_give_the_constants():
    for h in [(-1.0, -2.0), (-0.3, -0.5, -0.9), (-0.3, -0.5, -0.9, -1.4), (-2.0, -1.0, -0.7, -0.2)]:
        assert abs(sum(variable_weights(h)) - 1.0) < 1e-12, h  # a constant slope is integrated exactly
    for order in (1, 2, 3):
        assert np.allclose(variable_weights((-0.7,) * order), uniform_weights(order), atol=1e-12)
    # Zhou et al.'s fourth-order term on equal steps: 11/24 of the third backward difference (AB4: 3/8)
    gap = np.subtract(variable_weights((-0.7,) * 4), uniform_weights(4))
    assert np.allclose(gap, (11 / 24 - 3 / 8) * np.array([1, -3, 3, -1]), atol=1e-12)
    # second order: exact for a slope linear in sigma on any steps
    h = (-0.3, -0.5, -0.9, -1.4)
    nodes = np.concatenate([[0.0], -np.cumsum(h[1:])])  # sigma of the slopes relative to this one
    slope = 2.0 + 3.0 * nodes
    assert abs(np.dot(variable_weights(h), slope) * h[0] - (2.0 * h[0] + 1.5 * h[0] ** 2)) < 1e-12


def test_ipndm_and_ipndm_v_agree_on_equal_steps_up_to_third_order_and_differ_on_uneven_ones(model):
    st = model.settings
    z = lambda: torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    even = steps_from_levels(torch.linspace(st.sigma_max, st.sigma_min, 4, dtype=torch.float64))  # orders 1-3
    assert torch.allclose(REGISTRY["ipndm"].fn(model.score, z, even), REGISTRY["ipndm-v"].fn(model.score, z, even), atol=1e-5)
    uneven = geometric(st, 9)
    assert not torch.allclose(REGISTRY["ipndm"].fn(model.score, z, uneven), REGISTRY["ipndm-v"].fn(model.score, z, uneven), atol=1e-3)


def test_ipndm_v_beats_ipndm_at_fifteen_and_ipndm_beats_2m_at_five(model):
    from pdscli.evaluate.moments import exact_spectral_kl

    kl = lambda name, n: exact_spectral_kl(model, REGISTRY[name].fn, geometric(model.settings, n))
    assert kl("ipndm-v", 15) < kl("ipndm", 15)
    assert kl("ipndm", 5) < kl("dpm++2m", 5)


# -- DPM-Solver++(2M) SDE, midpoint form (pdscli.samplers.dpm) -----------------------------------


def test_2m_sde_midpoint_differs_from_the_exact_form_only_by_the_correction(model):
    noise = lambda: SampleNoise(3, range(3), (1, 16, 16))
    two = geometric(model.settings, 2)  # a first-order step and the denoise: no correction term
    assert torch.equal(REGISTRY["dpm++2m-sde-mid"].fn(model.score, noise(), two), REGISTRY["dpm++2m-sde"].fn(model.score, noise(), two))
    five = geometric(model.settings, 5)
    assert not torch.allclose(REGISTRY["dpm++2m-sde-mid"].fn(model.score, noise(), five),
                              REGISTRY["dpm++2m-sde"].fn(model.score, noise(), five), atol=1e-4)


def test_2m_sde_midpoint_converges_in_distribution(model):
    from pdscli.evaluate.moments import exact_spectral_kl

    fn = REGISTRY["dpm++2m-sde-mid"].fn
    kl = [exact_spectral_kl(model, fn, geometric(model.settings, n)) for n in (5, 20, 80)]
    assert kl[0] > kl[1] > kl[2], kl
