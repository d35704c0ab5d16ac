"""`--alpha auto`: the calibrated tables, their exact yardstick, and PDS never worse than vanilla on the exact model."""

from __future__ import annotations

import math

import pytest
import torch

from pdscli import flag_rules
from pdscli.errors import PdsError
from pdscli.evaluate import moments as M
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.precondition import Filters, Preconditioner, compute_statistics
from pdscli.precondition import alpha as AL
from pdscli.samplers import get_sampler, pc_steps, sampler_kwargs
from pdscli.samplers.plan import plan
from pdscli.samplers.pc import pds

# The step counts the samplers issue names; the exact models: its own (3x32x32, sigma 0.01-189,
# snr 0.075), the CIFAR-10 settings, the built-in digits' sigma range, FFHQ-1024's.
ISSUE_STEPS = (2, 3, 5, 10, 17, 20, 30, 50, 100, 200, 1000)
EXACT_MODELS = {
    "issue 3x32x32": lambda: GaussianImageModel(32, 3),
    "cifar-like": lambda: GaussianImageModel(16, 1, sigma_max=50.0, snr=0.16, num_scales=1000),
    "digits-range": lambda: GaussianImageModel(16, 1, sigma_max=8.6, snr=0.16, num_scales=1000),
    "ffhq1024-range": lambda: GaussianImageModel(16, 1, sigma_max=1348.0, snr=0.15),
}


@pytest.fixture(scope="module", params=list(EXACT_MODELS))
def exact(request):
    model = EXACT_MODELS[request.param]()
    return M.reduce_model(model), model


@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(16, 1)


def auto(m, n, sampler="pds"):
    st = m.settings
    return AL.auto_alpha(n, st.num_scales, sigma_min=st.sigma_min, sigma_max=st.sigma_max, sampler=sampler)


def kl(m, sampler, n, alpha):
    return M.recursion_spectral_kl(m, sampler, n, None if alpha >= AL.ALPHA_MAX else alpha)


# -- never worse than vanilla, with a margin from the cliff -------------------------------------


@pytest.mark.parametrize("sampler", ["pds", "predictor", "ddpm", "accel-sde"])
def test_auto_never_worse_than_vanilla_exactly(exact, sampler):
    """The issue's requirement: at 2 ... 1000 steps, KL(auto) <= KL(vanilla) on the exact model
    (population KL from the second-moment recursion), and still so with the filter's excess
    1 / (alpha - 1) doubled: the margin from the divergence cliff."""
    reduced, _ = exact
    for n in ISSUE_STEPS:
        van = M.recursion_spectral_kl(reduced, sampler, n, None)
        a = auto(reduced, n, sampler)
        assert kl(reduced, sampler, n, a) <= van * (1 + 1e-3), (sampler, n, a)
        if a < AL.ALPHA_MAX:
            stronger = 1 + (a - 1) / 2  # twice the excess
            assert M.recursion_spectral_kl(reduced, sampler, n, stronger) <= van * (1 + 1e-3), (sampler, n, a)


def test_auto_gains_where_the_filter_can(exact):
    """Not just 'off everywhere': on the exact models PDS with auto clearly beats vanilla at 3-30 steps."""
    reduced, _ = exact
    for n in (3, 10, 17, 20, 30):
        assert kl(reduced, "pds", n, auto(reduced, n)) < 0.8 * M.recursion_spectral_kl(reduced, "pds", n, None), n


def test_the_fixed_reference_alpha_loses_where_auto_does_not():
    """Why auto exists (the samplers issue's figures): on its exact model alpha = 5 diverges at 5
    steps (KL ~1.8e3 against vanilla's ~21) and loses from ~100 steps; auto never loses."""
    reduced = M.reduce_model(GaussianImageModel(32, 3))
    van5 = M.pc_spectral_kl(reduced, 5, None)
    assert M.pc_spectral_kl(reduced, 5, AL.ALPHA_REFERENCE) > 50 * van5
    assert M.pc_spectral_kl(reduced, 5, auto(reduced, 5)) < van5
    for n in (100, 200):
        van = M.pc_spectral_kl(reduced, n, None)
        assert M.pc_spectral_kl(reduced, n, AL.ALPHA_REFERENCE) > 2 * van
        assert kl(reduced, "pds", n, auto(reduced, n)) <= van


def test_every_step_count_up_to_2000():
    """Calibrated for every step count from 2 to 2000: a dense sweep on the issue's model."""
    reduced = M.reduce_model(GaussianImageModel(32, 3))
    for n in list(range(2, 41)) + [45, 60, 75, 90, 120, 150, 250, 300, 400, 600, 2000]:
        assert kl(reduced, "pds", n, auto(reduced, n)) <= M.pc_spectral_kl(reduced, n, None) * (1 + 1e-3), n


# -- the rule and the choice a run makes ---------------------------------------------------------


def test_auto_alpha_shape(model):
    assert auto(model, 2) == AL.ALPHA_MAX  # no alpha helps at 2 steps
    assert auto(model, 5) > 10  # weak where alpha 5 diverges
    assert 3 < auto(model, 20) < 10  # strong where the optimum is (~3), but off the cliff
    assert auto(model, 1000) == auto(model, 2000) == AL.ALPHA_MAX  # vanilla is as exact there
    # num_scales does not enter (the optimum follows the step in log sigma, not the speed-up)
    assert AL.auto_alpha(50, 1000) == AL.auto_alpha(50, 2000) == AL.auto_alpha(50)
    # ... and the step in log sigma is what it follows: the same h, the same alpha
    h_same = AL.auto_alpha(21, sigma_min=0.01, sigma_max=100.0), AL.auto_alpha(41, sigma_min=0.01, sigma_max=1e6)
    assert h_same[0] == pytest.approx(h_same[1])


def test_tables_are_well_formed():
    for name, table in AL.AUTO_TABLES.items():
        hs = [h for h, _ in table]
        assert hs == sorted(hs) and len(hs) >= 5, name
        assert all(e >= 0 and (e == 0 or 1 + 1 / e < AL.ALPHA_MAX) for _, e in table), name


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
    assert AL.resolve_alpha(None, st, 50) == AL.ALPHA_REFERENCE
    for bad in ("five", "-1", "nan", "inf"):
        with pytest.raises(PdsError, match="--alpha"):
            AL.resolve_alpha(bad, st, 50)
        with pytest.raises(PdsError, match="--alpha must be a positive number or auto, not"):
            flag_rules.alpha(bad)


def test_choose_alpha_switches_off_and_says_why(model):
    st = model.settings
    off = AL.choose_alpha("auto", st, 2)
    assert off.off and off.alpha is None and "filter off" in off.note and "2 steps" in off.note
    many = AL.choose_alpha("auto", st, 1000)
    assert many.off and "vanilla is already as exact" in many.note
    on = AL.choose_alpha("auto", st, 20)
    assert not on.off and on.alpha == auto(model, 20) and on.note is None
    fixed = AL.choose_alpha("5", st, 2)  # a number is the user's: used as given
    assert fixed.alpha == 5.0 and not fixed.off


def test_default_alpha_per_sampler(model):
    """Unset --alpha: the reference's 5 for the PC family, auto for ddpm / accel-sde (filters off
    where they hurt)."""
    st = model.settings
    assert AL.choose_alpha(None, st, 20, "pds").alpha == AL.ALPHA_REFERENCE
    for sampler in ("ddpm", "accel-sde"):
        assert AL.default_alpha_flag(sampler) == "auto"
        choice = AL.choose_alpha(None, st, 200, sampler)
        assert choice.given == "auto"
        assert choice.off or choice.alpha == auto(model, 200, sampler)


def test_one_default_alpha_everywhere():
    from pdscli.bench.config import BenchConfig
    from pdscli.models import builtin
    from pdscli.sample.setup import SampleFlags

    assert builtin.DEFAULT_ALPHA == AL.ALPHA_REFERENCE == 5.0
    assert AL.default_alpha_flag("pds") == f"{AL.ALPHA_REFERENCE:g}"
    # Unset in both commands: the sampler's default, from this module.
    assert SampleFlags.alpha is None and BenchConfig.alpha is None
    assert AL.resolve_alpha(BenchConfig.alpha, None, 10) == AL.ALPHA_REFERENCE


# -- the exact yardstick agrees with the samplers ------------------------------------------------


def test_reduced_model_gives_the_same_numbers(model):
    reduced = M.reduce_model(model)
    assert reduced.lam.numel() < model.lam.numel() / 3
    for sampler in ("pds", "ddpm", "accel-sde"):
        for alpha in (None, 5.0, 30.0):
            full, red = M.recursion_spectral_kl(model, sampler, 12, alpha), M.recursion_spectral_kl(reduced, sampler, 12, alpha)
            assert red == pytest.approx(full, rel=1e-10), (sampler, alpha)


def _mc_kl(model, name, steps, precond, batch=384, seed=11):
    g = torch.Generator().manual_seed(seed)
    kw = sampler_kwargs(name, precond=precond, snr=model.settings.snr)
    x = get_sampler(name)(model.score, lambda: torch.randn(batch, 1, 16, 16, generator=g), steps, **kw)
    return model.spectral_kl(x)


@pytest.mark.parametrize("sampler,alpha", [("pds", None), ("pds", 5.0), ("ddpm", None), ("ddpm", 10.0),
                                           ("accel-sde", None), ("accel-sde", 30.0)])
def test_recursion_matches_the_sampler(model, sampler, alpha):
    """The exact recursion (no sampling) against the spectral KL of real samples at 20 steps."""
    stat = M.expected_freq_statistic(model)
    pre = None if alpha is None else Preconditioner.from_filters(Filters(freq=stat, space=None, size=16, channels=1), alpha)
    batch = 384
    mc = _mc_kl(model, sampler, plan(sampler, settings=model.settings, steps=20).steps, pre, batch)
    exact = M.recursion_spectral_kl(model, sampler, 20, alpha)
    # MC adds its own positive floor of about 1/(4 batch) and some scatter.
    assert abs(mc - exact) < 0.15 * exact + 2.5 / (4 * batch), (mc, exact)


@pytest.fixture(scope="module")
def estimated_filters(model):
    """Filter statistics from exact samples (clamped to [0, 1]: the Gaussian's tails leave it)."""
    g = torch.Generator().manual_seed(5)
    return compute_statistics((model.sample(512, g).clamp(0, 1) for _ in range(4)), freq=True, space=False)


@pytest.mark.parametrize("n", [20, 50])
def test_auto_beats_vanilla_by_sampling(model, estimated_filters, n):
    """The real sampler with filters estimated from exact samples, the same noise for both."""
    batch = 256
    out = {}
    for label, alpha in (("vanilla", None), ("auto", auto(model, n))):
        pre = None if alpha is None else Preconditioner.from_filters(estimated_filters, alpha)
        g = torch.Generator().manual_seed(n)
        x = pds(model.score, lambda: torch.randn(batch, 1, 16, 16, generator=g), pc_steps(model.settings, n), precond=pre,
                snr=model.settings.snr)
        out[label] = model.spectral_kl(x)
    assert out["auto"] < 0.5 * out["vanilla"], out
    assert math.isfinite(out["auto"])
