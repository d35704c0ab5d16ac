"""`--nfe N`: budgets, the recommended sampler per budget, and what the recommendation must hold."""

from __future__ import annotations

import json

import pytest
import torch

from pdscli.errors import PdsError
from pdscli.evaluate import digits as qc
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.measures import mixture_quality
from pdscli.evaluate.moments import exact_spectral_kl
from pdscli.evaluate.mixture import MixtureImageModel
from pdscli.noise import SampleNoise
from pdscli.samplers import REGISTRY, nfe_count
from pdscli.samplers.grids import SCHEDULES, make_steps
from pdscli.samplers.plan import steps_for_nfe
from pdscli.settings import SamplingSettings
from pdscli.samplers.recommend import (
    EXACT,
    FILTERS,
    NETWORK,
    TABLE,
    choose_for_budget,
    recommend,
)

SETTINGS = SamplingSettings(sigma_min=0.01, sigma_max=50.0, num_scales=1000, snr=0.16, image_size=8, num_channels=1)
BUDGETS = [10, 20, 35, 50]
BASELINE = ("dpm++2m", "geometric")  # DPM-Solver++(2M) on the log-uniform grid


def test_every_table_entry_is_a_registered_sampler_on_a_known_grid():
    for _, row in TABLE:
        assert set(row) == {EXACT, NETWORK, FILTERS}
        for choice in row.values():
            assert choice.sampler in REGISTRY and choice.grid in SCHEDULES
            assert not (choice.filters and REGISTRY[choice.sampler].deterministic)


@pytest.mark.parametrize("budget", [3, 10, 20, 35, 50, 99, 200, 1000])
@pytest.mark.parametrize("filters,analytic", [(False, True), (False, False), (True, False)])
def test_plan_spends_at_most_the_budget(budget, filters, analytic):
    run = choose_for_budget(budget, filters=filters, analytic=analytic).plan(SETTINGS)
    assert run.nfe == nfe_count(run.sampler, len(run.steps)) <= budget
    assert run.sampler == recommend(budget, filters=filters, analytic=analytic).sampler
    assert str(budget) in run.reason and run.sampler in run.reason and f"{len(run.steps)} steps" in run.reason


def test_a_given_sampler_takes_the_most_steps_that_fit():
    run = choose_for_budget(20, sampler="heun").plan(SETTINGS)
    assert (len(run.steps), run.nfe, run.grid) == (10, 19, REGISTRY["heun"].grid)
    assert run.reason == "--sampler heun: 10 steps fit in 20 network calls"
    assert len(choose_for_budget(20, sampler="pds", schedule="pc").plan(SETTINGS).steps) == 10
    with pytest.raises(PdsError, match="at least 1"):
        choose_for_budget(0)


# -- the requirement: the default is at least as exact as DPM-Solver++(2M), log-uniform ---------------


def _steps(model, name, grid, budget):
    return make_steps(grid, model.settings, steps_for_nfe(name, budget))


@pytest.mark.parametrize("budget", BUDGETS)
def test_default_is_at_least_as_exact_as_dpm2m_on_the_gaussian(budget):
    """Exact output spectra (no samples, no floor) on the 3x32x32 Gaussian model, its defaults."""
    model = GaussianImageModel()
    choice = recommend(budget, filters=False, analytic=True)
    kl = {}
    for key, (name, grid) in (("default", (choice.sampler, choice.grid)), ("dpm++2m", BASELINE)):
        kl[key] = exact_spectral_kl(model, REGISTRY[name].fn, _steps(model, name, grid, budget))
    assert kl["default"] <= kl["dpm++2m"] * (1 + 1e-6), kl


@pytest.fixture(scope="module")
def mixture_runs():
    """Every budget's default and DPM-Solver++(2M) on the mixture, 128 samples from one x_T."""
    model = MixtureImageModel()
    n = 128
    results = {}
    for budget in BUDGETS:
        choice = recommend(budget, filters=False, analytic=True)
        for key, (name, grid) in (("default", (choice.sampler, choice.grid)), ("dpm++2m", BASELINE)):
            if key == "default" and (name, grid) == BASELINE:
                continue  # the same run: equal by construction, filled in below
            x = REGISTRY[name].fn(model.score, SampleNoise(0, range(n), model.shape), _steps(model, name, grid, budget))
            results[budget, key] = mixture_quality(model, x)
        results.setdefault((budget, "default"), results[budget, "dpm++2m"])
    return results


@pytest.mark.slow  # the mixture runs: every budget's samples
@pytest.mark.parametrize("budget", BUDGETS)
def test_default_is_at_least_as_exact_as_dpm2m_on_the_mixture(mixture_runs, budget):
    mine, base = mixture_runs[budget, "default"], mixture_runs[budget, "dpm++2m"]
    assert mine["mode_tv"] <= base["mode_tv"] + 1e-12, (mine, base)
    assert mine["mean_mode_kl"] <= base["mean_mode_kl"] * (1 + 1e-6), (mine, base)


@pytest.mark.slow  # 64 samples of the built-in network and the classifier
def test_builtin_default_at_20_nfe_passes_the_classifier_check():
    """What vanilla PC at 30 steps (60 NFE) fails (tests/test_builtin.py), the default at 20 NFE passes."""
    from pdscli.models import builtin

    clf, _ = qc.digit_classifier(heldout=False)
    model = builtin.default_score_model("cpu")
    choice = choose_for_budget(20, filters=True, analytic=False)  # the built-in model comes with its filters
    run = choice.plan(model.settings)
    assert run.nfe <= 20
    x, _ = qc.sample(model, sampler=run.sampler, steps=len(run.steps), n=64, grid=run.grid, filters=choice.filters)
    m = qc.evaluate(clf, x)
    assert not qc.failures(m), m


# -- the CLI ------------------------------------------------------------------------------------------


def test_sample_nfe_records_the_plan(run_pds, tmp_path):
    out = tmp_path / "g"
    r = run_pds("sample", "--model", "gaussian", "--image-size", 8, "--channels", 1, "--nfe", 10, "-n", 2,
                "--out", out, "--quiet", "--json")
    assert r.exit_code == 0, r.stderr
    record = json.loads(r.stdout)
    choice = recommend(10, filters=False, analytic=True)
    assert record["sampler"] == choice.sampler and record["schedule"] == choice.grid
    assert record["nfe"]["per_sample"] == record["nfe_budget"]["planned"] <= 10
    assert "recommended" in record["nfe_budget"]["reason"]


def best_peer_kl(nfe: int) -> float:
    """The best other library's exact KL at `nfe` on the 3x32x32 Gaussian (docs/data/peers-gaussian.json)."""
    from pathlib import Path

    rows = json.loads((Path(__file__).resolve().parents[1] / "docs" / "data" / "peers-gaussian.json").read_text())["rows"]
    return min(r["kl"] for r in rows if r["library"] != "pds" and r["nfe"] == nfe)


@pytest.mark.parametrize("nfe", [5, 8, 10])
def test_sample_nfe_without_statistics_is_within_a_quarter_of_the_best_peer(run_pds, tmp_path, nfe):
    """`pds sample --model gaussian --teleport off --nfe N`: the run's own sampler and grid (run.json),
    measured by their exact output spectrum, against the best peer's exact KL at N."""
    out = tmp_path / "g"
    r = run_pds("sample", "--model", "gaussian", "--teleport", "off", "--nfe", nfe, "-n", 2, "--out", out, "--quiet",
                "--json")
    assert r.exit_code == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["teleport"]["sigma_t"] is None and record["nfe"]["per_sample"] <= nfe
    model = GaussianImageModel()
    steps = make_steps(record["schedule"], model.settings, record["steps"]["count"])
    kl = exact_spectral_kl(model, REGISTRY[record["sampler"]].fn, steps)
    assert kl <= 1.25 * best_peer_kl(nfe), (record["sampler"], kl, best_peer_kl(nfe))


def test_sample_nfe_with_a_sampler_and_the_mixture(run_pds, tmp_path):
    r = run_pds("sample", "--model", "mixture", "--image-size", 8, "--channels", 1, "--nfe", 10, "--sampler", "heun",
                "-n", 2, "--out", tmp_path / "m", "--quiet", "--json")
    assert r.exit_code == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["sampler"] == "heun" and record["steps"]["count"] == 5 and record["nfe"]["per_sample"] == 9
    assert record["model"]["name"] == "mixture"


def test_sample_nfe_excludes_steps(run_pds, tmp_path):
    r = run_pds("sample", "--model", "gaussian", "--nfe", 10, "--steps", 5, "--out", tmp_path / "x", "--quiet")
    assert r.exit_code == 2 and "--nfe excludes" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_sample_nfe_too_small_for_the_sampler(run_pds, tmp_path):
    r = run_pds("sample", "--model", "gaussian", "--nfe", 2, "--sampler", "heun", "--out", tmp_path / "x", "--quiet")
    assert r.exit_code == 2 and "too small" in r.stderr


def test_mixture_score_is_the_gradient_of_its_log_density():
    model = MixtureImageModel(8, 1)
    x, _ = model.sample(3, generator=torch.Generator().manual_seed(0))
    sigma = 0.3
    xs = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    s = model.score(xs, torch.full((3,), sigma)).double()
    d = 1e-3 * torch.randn(xs.shape, generator=torch.Generator().manual_seed(2))

    def logp(y):
        return torch.logsumexp(model.log_densities(y, sigma), dim=1)

    numeric = (logp(xs + d) - logp(xs - d)) / 2
    assert torch.allclose(numeric, (s * d).flatten(1).sum(1), rtol=1e-2, atol=1e-4)


def test_exact_mixture_samples_have_the_right_mode_shares():
    model = MixtureImageModel(8, 1)
    x, modes = model.sample(2000, generator=torch.Generator().manual_seed(0))
    q = mixture_quality(model, x)
    assert q["mode_tv"] < 0.05
    from pdscli.evaluate.measures import assign_modes

    assert float((assign_modes(model, x) == modes).double().mean()) > 0.9  # modes are told apart


def test_bench_opens_the_mixture_and_measures_mode_proportions():
    from pdscli.bench.config import BenchConfig
    from pdscli.bench.model import open_bench_model
    from pdscli.bench.preconditioner import bench_filters
    from pdscli.bench.quality import MixtureQuality, make_quality
    from pdscli.sample.model import ModelSpec

    cfg = BenchConfig(spec=ModelSpec(model="mixture", image_size=8, channels=1), quick=True).resolved()
    model = open_bench_model(cfg, torch.device("cpu"))
    assert model.name == "mixture" and model.shape == (1, 8, 8)
    quality = make_quality(model, None, 0)
    assert isinstance(quality, MixtureQuality)
    exact, _ = model.mixture.sample(400, generator=torch.Generator().manual_seed(3))
    good = quality.measure(exact)
    one_mode = quality.measure(model.mixture.components[1].sample(400))  # every sample from the 0.3 mode
    assert good["metric"] == "mode_tv" and good["value"] < 0.08 and one_mode["value"] > 0.6
    filters, info = bench_filters(cfg, model, None)
    assert filters.shape == (1, 8, 8) and info["images_meaningful"]
