"""`pds fid` against damaged or hostile inputs: statistics files, samples.npz headers, feature files
(docs/reliability.md)."""

from __future__ import annotations

import io
import sys
import zipfile
from fractions import Fraction

import numpy as np
import pytest
import torch

from pdscli.evaluate import compare as C
from pdscli.evaluate.features import save_tiny_features

from conftest import image_folder, one_line_error


@pytest.fixture
def tiny(tmp_path):
    return save_tiny_features(tmp_path / "tiny.pt")


def good_stats(run_pds, tmp_path, tiny):
    path = tmp_path / "ref.npz"
    r = run_pds("fid", image_folder(tmp_path / "a"), image_folder(tmp_path / "b", seed=1), "--features", tiny,
                "--save-stats", path, "-q")
    assert r.exit_code == 0, r.stderr
    with np.load(path) as z:
        return path, {k: z[k] for k in z.files}


def _nan(d):
    d["sigma"][0, 0] = np.nan


def _inf_mu(d):
    d["mu"][1] = np.inf


def _asymmetric(d):
    d["sigma"][0, 1] += 1.0


def _negative(d):
    d["sigma"] = d["sigma"] - 10.0 * np.eye(len(d["sigma"])) * np.abs(d["sigma"]).max()


def _count(d):
    d["count"] = np.array(1)


def _shape(d):
    d["mu"] = d["mu"][:3]


def _nan_kid(d):
    d["kid_features"][0, 0] = np.nan


@pytest.mark.parametrize("damage, needle", [
    (_nan, "sigma holds NaN"), (_inf_mu, "mu holds NaN or infinite"), (_asymmetric, "not symmetric"),
    (_negative, "not positive semi-definite"), (_count, "count 1"), (_shape, "inconsistent"),
    (_nan_kid, "kid_features holds NaN"),
], ids=["nan-sigma", "inf-mu", "asymmetric", "negative", "count", "shape", "nan-kid"])
def test_a_damaged_statistics_file_is_one_line(run_pds, tmp_path, tiny, damage, needle):
    path, data = good_stats(run_pds, tmp_path, tiny)
    damage(data)
    np.savez(path, **data)
    r = run_pds("fid", tmp_path / "a", path, "--features", tiny, "-q")
    one_line_error(r, str(path), needle)


def test_a_samples_npz_header_that_claims_more_than_the_file_holds_is_one_line(run_pds, tmp_path, tiny):
    x = np.random.default_rng(0).uniform(size=(4, 3, 16, 16)).astype(np.float32)
    buf = io.BytesIO()
    np.lib.format.write_array_header_2_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3, 16, 16)})
    with zipfile.ZipFile(tmp_path / "samples.npz", "w") as zf:
        zf.writestr("samples.npy", buf.getvalue() + x.tobytes())
    r = run_pds("fid", tmp_path / "samples.npz", image_folder(tmp_path / "a"), "--features", tiny, "-q")
    one_line_error(r, "1000000000000 samples", "about 4 samples", "damaged or truncated")


def test_feature_batches_are_bounded_by_memory(tmp_path, tiny, monkeypatch):
    x = np.random.default_rng(0).uniform(size=(7, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "samples.npz", samples=x)
    seen = []
    from pdscli.evaluate.features import open_features

    net = open_features(tiny, torch.device("cpu"))
    inner = net.__call__

    class Spy:
        name, dim, device = net.name, net.dim, net.device

        def __call__(self, images):
            seen.append(len(images))
            return inner(images)

    per_image = 16 * 16 * (3 * 4 + 3)
    monkeypatch.setattr(C, "BATCH_BYTES", 2 * per_image + 1)
    small = C.compare(tmp_path / "samples.npz", tmp_path / "samples.npz", Spy(), batch_size=64)
    assert seen and max(seen) == 2 and sum(seen) == 14  # 64 asked, two images' worth of memory allowed
    monkeypatch.setattr(C, "BATCH_BYTES", 1 << 30)
    assert C.compare(tmp_path / "samples.npz", tmp_path / "samples.npz", net, batch_size=64)["fid"] == small["fid"]


def test_a_pickled_feature_file_is_one_line_without_torchs_advice(run_pds, tmp_path):
    torch.save({"w": torch.zeros(2), "note": Fraction(1, 2)}, tmp_path / "pickled.pt")
    a = image_folder(tmp_path / "a")
    r = run_pds("fid", a, a, "--features", tmp_path / "pickled.pt", "-q")
    one_line_error(r, "fractions.Fraction", "weights_only=True")
    assert "weights_only=False" not in r.stderr and "\x1b" not in r.stderr


def test_inputs_are_checked_before_torch_fidelity_is_looked_for(run_pds, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    a = image_folder(tmp_path / "a")
    one_line_error(run_pds("fid", a, tmp_path / "missing"), "no such file", "missing")
