"""Samplers on the analytic Gaussian model, whose exact answer is known (see docs/exactness.md).

Vanilla PC at its full step count reproduces the data's per-frequency variance; at 20 steps it
leaves every frequency band far too noisy, and PDS with filters estimated the way a user makes
them (8-bit PNGs of data, `pdscli.precondition.filters.folder_statistics`) removes most of that error.
"""

from __future__ import annotations

import pytest
import torch

from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.precondition.filters import folder_statistics
from pdscli.images import save_png
from pdscli.noise import SampleNoise
from pdscli.precondition import Preconditioner
from pdscli.precondition.alpha import ALPHA_REFERENCE
from pdscli.samplers import pc_steps, sampler_kwargs
from pdscli.samplers.pc import pc, pds, predictor

N_SAMPLES = 128  # spectral-KL estimation floor ~ 1 / (4 n) = 0.002


@pytest.fixture(scope="module")
def model():
    return GaussianImageModel(16, 1, num_scales=300)


@pytest.fixture(scope="module")
def precond(model, tmp_path_factory):
    """Filters from 200 PNGs of exact data samples (the reference's mask_gen_demo uses 200 images)."""
    folder = tmp_path_factory.mktemp("data")
    for i, x in enumerate(model.sample(200, torch.Generator().manual_seed(0))):
        save_png(folder / f"{i:06d}.png", x.clamp(0, 1))
    filters = folder_statistics(folder, size=16, channels=1, workers=1)
    assert filters.count == 200
    return Preconditioner.from_filters(filters, alpha=ALPHA_REFERENCE)


def _run(model, sampler, n_steps, precond=None, seed=1):
    steps = pc_steps(model.settings, n_steps)
    noise = SampleNoise(seed, range(N_SAMPLES), model.shape)
    return sampler(model.score, noise, steps, **sampler_kwargs(sampler.__name__, precond=precond, snr=model.settings.snr))


@pytest.mark.parametrize("sampler", [pc, predictor])
def test_full_step_count_is_close_to_exact(model, sampler):
    x = _run(model, sampler, model.settings.num_scales)
    assert model.spectral_kl(x) < 0.006
    bands = model.variance_ratio_by_band(x)
    assert bool(((bands - 1).abs() < 0.15).all()), bands  # the lowest band holds only 5 coefficients


def test_pds_beats_vanilla_at_20_steps(model, precond):
    vanilla = _run(model, pc, 20)
    preconditioned = _run(model, pds, 20, precond)
    kl_vanilla, kl_pds = model.spectral_kl(vanilla), model.spectral_kl(preconditioned)
    assert kl_vanilla > 0.03  # the measure sees the few-step error
    assert kl_pds < kl_vanilla / 5, (kl_pds, kl_vanilla)
    # Vanilla leaves the top band ~1.6x too noisy; PDS brings it near the truth.
    top_vanilla = float(model.variance_ratio_by_band(vanilla)[-1])
    top_pds = float(model.variance_ratio_by_band(preconditioned)[-1])
    assert top_vanilla > 1.3 and abs(top_pds - 1) < 0.15, (top_vanilla, top_pds)
