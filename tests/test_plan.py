"""The planner (pdscli.samplers.plan): the grid a sampler walks, its steps and the score calls they
cost, counted with the PC parts the model's sampling section names."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pdscli.errors import PdsError
from pdscli.models import builtin
from pdscli.noise import SampleNoise
from pdscli.samplers import REGISTRY, get_sampler, pc_steps
from pdscli.samplers.grids import GRIDS, make_steps
from pdscli.samplers.plan import grid_name, nfe_for, plan, steps_for_nfe
from pdscli.settings import SamplingSettings

SETTINGS = SamplingSettings(sigma_min=0.02, sigma_max=10.0, num_scales=200, snr=0.16, image_size=4, num_channels=1)
# Sampling sections whose PC parts change what a step costs.
SECTIONS = [{}, {"n_steps_each": 2}, {"n_steps_each": 3}, {"predictor": "none"}, {"corrector": "none"},
            {"corrector": "ald", "n_steps_each": 2, "predictor": "euler_maruyama"}]
PC_FAMILY = sorted(n for n, s in REGISTRY.items() if s.pc_grid)


def _score(x, sigma):
    return -x / (sigma.float()[:, None, None, None] ** 2 + 1.0)


def _calls_of(run) -> int:
    calls = []

    def score(x, sigma):
        calls.append(1)
        return _score(x, sigma)

    get_sampler(run.sampler)(score, SampleNoise(0, range(2), (1, 4, 4)), run.steps, **run.sampler_options())
    return len(calls)


def _settings(section: dict) -> SamplingSettings:
    return dataclasses.replace(SETTINGS, **section)


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize("name", PC_FAMILY)
@pytest.mark.parametrize("budget", [3, 12, 13])
def test_a_budget_is_never_overspent_whatever_the_pc_parts(name, section, budget):
    settings = _settings(section)
    try:
        run = plan(name, settings=settings, nfe=budget)
    except PdsError as e:  # a sampler left with no update by the section, or a budget below one step
        assert "leaves no update" in str(e) or "too small" in str(e)
        return
    spent = _calls_of(run)
    assert spent == run.nfe <= budget
    # ... and it is the most steps that fit: one more step would overspend.
    assert nfe_for(name, len(run.steps) + 1, run.options) > budget


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_planned_count_is_what_the_sampler_spends(name):
    for n in (3, 4):
        run = plan(name, settings=SETTINGS, steps=n)
        assert _calls_of(run) == run.nfe == REGISTRY[name].nfe(n)
        assert run.grid == REGISTRY[name].grid


def test_n_steps_each_costs_what_it_runs():
    settings = _settings({"n_steps_each": 2})
    assert plan("pc", settings=settings, steps=4).nfe == 12  # 2 corrector steps + 1 predictor step per step
    assert plan("corrector", settings=settings, steps=4).nfe == 8
    assert plan("predictor", settings=settings, steps=4).nfe == 4
    assert len(plan("pc", settings=settings, nfe=12).steps) == 4
    assert len(plan("corrector", settings=settings, nfe=12).steps) == 6


def test_make_steps_knows_the_pc_grid():
    assert "pc" in GRIDS
    for n, speed_up in ((7, None), (None, 3.0), (None, None)):
        a, b = make_steps("pc", SETTINGS, n, speed_up=speed_up), pc_steps(SETTINGS, n, speed_up=speed_up)
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("sigma", "sigma_hi", "sigma_lo"))
    assert len(make_steps("geometric", SETTINGS, speed_up=3.0)) == 66
    with pytest.raises(PdsError, match="--schedule must be one of pc, geometric, edm, not 'nope'"):
        make_steps("nope", SETTINGS, 4)


def test_grids_and_budgets_refused_in_one_line():
    assert grid_name("pds") == "pc" and grid_name("ddim") == REGISTRY["ddim"].grid and grid_name("pc", "edm") == "edm"
    with pytest.raises(PdsError, match="too small for heun: its 2 steps take 3"):
        steps_for_nfe("heun", 2)
    with pytest.raises(PdsError, match="too small for pds: its 2 steps take 4"):
        plan("pds", settings=SETTINGS, nfe=3, schedule="geometric")  # one step fits, but the grid needs two
    with pytest.raises(PdsError, match="--nfe excludes"):
        plan("pc", settings=SETTINGS, nfe=3, steps=2)


# -- the CLI: run.json's count against the budget ------------------------------------------------


@pytest.fixture(scope="module")
def nse2_config(tmp_path_factory):
    """The built-in model's config with two corrector steps per step."""
    config = json.loads(builtin.CONFIG.read_text())
    config["sampling"]["n_steps_each"] = 2
    path = tmp_path_factory.mktemp("config") / "nse2.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("sampler", ["pc", "pds", "corrector"])
def test_sample_nfe_with_a_config_never_overspends(run_pds, tmp_path, nse2_config, sampler):
    extra = ["--masks", builtin.FILTERS] if sampler == "pds" else []
    r = run_pds("sample", "--checkpoint", builtin.WEIGHTS, "--config", nse2_config, "--sampler", sampler, "--nfe", 12,
                "-n", 1, *extra, "--out", tmp_path / sampler, "--quiet", "--json", "--threads", 1)
    assert r.exit_code == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["nfe"]["per_sample"] == record["nfe_budget"]["planned"] <= 12
