"""`pds sample`'s output folder against planted links, concurrent runs and --resume that would mix
two runs (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import one_line_error

SMALL = ("--model", "gaussian", "--image-size", "8", "--steps", "5", "--quiet")


def sample(run_pds, out, *args):
    return run_pds("sample", *SMALL, "--out", out, *args)


def pngs(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("[0-9]*.png"))}


def same_run(a, b) -> bool:
    with np.load(a / "samples.npz") as za, np.load(b / "samples.npz") as zb:
        floats = np.array_equal(za["samples"], zb["samples"])
    return pngs(a) == pngs(b) and floats and (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()


# ---------------------------------------------------------------------------- planted links


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(run_pds, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    out = tmp_path / "o"
    out.mkdir()
    (out / ".pds-lock").symlink_to(notes)
    one_line_error(sample(run_pds, out, "-n", "2"), ".pds-lock", "symbolic link")
    assert notes.read_text() == "mine\n"
    os.rename(out / ".pds-lock", out / "old-link")
    (out / ".pds-lock").symlink_to(tmp_path / "created-outside")  # a link to nothing: must not create it
    one_line_error(sample(run_pds, out, "-n", "2", "--force"), ".pds-lock")
    assert not (tmp_path / "created-outside").exists()


def test_a_lock_file_that_is_a_folder_is_one_line(run_pds, tmp_path):
    out = tmp_path / "o"
    (out / ".pds-lock").mkdir(parents=True)
    one_line_error(sample(run_pds, out, "-n", "2"), ".pds-lock", "not a regular file")


def test_a_partial_folder_that_is_a_link_is_never_written_through(run_pds, tmp_path):
    out, elsewhere = tmp_path / "o", tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert sample(run_pds, out, "-n", "3", "-b", "1").exit_code == 0
    for name in ("000002.png", "samples.npz", "grid.png", "run.json"):
        (out / name).unlink()
    (out / ".partial").symlink_to(elsewhere)
    one_line_error(sample(run_pds, out, "-n", "3", "-b", "1", "--resume"), ".partial", "symbolic link")
    assert list(elsewhere.iterdir()) == []
    r = sample(run_pds, out, "-n", "3", "-b", "1", "--force")  # --force removes the link, not what it points to
    assert r.exit_code == 0, r.stderr
    assert list(elsewhere.iterdir()) == [] and elsewhere.is_dir()


def test_a_folder_under_a_sample_name_is_refused_not_removed(run_pds, tmp_path):
    out = tmp_path / "o"
    assert sample(run_pds, out, "-n", "2").exit_code == 0
    (out / "000001.png").unlink()
    (out / "000001.png").mkdir()
    (out / "000001.png" / "photo.jpg").write_text("mine")
    one_line_error(sample(run_pds, out, "-n", "2", "--resume"), "000001.png", "not a regular file")
    one_line_error(sample(run_pds, out, "-n", "2", "--force"), "000001.png", "not a regular file")
    assert (out / "000001.png" / "photo.jpg").read_text() == "mine"


# ---------------------------------------------------------------------------- concurrent runs

PAUSED_LOAD = r"""
import sys, time
from pathlib import Path
import pdscli.sample.setup as setup

real_open_model = setup.open_model

def open_model(spec):
    # A slow model load: say it has begun, then wait for the test's go-ahead.
    Path(sys.argv[1]).touch()
    deadline = time.time() + 120
    while not Path(sys.argv[2]).exists() and time.time() < deadline:
        time.sleep(0.02)
    return real_open_model(spec)

setup.open_model = open_model
from pdscli.cli import main
main(sys.argv[3:])
"""


@pytest.mark.slow  # a second process starts torch
@pytest.mark.parametrize("second", [(), ("--force",), ("--resume",)], ids=["fresh", "force", "resume"])
def test_a_run_started_during_another_runs_model_load_is_refused(run_pds, tmp_path, second):
    first_args = ["sample", *SMALL, "-n", "4", "-b", "2", "--seed", "1", "--threads", "1"]
    assert run_pds(*first_args, "--out", tmp_path / "ref").exit_code == 0
    out, loading, go = tmp_path / "o", tmp_path / "loading", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-c", PAUSED_LOAD, str(loading), str(go), *first_args, "--out", str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not loading.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert loading.exists(), first.communicate()[1]
        # The second run starts and would finish inside the first's model load.
        r = run_pds("sample", *SMALL, "-n", "3", "-b", "3", "--seed", "2", "--out", out, *second)
        one_line_error(r, "in use by another pds sample run", f"pid {first.pid}")
    finally:
        go.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert same_run(out, tmp_path / "ref")  # the first run's files only
    record = json.loads((out / "run.json").read_text())
    assert (record["seed"], record["num_samples"]) == (1, 4)


# ---------------------------------------------------------------------------- --resume and seeds


def test_resume_with_another_precision_is_refused_naming_the_flag(run_pds, tmp_path, fixture_dir):
    common = ("sample", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
              "--steps", "2", "-n", "2", "-b", "1", "--quiet", "--device", "cpu", "--out", tmp_path / "o")
    assert run_pds(*common, "--precision", "bf16").exit_code == 0
    (tmp_path / "o" / "000001.png").unlink()
    before = pngs(tmp_path / "o")
    one_line_error(run_pds(*common, "--resume"), "precision 'bf16' -> 'fp32' (--precision)")
    one_line_error(run_pds(*common, "--resume", "--precision", "fp16"), "--precision")
    assert pngs(tmp_path / "o") == before
    r = run_pds(*common, "--resume", "--precision", "bf16")
    assert r.exit_code == 0, r.stderr


def test_seeds_beyond_the_generators_64_bits_are_refused(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "a", "-n", "1", "--seed", str(2**64)), "--seed", str(2**64 - 1))
    assert not (tmp_path / "a").exists()
    assert sample(run_pds, tmp_path / "b", "-n", "1", "--seed", str(2**64 - 1)).exit_code == 0
    assert sample(run_pds, tmp_path / "c", "-n", "1", "--seed", "0").exit_code == 0
    assert pngs(tmp_path / "b") != pngs(tmp_path / "c")


def test_resume_in_a_folder_without_a_run_record_is_refused(run_pds, tmp_path):
    made = tmp_path / "made"
    assert sample(run_pds, made, "-n", "1", "--seed", "9").exit_code == 0
    out = tmp_path / "o"
    out.mkdir()
    (out / "000000.png").write_bytes((made / "000000.png").read_bytes())  # a PNG no run here made
    one_line_error(sample(run_pds, out, "-n", "2", "--resume"), "no run record", "--force")
    assert sorted(p.name for p in out.iterdir()) == [".pds-lock", "000000.png"]  # the lock file stays (fsutil)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sample(run_pds, empty, "-n", "1", "--resume").exit_code == 0  # nothing to mix: it simply runs
