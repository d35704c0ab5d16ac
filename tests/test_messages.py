"""Messages that named the wrong thing or leaked another library's text (docs/reliability.md)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from conftest import one_line_error
from PIL import Image


def test_an_nfe_too_small_for_the_picked_sampler_says_pds_picked_it(run_pds, tmp_path):
    line = one_line_error(run_pds("sample", "--model", "gaussian", "--image-size", "8", "--nfe", "1",
                                  "--out", tmp_path / "o", "--quiet"), "--nfe 1", "pds picks without --sampler")
    assert "too small for dpm++2m" not in line  # as if the user had chosen it
    chosen = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--nfe", "1", "--sampler", "dpm++2m",
                     "--out", tmp_path / "p", "--quiet")
    one_line_error(chosen, "--nfe 1 is too small for dpm++2m")  # named by the user: named back


def test_pillow_warnings_do_not_reach_the_terminal(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).convert("P").save(
        imgs / "palette.png", transparency=bytes(10))  # transparency as bytes: Pillow warns on conversion
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(imgs / "rgb.png")
    # A real process: pytest would catch the warnings itself.
    r = subprocess.run([sys.executable, "-m", "pdscli", "filters", str(imgs), "--size", "8", "--out",
                        str(tmp_path / "m.npz"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr, r.stderr
