"""Grids fitted to the data's statistics (pdscli.samplers.fitted): the exact measure agrees with
the image-space one, the fit beats its starting grids, and the cache round-trips."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pdscli.errors import PdsError
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.evaluate.moments import exact_spectral_kl
from pdscli.evaluate.moments import expected_freq_statistic
from pdscli.samplers import REGISTRY
from pdscli.samplers import fitted as F
from pdscli.samplers.grids import geometric


@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(16, 1)


@pytest.mark.parametrize("name", ["dpm++2m", "ipndm", "dpm++2m-sde"])
def test_grid_kl_matches_the_image_space_measure(model, name):
    steps = geometric(model.settings, 6)
    info = REGISTRY[name]
    exact = exact_spectral_kl(model, info.fn, steps)
    full = F.Spectrum(model.lam.reshape(-1), torch.ones(model.lam.numel(), dtype=torch.float64))
    draws = 1 if info.deterministic else 2 * len(steps) + 2
    assert F.grid_kl(info.fn, full, steps, draws=draws) == pytest.approx(exact, rel=1e-3)
    # merging near-equal variances into bins moves it by far less than a grid changes it
    assert F.grid_kl(info.fn, F.spectrum_of_model(model), steps, draws=draws) == pytest.approx(exact, rel=0.02)


def test_the_statistic_gives_the_model_spectrum_without_its_zero_frequency(model):
    spectrum = F.spectrum_of_statistic(expected_freq_statistic(model))
    lam = model.lam.reshape(-1)[1:]
    assert float(spectrum.weights.sum()) == lam.numel()
    assert math.isclose(float((spectrum.weights * spectrum.lam.log()).sum()), float(lam.log().sum()), rel_tol=1e-6)
    with pytest.raises(PdsError):
        F.spectrum_of_statistic(np.zeros((4, 4)))


@pytest.mark.parametrize("name", ["dpm++2m", "ipndm"])
def test_the_fit_beats_both_starting_grids_and_keeps_the_ends(model, name):
    levels, kl, start = F.fit_levels(REGISTRY[name].fn, F.spectrum_of_model(model), model.settings, 6)
    assert kl < 0.5 * min(start.values()), (kl, start)
    assert float(levels[0]) == pytest.approx(model.settings.sigma_max) and float(levels[-1]) == pytest.approx(model.settings.sigma_min)
    assert bool((levels[1:] < levels[:-1]).all())
    gaps = -torch.diff(levels.log())
    assert float(gaps.max()) <= F.MAX_GAP * float(gaps.sum()) / 5 * (1 + 1e-6)
    check = exact_spectral_kl(model, REGISTRY[name].fn, F.steps_from_levels(levels, model.settings.sigma_max))
    assert check == pytest.approx(kl, rel=0.05)


def test_fitted_steps_are_cached_and_reused(model, tmp_path):
    spectrum = F.spectrum_of_model(model)
    fn = REGISTRY["dpm++2m"].fn
    first = F.fitted_steps("dpm++2m", fn, spectrum, model.settings, 4, cache=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    record = json.loads(files[0].read_text())
    record["levels"][1] *= 1.01  # a cached grid is read, not refitted
    files[0].write_text(json.dumps(record))
    again = F.fitted_steps("dpm++2m", fn, spectrum, model.settings, 4, cache=tmp_path)
    assert float(again.sigma[1]) == pytest.approx(1.01 * float(first.sigma[1]))
    files[0].write_text("{not json")  # a broken cache file is refitted and rewritten
    third = F.fitted_steps("dpm++2m", fn, spectrum, model.settings, 4, cache=tmp_path)
    assert torch.allclose(third.sigma, first.sigma)
    assert json.loads(files[0].read_text())["sampler"] == "dpm++2m"


# -- `pds sample --schedule stats` ---------------------------------------------------------------


def _filters_file(path, size=8):
    from pdscli.precondition import Filters

    gauss = GaussianImageModel(size, 3)
    Filters(freq=expected_freq_statistic(gauss), space=None, size=size, channels=3, count=10).save(path)
    return path


SMALL = ("sample", "--model", "gaussian", "--image-size", "8", "--quiet", "-n", "2")


def test_sample_with_the_stats_schedule_fits_and_caches_the_grid(run_pds, tmp_path, monkeypatch):
    monkeypatch.setenv("PDS_CACHE_DIR", str(tmp_path / "cache"))
    masks = _filters_file(tmp_path / "m.npz")
    r = run_pds(*SMALL, "--out", tmp_path / "o", "--sampler", "ipndm", "--steps", "5", "--schedule", "stats", "--masks", masks)
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["schedule"] == "stats" and record["sampler"] == "ipndm" and not record["preconditioned"]
    assert len(list((tmp_path / "cache" / "grids").glob("*.json"))) == 1


@pytest.mark.parametrize("extra,needle", [
    (("--sampler", "dpm++2m", "--steps", "5"), "--masks"),  # no statistics at hand
    (("--sampler", "pc", "--steps", "5"), "PC family"),
    (("--sampler", "dpm++2m", "--steps", "5", "--schedule", "statz"), "stats"),
])
def test_the_stats_schedule_refuses_what_it_cannot_do(run_pds, tmp_path, extra, needle):
    args = [*SMALL, "--out", tmp_path / "o", *extra]
    if "--schedule" not in extra:
        args += ["--schedule", "stats"]
    if "pc" in extra:
        args += ["--masks", _filters_file(tmp_path / "m.npz")]
    r = run_pds(*args)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_resume_refuses_a_stats_grid_fitted_to_other_filters(run_pds, tmp_path, monkeypatch):
    from pdscli.precondition import Filters

    monkeypatch.setenv("PDS_CACHE_DIR", str(tmp_path / "cache"))
    first = _filters_file(tmp_path / "a.npz")
    other = tmp_path / "b.npz"
    gauss = GaussianImageModel(8, 3, power=2.0)  # another spectrum: another fitted grid
    Filters(freq=expected_freq_statistic(gauss), space=None, size=8, channels=3, count=10).save(other)
    args = [*SMALL[:-2], "--out", tmp_path / "o", "--sampler", "ipndm", "--steps", "5", "--schedule", "stats"]
    assert run_pds(*args, "-n", "2", "--masks", first).exit_code == 0
    r = run_pds(*args, "-n", "3", "--masks", other, "--resume")
    assert r.exit_code == 2 and "Traceback" not in r.stderr, r.stderr
    assert run_pds(*args, "-n", "3", "--masks", first, "--resume").exit_code == 0
