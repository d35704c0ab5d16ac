"""Absurd sizes in a config or a flag are refused before anything is allocated (docs/reliability.md)."""

from __future__ import annotations

import json

import pytest
from test_diffusers_inputs import edited, exported  # noqa: F401 (a fixture)
from test_sample_cli import assert_user_error

SMALL = ("--model", "gaussian", "--image-size", "8", "--quiet")


@pytest.mark.parametrize("flags, needle", [
    (("--steps", "1000000000"), "--steps 1,000,000,000"), (("--nfe", "1000000000"), "--nfe 1,000,000,000"),
    (("--steps", "5", "--num-scales", "1000000000000"), "--num-scales"),
], ids=["steps", "nfe", "num-scales"])
def test_step_counts_beyond_a_million_are_refused(run_pds, tmp_path, flags, needle):
    assert_user_error(run_pds("sample", *SMALL, *flags, "--out", tmp_path / "o"), needle, "at most 1,000,000")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("field, value, needle", [
    ("num_scales", 10**12, "model.num_scales gives 1,000,000,000,000"),
    ("num_res_blocks", 100000, "model.num_res_blocks gives 100,000"),
    ("nf", 10**6, "channels"),
])
def test_absurd_score_sde_config_sizes_are_refused(run_pds, tmp_path, fixture_dir, field, value, needle):
    cfg = json.loads((fixture_dir / "config.json").read_text())
    cfg["model"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_pds("info", fixture_dir / "checkpoint.pth", "--config", tmp_path / "config.json"), needle)


def test_an_image_size_whose_activations_cannot_fit_is_refused_before_the_load(run_pds, tmp_path, exported):  # noqa: F811
    folder = edited(exported, tmp_path / "m", unet={"sample_size": 100000})
    r = run_pds("sample", "--checkpoint", folder, "-n", "1", "--steps", "2", "--out", tmp_path / "o", "--device", "cpu")
    assert_user_error(r, "100000x100000", "GiB of activations")
