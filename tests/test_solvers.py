"""DPM-Solver++, EDM and Euler ancestral samplers; NFE budgets; the exact-spectrum measure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pdscli.errors import PdsError
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.moments import exact_spectral_kl
from pdscli.noise import SampleNoise
from pdscli.precondition import Preconditioner
from pdscli.samplers import REGISTRY, nfe_count
from pdscli.samplers.plan import plan
from pdscli.samplers.grids import SCHEDULES, geometric, make_steps
from pdscli.samplers.plan import steps_for_nfe

NEW = ["dpm++2m", "dpm++3m", "dpm++2m-sde", "dpm++3m-sde", "heun", "edm-sde", "euler-a", "dpm++2m-sde-mid", "ipndm",
       "ipndm-v", "gradient-estimation", "res-multistep"]
LINEAR = sorted(n for n, s in REGISTRY.items() if not s.pc_grid)  # per-sample, linear in the draws


@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(16, 1)


def counted(score):
    calls = []

    def wrapped(x, sigma):
        calls.append(1)
        return score(x, sigma)

    return wrapped, calls


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("n", [2, 5])
def test_nfe_is_exact_for_every_sampler(model, name, n):
    info, run = REGISTRY[name], plan(name, settings=model.settings, steps=n)
    score, calls = counted(model.score)
    seen = []
    info.fn(score, SampleNoise(1, range(2), (1, 16, 16)), run.steps, callback=lambda i: seen.append(i["nfe"]))
    assert len(calls) == run.nfe == info.nfe(n) == nfe_count(name, n)
    assert seen[-1] == len(calls) and len(seen) == n
    assert seen == sorted(seen)  # the count only grows


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("budget", [10, 20, 35, 50])
def test_steps_for_nfe_takes_the_most_steps_that_fit(name, budget):
    n = steps_for_nfe(name, budget)
    assert nfe_count(name, n) <= budget < nfe_count(name, n + 1)


def test_steps_for_nfe_refuses_a_budget_below_the_fewest_steps():
    with pytest.raises(PdsError, match="too small"):
        steps_for_nfe("heun", 2)  # 2 steps = 3 calls
    assert steps_for_nfe("heun", 3) == 2 and steps_for_nfe("pc", 3) == 1


def test_every_sampler_has_a_known_default_grid():
    for name, info in REGISTRY.items():
        assert info.grid == "pc" if info.pc_grid else info.grid in SCHEDULES, name


# -- orders on the exact probability-flow ODE --------------------------------------------------


def exact_output(model, z):
    """The closed-form ODE map sigma_max z -> sigma_min, then the Tweedie denoise every sampler ends with."""
    st = model.settings
    x = model.ode_solution(st.sigma_max * z, st.sigma_max, st.sigma_min)
    return x + st.sigma_min**2 * model.score(x, torch.full((len(z),), st.sigma_min))


def slope(ns, errs) -> float:
    return float(np.polyfit(np.log(ns), np.log(errs), 1)[0])


@pytest.mark.parametrize("name,low,high", [("dpm++2m", -2.3, -1.8), ("heun", -2.4, -1.8), ("dpm++3m", -4.0, -2.7),
                                           ("res-multistep", -2.3, -1.8)])
def test_order_on_the_exact_ode(model, name, low, high):
    """Log-log slope of the error against the closed form over 20-160 steps, same x_T."""
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = exact_output(model, z)
    ns = [20, 40, 80, 160]
    errs = []
    for n in ns:
        out = REGISTRY[name].fn(model.score, iter([z]).__next__, geometric(model.settings, n))
        errs.append(float((out - exact).double().pow(2).mean().sqrt()))
    assert low < slope(ns, errs) < high, errs


def test_3m_beats_2m_and_2m_beats_ddim_at_equal_calls(model):
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    exact = exact_output(model, z)

    def err(name, n):
        out = REGISTRY[name].fn(model.score, iter([z]).__next__, geometric(model.settings, n))
        return float((out - exact).double().pow(2).mean().sqrt())

    assert err("dpm++3m", 40) < err("dpm++2m", 40) < err("accel-ode", 40) < err("ddim", 40)


def test_res_multistep_is_2m_with_another_correction(model):
    """res-multistep and dpm++2m share the first step and differ in the correction (phi2 against the
    midpoint's (1 - e^-h) / 2): other outputs, of the same accuracy to within a small factor."""
    z = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    exact = exact_output(model, z)
    out = {name: REGISTRY[name].fn(model.score, iter([z]).__next__, geometric(model.settings, 40))
           for name in ("res-multistep", "dpm++2m")}
    err = {name: float((x - exact).double().pow(2).mean().sqrt()) for name, x in out.items()}
    assert (out["res-multistep"] - out["dpm++2m"]).abs().max() > 1e-4
    assert 1 / 3 < err["res-multistep"] / err["dpm++2m"] < 3, err


# -- the contract ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dpm++2m-sde", "dpm++3m-sde", "edm-sde", "euler-a", "dpm++2m-sde-mid", "ipndm", "ipndm-v",
                                  "gradient-estimation", "res-multistep"])
def test_new_samplers_refuse_a_preconditioner(model, name):
    pre = Preconditioner(freq_filter=np.ones((1, 16, 16)))
    with pytest.raises(PdsError, match="no preconditioner"):
        REGISTRY[name].fn(model.score, lambda: torch.randn(2, 1, 16, 16), geometric(model.settings, 4), precond=pre)


@pytest.mark.parametrize("name", NEW)
def test_new_samplers_never_couple_a_batch(model, name):
    steps = geometric(model.settings, 7)
    big = REGISTRY[name].fn(model.score, SampleNoise(9, range(4), (1, 16, 16)), steps)
    small = REGISTRY[name].fn(model.score, SampleNoise(9, [2, 3], (1, 16, 16)), steps)
    assert torch.allclose(big[2:], small, atol=1e-5)


@pytest.mark.parametrize("name", ["dpm++2m-sde", "edm-sde", "euler-a", "accel-sde", "dpm++3m"])
def test_exact_spectral_kl_matches_monte_carlo(model, name):
    """The impulse-response measure agrees with the empirical KL of many samples."""
    fn, steps = REGISTRY[name].fn, make_steps("geometric", model.settings, 10)
    exact = exact_spectral_kl(model, fn, steps)
    g = torch.Generator().manual_seed(2)
    batch = 2048
    mc = model.spectral_kl(fn(model.score, lambda: torch.randn(batch, 1, 16, 16, generator=g), steps))
    assert abs(mc - exact) < 0.1 * exact + 2 / (4 * batch), (mc, exact)


def test_the_sde_variants_beat_euler_ancestral_at_few_steps(model):
    steps = geometric(model.settings, 20)
    kl = {name: exact_spectral_kl(model, REGISTRY[name].fn, steps) for name in ("dpm++2m-sde", "euler-a")}
    assert kl["dpm++2m-sde"] < 0.5 * kl["euler-a"], kl
