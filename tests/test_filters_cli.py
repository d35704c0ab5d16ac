"""`pds filters` through the CLI: files written, sizes from a model, and bad inputs (exit 2, one line)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from pdscli.precondition import load_filters

from conftest import full_disk_at, one_line_error, tiny_onnx


def image_dir(path, n=4, size=10):
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_filters_writes_npz_preview_and_npy(run_pds, tmp_path):
    data = image_dir(tmp_path / "faces")
    out = tmp_path / "m" / "faces.npz"
    r = run_pds("filters", data, "--size", "8", "--out", out, "--npy", "--quiet")
    assert r.exit_code == 0, r.stderr
    f = load_filters(out)
    assert f.shape == (3, 8, 8) and f.count == 4 and f.source == str(data)
    assert (tmp_path / "m" / "faces.png").is_file()
    assert np.load(tmp_path / "m" / "faces" / "freq_mask.npy").shape == (3, 8, 8)
    assert np.load(tmp_path / "m" / "faces" / "space_mask.npy").shape == (3, 8, 8)
    assert str(out) in r.stdout


def test_a_sample_folders_grid_is_not_one_of_its_images(run_pds, tmp_path):
    # `pds filters` on what `pds sample` wrote: the mosaic grid.png is no sample.
    out = tmp_path / "own"
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "-n", "3", "-b", "3", "--sampler", "dpm++2m",
                "--steps", "3", "--out", out, "--quiet")
    assert r.exit_code == 0, r.stderr
    assert (out / "grid.png").is_file()
    r = run_pds("filters", out, "--size", "8", "--out", tmp_path / "f.npz", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert load_filters(tmp_path / "f.npz").count == 3
    plain = image_dir(tmp_path / "plain", n=2, size=8)
    (plain / "grid.png").write_bytes((plain / "0.png").read_bytes())  # no run.json: an ordinary image
    r = run_pds("filters", plain, "--size", "8", "--out", tmp_path / "g.npz", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert load_filters(tmp_path / "g.npz").count == 3


def test_default_output_is_masks_folder_size(run_pds, tmp_path, monkeypatch):
    data = image_dir(tmp_path / "church")
    monkeypatch.chdir(tmp_path)
    r = run_pds("filters", data, "--size", "8", "--channels", "1", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["files"]["npz"] == "masks/church-8.npz" and summary["channels"] == 1
    assert load_filters(tmp_path / "masks" / "church-8.npz").shape == (1, 8, 8)


def test_the_filters_feed_pds_sample(run_pds, tmp_path):
    data = image_dir(tmp_path / "d")
    masks = tmp_path / "d.npz"
    assert run_pds("filters", data, "--size", "8", "--out", masks, "--quiet").exit_code == 0
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", "3", "-n", "1",
                "--masks", masks, "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.stderr


def test_size_from_an_engine(run_pds, tmp_path):
    data = image_dir(tmp_path / "d")
    engine = tiny_onnx(tmp_path / "t.onnx", size=8)
    r = run_pds("filters", data, "--engine", engine, "--out", tmp_path / "f.npz", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert load_filters(tmp_path / "f.npz").size == 8


def test_size_is_required_without_a_model(run_pds, tmp_path):
    one_line_error(run_pds("filters", image_dir(tmp_path / "d")), "--size")


def test_empty_folder(run_pds, tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(run_pds("filters", tmp_path / "empty", "--size", "8", "--out", tmp_path / "f.npz"), "no images")
    assert not (tmp_path / "f.npz").exists()


def test_folder_of_corrupt_images(run_pds, tmp_path):
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.png").write_bytes(b"\x89PNG truncated")
    r = run_pds("filters", tmp_path / "bad", "--size", "8", "--out", tmp_path / "f.npz", "--quiet")
    one_line_error(r, "none of the 3 image files")


def test_some_corrupt_images_warn_and_go_on(run_pds, tmp_path):
    data = image_dir(tmp_path / "d")
    (data / "zz.png").write_bytes(b"junk")
    r = run_pds("filters", data, "--size", "8", "--out", tmp_path / "f.npz", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 unreadable file(s) of 5: zz.png" in r.stderr
    assert load_filters(tmp_path / "f.npz").count == 4


def test_existing_output_needs_force(run_pds, tmp_path):
    data = image_dir(tmp_path / "d")
    out = tmp_path / "f.npz"
    out.write_bytes(b"keep me")
    one_line_error(run_pds("filters", data, "--size", "8", "--out", out, "--quiet"), "--force")
    assert out.read_bytes() == b"keep me"
    assert run_pds("filters", data, "--size", "8", "--out", out, "--quiet", "--force").exit_code == 0


def test_unwritable_output(run_pds, tmp_path):
    data = image_dir(tmp_path / "d")
    (tmp_path / "file").write_text("x")
    one_line_error(run_pds("filters", data, "--size", "8", "--out", tmp_path / "file" / "f.npz"), "cannot create folder")


def test_bad_numbers(run_pds, tmp_path):
    data = image_dir(tmp_path / "d")
    one_line_error(run_pds("filters", data, "--size", "0", "--out", tmp_path / "f.npz"), "--size")
    one_line_error(run_pds("filters", data, "--size", "8", "--channels", "2", "--out", tmp_path / "f.npz"), "--channels")
    one_line_error(run_pds("filters", data, "--size", "8", "--out", tmp_path / "f.txt"), ".npz")
    one_line_error(run_pds("filters", data, "--size", "8", "--workers", "0", "--out", tmp_path / "f.npz"), "--workers")
    one_line_error(run_pds("filters", data, "--size", "8", "--limit", "0", "--out", tmp_path / "f.npz"), "--limit")


def _no_decoding(monkeypatch):
    from pdscli.precondition import filters as lib

    def decode(*a, **k):
        raise AssertionError("images were decoded before the outputs were checked")

    monkeypatch.setattr(lib, "folder_statistics", decode)


def test_existing_npy_outputs_are_refused_before_any_image_is_decoded(run_pds, tmp_path, monkeypatch):
    data = image_dir(tmp_path / "d")
    out = tmp_path / "m" / "f.npz"
    (tmp_path / "m" / "f").mkdir(parents=True)
    (tmp_path / "m" / "f" / "space_mask.npy").write_bytes(b"keep me")
    _no_decoding(monkeypatch)
    one_line_error(run_pds("filters", data, "--size", "8", "--out", out, "--npy", "--quiet"), "space_mask.npy", "--force")
    assert (tmp_path / "m" / "f" / "space_mask.npy").read_bytes() == b"keep me"


def test_an_output_path_that_is_a_folder_is_refused_before_the_work(run_pds, tmp_path, monkeypatch):
    data = image_dir(tmp_path / "d")
    (tmp_path / "f.npz").mkdir()
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "freq_mask.npy").mkdir()
    _no_decoding(monkeypatch)
    one_line_error(run_pds("filters", data, "--size", "8", "--out", tmp_path / "f.npz", "--force", "-q"), "is a folder")
    (tmp_path / "f.npz").rmdir()
    one_line_error(run_pds("filters", data, "--size", "8", "--out", tmp_path / "f.npz", "--npy", "--force", "-q"),
                      "freq_mask.npy", "is a folder")


def test_a_full_disk_is_one_line_and_leaves_no_output(run_pds, tmp_path, monkeypatch):
    data = image_dir(tmp_path / "d")
    out = tmp_path / "m" / "f.npz"

    full_disk_at(monkeypatch, ".npy")  # the last files of the set
    one_line_error(run_pds("filters", data, "--size", "8", "--out", out, "--npy", "--quiet"), "no space left")
    assert [p for p in tmp_path.joinpath("m").rglob("*") if p.is_file()] == []


def test_json_is_one_document_on_stdout(run_pds, tmp_path):
    data = image_dir(tmp_path / "d")
    r = run_pds("filters", data, "--size", "8", "--out", tmp_path / "f.npz", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["count"] == 4 and doc["files"]["npz"] == str(tmp_path / "f.npz")
