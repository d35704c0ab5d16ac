"""Ctrl-C in every command and during start-up: `interrupted` on stderr, exit 130, no traceback;
a second Ctrl-C while `pds sample` ends changes nothing (docs/reliability.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import image_folder


def assert_interrupted(code: int, stderr: str) -> None:
    assert code == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith("interrupted"), stderr


def _raise(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["info", "bench", "fid"])
def test_ctrl_c_in_a_command_says_interrupted(run_pds, tmp_path, fixture_dir, monkeypatch, command):
    if command == "info":
        monkeypatch.setattr("pdscli.models.diffusers.looks_like_diffusers", _raise)  # inside the checkpoint load
        r = run_pds("info", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json")
    elif command == "bench":
        monkeypatch.setattr("pdscli.bench.model.GaussianImageModel", _raise)  # while the model opens
        r = run_pds("bench", "--model", "gaussian", "--image-size", "8", "--quick", "--threads", "1", "--quiet")
    else:
        from pdscli.evaluate.features import save_tiny_features

        monkeypatch.setattr("pdscli.evaluate.compare.statistics", _raise)  # while the features are computed
        a = image_folder(tmp_path / "a")
        r = run_pds("fid", a, a, "--features", save_tiny_features(tmp_path / "t.pt"), "--quiet")
    assert_interrupted(r.exit_code, r.stderr)


STARTUP = r"""
import builtins
real_import = builtins.__import__

def interrupted_import(name, *args, **kwargs):
    if name == "torch":  # Ctrl-C while the command line imports its libraries
        raise KeyboardInterrupt
    return real_import(name, *args, **kwargs)

builtins.__import__ = interrupted_import
from pdscli.cli import main
main(["info", "--help"])
"""


def test_ctrl_c_during_start_up_says_interrupted():
    proc = subprocess.run([sys.executable, "-c", STARTUP], capture_output=True, text=True, timeout=300)
    assert_interrupted(proc.returncode, proc.stderr)


TWICE = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job starts with it ignored)
import pdscli.evaluate.analytic as analytic
from pdscli.sample import outputs

real_model, real_listing = analytic.gaussian_score_model, outputs.indices_on_disk
calls = {"score": 0, "listing": 0}

def model(*args, **kwargs):
    m = real_model(*args, **kwargs)
    exact = m.score

    def score(x, sigma):
        calls["score"] += 1
        if calls["score"] == 12:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C, in the middle of a batch
        return exact(x, sigma)

    m.score = score
    return m

def listing(out):
    os.kill(os.getpid(), signal.SIGINT)  # the second, while the run counts what it wrote
    return real_listing(out)

analytic.gaussian_score_model = model
outputs.indices_on_disk = listing
from pdscli.cli import main
main(sys.argv[1:])
"""


def test_a_second_ctrl_c_while_sample_ends_changes_nothing(tmp_path):
    args = ["sample", "--model", "gaussian", "--image-size", "8", "--steps", "5", "-n", "6", "-b", "2", "--quiet",
            "--out", str(tmp_path / "o")]
    proc = subprocess.run([sys.executable, "-c", TWICE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_interrupted(proc.returncode, proc.stderr)
    assert "images written; rerun with --resume" in proc.stderr
