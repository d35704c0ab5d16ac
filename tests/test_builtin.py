"""The built-in digits model: it ships, it loads, and its samples pass a quality check that can fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pdscli.evaluate import digits as qc
from pdscli.models import builtin

REPO = Path(__file__).resolve().parents[1]


def test_the_package_ships_weights_config_and_filters_in_a_few_mb():
    files = [builtin.WEIGHTS, builtin.CONFIG, builtin.FILTERS]
    assert all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]
    assert sum(f.stat().st_size for f in builtin.DATA_DIR.iterdir()) < 5_000_000
    # pyproject's package-data must carry them into a wheel.
    assert '"data/*"' in (REPO / "pyproject.toml").read_text()


def test_default_score_model_loads_the_ema_weights_with_its_settings():
    model = builtin.default_score_model("cpu")
    assert model.name == "builtin:digits"
    s = model.settings
    assert (s.image_size, s.num_channels, s.num_scales, s.snr, s.sigma_min) == (16, 1, 1000, 0.16, 0.01)
    assert s.sigma_max == json.loads(builtin.CONFIG.read_text())["model"]["sigma_max"]
    assert model.info["weights"] == "state_dict" and model.sha256
    x = torch.rand(2, 1, 16, 16)
    out = model.score(x, torch.tensor([0.5, 5.0]))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_default_filters_fit_the_model():
    filters = builtin.default_filters()
    assert filters.shape == (1, 16, 16) and filters.kinds == "freq+space" and filters.count == 1797
    precond = builtin.default_preconditioner()
    z = torch.randn(3, 1, 16, 16)
    assert precond.noise(z).shape == z.shape


def test_the_shipped_filters_are_the_statistics_of_the_training_digits():
    # Recomputed in memory from the same images: only the 8-bit PNG round trip separates them.
    from pdscli.train.datasets import load_digits
    from pdscli.precondition import compute_statistics

    x = load_digits(size=16)
    fresh = compute_statistics([torch.round(x * 255) / 255])
    shipped = builtin.default_filters()
    assert np.allclose(fresh.freq, shipped.freq, rtol=1e-4, atol=1e-4)
    assert np.allclose(fresh.space, shipped.space, rtol=1e-4, atol=1e-5)


def test_the_check_fails_on_noise_and_passes_real_digits():
    clf, _ = qc.digit_classifier(heldout=False)
    from pdscli.train.datasets import load_digits

    real = qc.evaluate(clf, load_digits(size=16)[::7])
    assert not qc.failures(real), real
    noise = qc.evaluate(clf, torch.rand(200, 1, 16, 16))
    assert qc.failures(noise)
    blank = qc.evaluate(clf, torch.zeros(200, 1, 16, 16))  # one "class" only
    assert any("one class" in f for f in qc.failures(blank))


def test_fd_of_real_digits_sits_at_the_floor_and_noise_far_above_it():
    clf, _ = qc.digit_classifier(heldout=False)
    real = qc.real_images()
    assert qc.fd(clf, real) < 1e-6  # the reference itself
    floor = qc.fd_floor(clf, 128, splits=4)
    assert floor["mean"] > 0 and floor["std"] > 0 and floor["splits"] == 4
    other = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(1))[:128]]  # a draw the floor did not use
    assert qc.fd(clf, other) < floor["mean"] + 4 * floor["std"]
    noisy = (real[:128] + 0.3 * torch.randn(128, 1, 16, 16, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert qc.fd(clf, noisy) > floor["mean"] + 10 * floor["std"]
    assert qc.fd(clf, torch.rand(128, 1, 16, 16)) > qc.fd(clf, noisy)


@pytest.mark.slow  # 128 samples of the built-in network
def test_pds_at_the_default_steps_passes_and_vanilla_at_the_same_steps_does_worse():
    """The quick quality check (64 samples, about 10 s alone on a CPU core); figures in docs/builtin-model.md."""
    clf, _ = qc.digit_classifier(heldout=False)
    model = builtin.default_score_model("cpu")
    n, steps = 64, builtin.DEFAULT_STEPS
    pds, _ = qc.sample(model, sampler="pds", steps=steps, n=n)
    vanilla, _ = qc.sample(model, sampler="pc", steps=steps, n=n)
    m_pds, m_vanilla = qc.evaluate(clf, pds), qc.evaluate(clf, vanilla)
    assert not qc.failures(m_pds), m_pds
    assert qc.failures(m_vanilla), m_vanilla
    assert m_vanilla["high_freq_ratio"] > 3 * m_pds["high_freq_ratio"]
    assert m_vanilla["confident_share"] < m_pds["confident_share"]


@pytest.mark.slow  # 256 samples at 10 NFE and the --nfe pilot: about 30 s on a CPU core
def test_nfe_10_is_within_noise_of_the_best_peer_fd():
    """docs/samplers.md's built-in peers table (docs/data/peers-builtin.json, scripts/peers.py --only
    builtin): `pdscli.sample(builtin, 256, nfe=10)` reproduces pds's recorded FD, and that FD is at most
    the best peer's plus two standard deviations of the floor."""
    import pdscli

    record = json.loads((REPO / "docs" / "data" / "peers-builtin.json").read_text())
    n, floor = record["num_samples"], record["floor"]["fd"]
    at_10 = [r for r in record["rows"] if r["nfe"] == 10 and r.get("fd") is not None]
    best_peer = min(r["fd"] for r in at_10 if r["library"] != "pds")
    recorded = next(r["fd"] for r in at_10 if r["library"] == "pds")
    images = pdscli.sample(pdscli.load("builtin", device="cpu"), n, nfe=10, seed=0)
    clf, _ = qc.digit_classifier(heldout=False)
    ours = qc.fd(clf, images)
    assert ours == pytest.approx(recorded, rel=1e-3), (ours, recorded)
    assert ours <= best_peer + 2 * floor["std"], (ours, best_peer, floor)


def test_pds_sample_without_a_model_flag_uses_the_builtin_model(run_pds, tmp_path):
    out = tmp_path / "demo"
    r = run_pds("sample", "--steps", 3, "-n", 2, "--out", out, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    record = json.loads((out / "run.json").read_text())
    assert json.dumps(record).count("builtin:digits") >= 1
    assert np.load(out / "samples.npz")["samples"].shape == (2, 1, 16, 16)
