"""FID / KID: the measures against closed forms and direct sums, statistics files, image sets, and `pds fid`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pdscli.errors import PdsError
from pdscli.evaluate import fid as F
from pdscli.evaluate.compare import compare
from pdscli.evaluate.features import INCEPTION_NAME, TinyFeatureNet, open_features, save_tiny_features
from pdscli.evaluate.imagesets import open_image_set
from pdscli.images import save_png

from conftest import QUICK, one_line_error, tiny_network_config

CPU = torch.device("cpu")


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ----------------------------------------------------------------------------------------
# Fréchet distance.


def test_frechet_distance_of_commuting_gaussians_is_the_closed_form():
    # Diagonal covariances: W2² = |m1 - m2|² + sum (sqrt(a_i) - sqrt(b_i))².
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert F.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_against_identity_is_the_eigenvalue_form():
    # S1 = I: Tr(I + S2 - 2 S2^½) = sum (sqrt(l) - 1)² over the eigenvalues l of S2 (S2 not diagonal).
    rng = np.random.default_rng(1)
    s2 = random_spd(rng, 8)
    lam = np.linalg.eigvalsh(s2)
    expected = np.sum((np.sqrt(lam) - 1) ** 2)
    assert F.frechet_distance(np.zeros(8), np.eye(8), np.zeros(8), s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    m1, m2, s1, s2 = rng.normal(size=10), rng.normal(size=10), random_spd(rng, 10), random_spd(rng, 10)
    root = linalg.sqrtm(s1 @ s2).real
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * root)
    assert F.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)
    assert F.frechet_distance(m1, s1, m2, s2) == pytest.approx(F.frechet_distance(m2, s2, m1, s1), rel=1e-8)


def test_fid_of_sampled_gaussians_approaches_the_closed_form():
    rng = np.random.default_rng(3)
    a, b = np.array([1.0, 0.25, 4.0]), np.array([2.0, 1.0, 0.5])
    m2 = np.array([0.5, -1.0, 0.0])
    x = rng.normal(size=(200_000, 3)) * np.sqrt(a)
    y = rng.normal(size=(200_000, 3)) * np.sqrt(b) + m2
    sx = F.statistics_of(x.astype(np.float32), feature="t", image_size=(1, 1))
    sy = F.statistics_of(y.astype(np.float32), feature="t", image_size=(1, 1))
    expected = np.sum(m2**2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert F.frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(expected, rel=0.02)


def test_statistics_are_numpys_mean_and_unbiased_covariance():
    x = np.random.default_rng(4).normal(size=(5000, 7)).astype(np.float32) + 3
    s = F.statistics_of(x, feature="t", image_size=(2, 2))
    np.testing.assert_allclose(s.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_of_a_set_against_itself_is_zero_even_with_singular_covariance():
    x = np.random.default_rng(5).normal(size=(10, 64)).astype(np.float32)  # 10 samples in 64 dimensions: rank 9
    s = F.statistics_of(x, feature="t", image_size=(1, 1))
    assert F.frechet_distance(s.mu, s.sigma, s.mu, s.sigma) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------------------
# KID.


def direct_mmd2(x, y):
    """The unbiased MMD² with k(a, b) = (a·b / d + 1)³, summed pair by pair."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_a_direct_pairwise_sum():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    assert F.mmd2_unbiased(x, y) == pytest.approx(direct_mmd2(x, y), rel=1e-10)


def test_kid_over_whole_sets_is_the_mmd2_with_no_spread():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(15, 4)), rng.normal(size=(15, 4)) + 1
    k = F.kid(x, y, subsets=5, subset_size=15)
    assert k.mean == pytest.approx(direct_mmd2(x, y), rel=1e-10)
    assert k.std == pytest.approx(0.0, abs=1e-12)
    assert (k.subsets, k.subset_size) == (5, 15)


def test_kid_separates_distributions_and_reports_a_spread():
    rng = np.random.default_rng(8)
    x, same, shifted = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(size=(400, 8)) + 0.5
    near, far = F.kid(x, same, subsets=20, subset_size=100), F.kid(x, shifted, subsets=20, subset_size=100)
    assert abs(near.mean) < 3 * near.std + 1e-3
    assert far.mean > 3 * far.std and far.mean > 10 * (abs(near.mean) + near.std)
    assert far.std > 0


def test_kid_subset_size_defaults_to_the_smaller_set_and_refuses_more():
    rng = np.random.default_rng(9)
    assert F.kid(rng.normal(size=(30, 3)), rng.normal(size=(50, 3)), subsets=2).subset_size == 30
    with pytest.raises(PdsError, match="more than the smaller set"):
        F.kid(rng.normal(size=(30, 3)), rng.normal(size=(50, 3)), subset_size=40)


# ----------------------------------------------------------------------------------------
# Statistics files.


def test_statistics_file_round_trip(tmp_path):
    x = np.random.default_rng(10).normal(size=(50, 6)).astype(np.float32)
    s = F.statistics_of(x, feature="net/abc", image_size=(32, 16), source="data/")
    F.save_statistics(s, tmp_path / "s.npz")
    assert F.is_statistics_file(tmp_path / "s.npz")
    r = F.load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(r.mu, s.mu)
    np.testing.assert_array_equal(r.sigma, s.sigma)
    np.testing.assert_array_equal(r.kid_features, x)
    assert (r.count, r.feature, r.image_size, r.source) == (50, "net/abc", (32, 16), "data/")
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left behind


def test_statistics_file_keeps_a_bounded_subset_for_kid(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "KID_KEEP", 20)
    x = np.random.default_rng(11).normal(size=(50, 3)).astype(np.float32)
    F.save_statistics(F.statistics_of(x, feature="t", image_size=(1, 1)), tmp_path / "s.npz")
    kept = F.load_statistics(tmp_path / "s.npz").kid_features
    assert kept.shape == (20, 3)
    assert all(any(np.array_equal(row, y) for y in x) for row in kept)  # rows of the set, not made up


def test_a_foreign_statistics_file_is_refused_with_the_reason(tmp_path):
    np.savez(tmp_path / "other.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(PdsError, match="feature network"):
        F.load_statistics(tmp_path / "other.npz")


# ----------------------------------------------------------------------------------------
# Image sets and the stand-in network.


def image_folder(path, n=12, size=16, shift=0, seed=0):
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        a = np.clip(rng.integers(0, 196, (size, size, 3)) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(path / f"{i:03d}.png")
    return path


@pytest.fixture
def tiny(tmp_path):
    return save_tiny_features(tmp_path / "tiny.pt")


def test_samples_npz_and_its_pngs_give_the_same_features(tmp_path, tiny):
    x = np.random.default_rng(12).uniform(size=(6, 1, 8, 8)).astype(np.float32)  # grey, exact floats
    (tmp_path / "run").mkdir()
    for i, img in enumerate(x):
        save_png(tmp_path / "run" / f"{i:06d}.png", img)
    np.savez(tmp_path / "samples.npz", samples=x)
    from_npz = np.concatenate(list(open_image_set(tmp_path / "samples.npz").batches(4)))
    from_pngs = np.concatenate(list(open_image_set(tmp_path / "run").batches(4)))
    assert from_npz.shape == (6, 3, 8, 8) and from_npz.dtype == np.uint8
    np.testing.assert_array_equal(from_npz, from_pngs)
    r = compare(tmp_path / "samples.npz", tmp_path / "run", open_features(tiny, CPU), batch_size=4)
    assert r["fid"] == pytest.approx(0.0, abs=1e-9)


def test_a_pds_sample_folder_is_read_without_its_grid(tmp_path):
    folder = image_folder(tmp_path / "run", n=3)
    Image.new("RGB", (50, 50)).save(folder / "grid.png")
    (folder / "run.json").write_text("{}")
    s = open_image_set(folder)
    assert s.count == 3 and s.size == (16, 16)


def test_tiny_feature_network_file_round_trips(tmp_path, tiny):
    net = open_features(tiny, CPU)
    images = torch.randint(0, 256, (3, 3, 20, 12), dtype=torch.uint8)
    torch.manual_seed(0)
    expected = TinyFeatureNet(32, 32).eval()(images)  # save_tiny_features draws its weights from seed 0
    assert net.dim == 32 and net.name.startswith("pds-tiny-features/")
    torch.testing.assert_close(net(images), expected)
    other = open_features(save_tiny_features(tmp_path / "other.pt", seed=1), CPU)
    assert other.name != net.name  # different weights, different feature names


# ----------------------------------------------------------------------------------------
# The command.


def test_pds_fid_prints_fid_and_kid(run_pds, tmp_path, tiny):
    a, b = image_folder(tmp_path / "a", seed=1), image_folder(tmp_path / "b", shift=60, seed=2)
    r = run_pds("fid", a, b, "--features", tiny, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "FID " in r.stdout and "KID " in r.stdout and "12 (" in r.stdout
    same = run_pds("fid", a, a, "--features", tiny, "--json", "--quiet")
    other = run_pds("fid", a, b, "--features", tiny, "--json", "--quiet")
    same, other = json.loads(same.stdout), json.loads(other.stdout)
    assert same["fid"] == pytest.approx(0.0, abs=1e-9)
    assert other["fid"] > 1e-4 and other["kid"]["mean"] > 0
    assert other["samples_count"] == other["reference_count"] == 12 and other["kid"]["subset_size"] == 12
    assert other["samples"]["size"] == [16, 16] and "small sample counts" in other["note"]


def test_save_stats_then_compare_against_the_file(run_pds, tmp_path, tiny):
    a, b = image_folder(tmp_path / "a", seed=1), image_folder(tmp_path / "b", shift=60, seed=2)
    stats = tmp_path / "stats" / "b.npz"
    first = run_pds("fid", a, b, "--features", tiny, "--save-stats", stats, "--json", "-q")
    assert first.exit_code == 0, first.stderr
    assert json.loads(first.stdout)["saved_stats"] == str(stats) and stats.is_file()
    again = run_pds("fid", a, stats, "--features", tiny, "--json", "-q")
    assert again.exit_code == 0, again.stderr
    first, again = json.loads(first.stdout), json.loads(again.stdout)
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-9)
    assert again["kid"]["mean"] == pytest.approx(first["kid"]["mean"], rel=1e-9)
    assert again["reference"]["kind"] == "statistics"
    one_line_error(run_pds("fid", a, b, "--features", tiny, "--save-stats", stats, "-q"), "exists", "--force")
    assert run_pds("fid", a, b, "--features", tiny, "--save-stats", stats, "--force", "-q").exit_code == 0


def test_bad_inputs_get_one_line(run_pds, tmp_path, tiny):
    a = image_folder(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    one_line_error(run_pds("fid", a, tmp_path / "empty", "--features", tiny), "no images")
    one_line_error(run_pds("fid", a, tmp_path / "missing", "--features", tiny), "no such file")

    mixed = image_folder(tmp_path / "mixed", n=3)
    Image.new("RGB", (20, 20)).save(mixed / "999.png")
    one_line_error(run_pds("fid", a, mixed, "--features", tiny, "-q"), "differ in size", "999.png")

    one_line_error(run_pds("fid", a, image_folder(tmp_path / "big", size=32), "--features", tiny), "16x16", "32x32")

    np.savez(tmp_path / "flat.npz", samples=np.zeros((4, 16, 16), np.float32))
    one_line_error(run_pds("fid", tmp_path / "flat.npz", a, "--features", tiny), "[N, C, H, W]")
    np.savez(tmp_path / "other.npz", images=np.zeros((4, 3, 16, 16), np.float32))
    one_line_error(run_pds("fid", tmp_path / "other.npz", a, "--features", tiny), "no `samples` array")

    one_line_error(run_pds("fid", a, a, "--features", tmp_path / "nope.pt"), "no such feature network", "--features")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "junk.pt")
    one_line_error(run_pds("fid", a, a, "--features", tmp_path / "junk.pt"), "neither")
    one_line_error(run_pds("fid", a, a, "--features", tiny, "--kid-subset-size", "50", "-q"), "--kid-subset-size 50")


def test_statistics_of_another_network_are_refused(run_pds, tmp_path, tiny):
    a = image_folder(tmp_path / "a")
    stats = tmp_path / "a.npz"
    assert run_pds("fid", a, a, "--features", tiny, "--save-stats", stats, "-q").exit_code == 0
    other = save_tiny_features(tmp_path / "other.pt", seed=3)
    one_line_error(run_pds("fid", a, stats, "--features", other, "-q"), "features of different networks")


def test_without_torch_fidelity_pds_fid_says_how_to_install_it(run_pds, tmp_path, monkeypatch):
    a = image_folder(tmp_path / "a")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    one_line_error(run_pds("fid", a, a), 'pip install "pds[eval]"')


def test_a_torch_fidelity_that_cannot_import_gets_one_line(run_pds, tmp_path, monkeypatch):
    # What a CUDA torchvision next to a CPU torch does at import time.
    fake = tmp_path / "site" / "torch_fidelity"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torch_fidelity", raising=False)
    one_line_error(run_pds("fid", image_folder(tmp_path / "a"), tmp_path / "a"), "torchvision::nms", "torchvision built for torch")


# ----------------------------------------------------------------------------------------
# The adapter to torch-fidelity: runs where torch-fidelity imports.


def _torch_fidelity():
    try:
        import torch_fidelity
    except ImportError:
        pytest.skip("torch-fidelity is not installed (the eval extra)")
    except Exception as e:  # e.g. PyPI's CUDA torchvision next to a CPU torch: operator torchvision::nms does not exist
        pytest.skip(f"torch-fidelity does not import here: {type(e).__name__}: {str(e).splitlines()[0]}")
    return torch_fidelity


@pytest.fixture
def random_inception(tmp_path, monkeypatch):
    """A file shaped like torch-fidelity's Inception weights, with random values (nothing downloaded)."""
    m = _torch_fidelity().feature_extractor_inceptionv3
    with monkeypatch.context() as patch:
        patch.setattr(m, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(m.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = m.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    return tmp_path / "inception.pth"


def test_inception_adapter_gives_2048_features_of_uint8_images(random_inception):
    net = open_features(random_inception, CPU)
    out = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert out.shape == (2, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # Not the published weights file: the feature name says so, so its statistics never pass for Inception's.
    assert net.name.startswith(INCEPTION_NAME + "/weights-")


def test_inception_offline_without_a_copy_says_how_to_get_one(run_pds, tmp_path, monkeypatch):
    import urllib.error

    m = _torch_fidelity().feature_extractor_inceptionv3

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(m, "load_state_dict_from_url", offline)
    a = image_folder(tmp_path / "a")
    one_line_error(run_pds("fid", a, a), "cannot get the Inception weights", "--features")


@pytest.mark.slow  # Inception at 299x299: about a minute for 8 images on one busy CPU core
def test_pds_fid_through_the_inception_adapter(run_pds, tmp_path, random_inception):
    a, b = image_folder(tmp_path / "a", n=2, seed=1), image_folder(tmp_path / "b", n=2, shift=60, seed=2)
    same = run_pds("fid", a, a, "--features", random_inception, "--json", "-q", "--batch-size", "2")
    other = run_pds("fid", a, b, "--features", random_inception, "--json", "-q", "--batch-size", "2")
    assert same.exit_code == 0 and other.exit_code == 0, same.stderr + other.stderr
    same, other = json.loads(same.stdout), json.loads(other.stdout)
    assert same["feature_dim"] == 2048 and same["fid"] == pytest.approx(0.0, abs=1e-6)
    assert other["fid"] > same["fid"]


# ----------------------------------------------------------------------------------------
# pds bench's side: FidQuality.


def test_bench_fid_quality_scores_runs_against_one_reference(tmp_path, tiny):
    from pdscli.bench.fid import FidQuality
    from pdscli.bench.render import fid_text

    ref = image_folder(tmp_path / "ref", n=10)
    same = torch.from_numpy(np.concatenate(list(open_image_set(ref).batches(10)))).float() / 255
    q = FidQuality(ref, tiny, (3, 16, 16), CPU)
    assert q.info["count"] == 10 and q.info["features"].startswith("pds-tiny-features/")
    r = q.measure(same)
    assert r["fid"] == pytest.approx(0.0, abs=1e-9) and r["samples_count"] == 10 and r["kid"]["subset_size"] == 10
    noisy = q.measure((same + 0.3 * torch.rand_like(same)).clamp(0, 1))
    assert noisy["fid"] > 1e-4 and fid_text(noisy).startswith(f"{noisy['fid']:.3g} / ")
    bad = q.measure(torch.full((2, 3, 16, 16), float("nan")))
    assert bad["fid"] is None and fid_text(bad) == "samples not finite"
    with pytest.raises(PdsError, match="16x16"):
        FidQuality(ref, tiny, (3, 32, 32), CPU)


# ----------------------------------------------------------------------------------------
# pds bench --fid-ref.


def test_bench_puts_fid_beside_each_sampling_run(run_pds, fixture_dir, tmp_path, tiny):

    ref = image_folder(tmp_path / "ref", n=12)
    out = tmp_path / "bench.json"
    r = run_pds("bench", "--config", tiny_network_config(fixture_dir, tmp_path), "--random-weights", *QUICK,
                "--batch-sizes", "2", "--skip", "nfe,overhead", "--full-steps", "4", "--samplers", "ddim", "--nfe", "4",
                "--quality-samples", "6",
                "--fid-ref", ref, "--fid-features", tiny, "--out", out)
    assert r.exit_code == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["fid"]["count"] == 12 and report["fid"]["kind"] == "folder"
    assert report["fid"]["features"].startswith("pds-tiny-features/") and "small sample counts" in report["fid"]["note"]
    e2e, rows = report["end_to_end"], report["samplers"]["rows"]
    for run in [*e2e["runs"], *rows]:
        f = run["fid"]
        assert f["fid"] >= 0 and f["samples_count"] == e2e["samples"] == 6 and f["reference_count"] == 12
        assert f["kid"]["subset_size"] == 6 and f["kid"]["std"] >= 0
    assert "FID / KID" in r.stdout and str(ref) in r.stdout  # the column, and the line saying against what


def test_bench_fid_ref_bad_inputs_get_one_line(run_pds, tmp_path, tiny, monkeypatch):
    ref = image_folder(tmp_path / "ref", n=4)
    one_line_error(run_pds("bench", "--model", "gaussian", "--quick", "--fid-ref", ref, "--fid-features", tiny),
                      "--fid-ref needs a network model")
    one_line_error(run_pds("bench", "--quick", "--fid-ref", tmp_path / "nope"), "no such file or folder")
    one_line_error(run_pds("bench", "--quick", "--fid-features", tiny), "--fid-features applies with --fid-ref")
    # The built-in digits are 16x16 and grey; a reference at another size is refused before any timing.
    big = image_folder(tmp_path / "big", n=4, size=32)
    one_line_error(run_pds("bench", "--quick", "-q", "--fid-ref", big, "--fid-features", tiny), "16x16", "32x32")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed: said before the model loads
    one_line_error(run_pds("bench", "--quick", "--fid-ref", ref), 'pip install "pds[eval]"')


def test_sixteen_bit_images_are_read_by_their_own_white(tmp_path):
    """FID reads images as every pds command does: mid-grey 16-bit is 128, not a saturated 255."""
    from PIL import Image

    from pdscli.evaluate.imagesets import _read_rgb

    Image.fromarray(np.full((4, 5), 32768, dtype=np.uint16)).save(tmp_path / "grey16.png")
    rgb = np.arange(60, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(rgb).save(tmp_path / "rgb8.png")
    assert _read_rgb(tmp_path / "grey16.png").tolist() == np.full((3, 4, 5), 128, dtype=np.uint8).tolist()
    assert np.array_equal(_read_rgb(tmp_path / "rgb8.png"), rgb.transpose(2, 0, 1))
