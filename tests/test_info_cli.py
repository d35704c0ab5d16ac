"""`pds info`: the report, and one test per bad input (message and exit code 2)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math

import pytest
import torch

from conftest import one_line_error


@pytest.fixture(scope="module")
def ckpt(fixture_dir):
    return fixture_dir / "checkpoint.pth"


@pytest.fixture(scope="module")
def config(fixture_dir):
    return fixture_dir / "config.json"


@pytest.fixture
def state(ckpt):
    """The fixture checkpoint's contents, to damage."""
    return torch.load(ckpt, weights_only=True)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_shows_examples(run_pds):
    r = run_pds("info", "--help")
    assert r.exit_code == 0 and "Example" in r.stdout


def test_report(run_pds, ckpt, config, fixture_dir):
    r = run_pds("info", ckpt, "--config", config)
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((fixture_dir / "state_dict_manifest.json").read_text())
    params = sum(math.prod(e["shape"]) for e in manifest if e["key"] != "module.sigmas")
    out = " ".join(r.stdout.split())
    assert f"{params:,}" in out
    assert "EMA" in out and "snr" in out
    assert _sha256(ckpt)[:40] in r.stdout.replace("\n", "").replace(" ", "")


def test_json_report(run_pds, ckpt, config):
    r = run_pds("info", ckpt, "--config", config, "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    cfg = json.loads(config.read_text())
    assert report["weights"] == "ema" and report["sha256"] == _sha256(ckpt)
    settings = report["settings"]
    assert settings["sigma_max"] == cfg["model"]["sigma_max"] and settings["sigma_min"] == cfg["model"]["sigma_min"]
    assert settings["num_scales"] == cfg["model"]["num_scales"] and settings["snr"] == cfg["sampling"]["snr"]
    assert report["model"]["nf"] == cfg["model"]["nf"]


def test_raw_weights(run_pds, ckpt, config):
    r = run_pds("info", ckpt, "--config", config, "--json", "--raw-weights")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["weights"] == "raw"


def test_partial_config_falls_back_to_the_preset(run_pds, ckpt, config, tmp_path):
    # The fixture is FFHQ-1024 with a smaller network: only those fields need saying.
    cfg = json.loads(config.read_text())
    changed = {"model": {k: cfg["model"][k] for k in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions")},
               "data": {"image_size": cfg["data"]["image_size"]}}
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(changed))
    r = run_pds("info", ckpt, "--config", partial, "--preset", "ffhq-1024", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["preset"] == "ffhq-1024"

    one_line_error(run_pds("info", ckpt, "--config", partial), "lacks", "model.sigma_max", "--preset")


# ---- bad inputs ----


def test_wrong_config(run_pds, ckpt):
    one_line_error(run_pds("info", ckpt, "--preset", "cifar10"), "does not fit config preset:cifar10",
                      "in the file but", "matches no preset")


def test_unknown_preset(run_pds, ckpt):
    one_line_error(run_pds("info", ckpt, "--preset", "cifar"), "unknown preset 'cifar'")


def test_missing_file(run_pds, tmp_path, config):
    one_line_error(run_pds("info", tmp_path / "nope.pth", "--config", config), "not found")


def test_truncated_file(run_pds, ckpt, config, tmp_path):
    path = tmp_path / "truncated.pth"
    data = ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    one_line_error(run_pds("info", path, "--config", config), "truncated or corrupt")


def test_not_a_checkpoint(run_pds, config, tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights\n")
    one_line_error(run_pds("info", path, "--config", config), "not a PyTorch checkpoint")


def test_checkpoint_of_something_else(run_pds, config, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"epoch": 3, "weights": [1, 2]}, path)
    one_line_error(run_pds("info", path, "--config", config), "neither a score_sde checkpoint", "nor a state_dict",
                      "top-level keys: epoch, weights")


def test_wrong_ema_length(run_pds, state, config, tmp_path):
    state["ema"]["shadow_params"].pop()
    path = tmp_path / "short_ema.pth"
    torch.save(state, path)
    n = len(state["ema"]["shadow_params"])
    one_line_error(run_pds("info", path, "--config", config), f"the EMA holds {n} tensors", f"{n + 1} trainable")


def test_needs_unpickling(run_pds, state, config, tmp_path):
    state["args"] = argparse.Namespace(lr=2e-4)
    path = tmp_path / "pickled.pth"
    torch.save(state, path)
    one_line_error(run_pds("info", path, "--config", config), "argparse.Namespace", "--trust-checkpoint")
    r = run_pds("info", path, "--config", config, "--trust-checkpoint")
    assert r.exit_code == 0, r.stderr


def test_no_config_for_an_unknown_network(run_pds, ckpt):
    one_line_error(run_pds("info", ckpt), "fits no preset", "--config")
