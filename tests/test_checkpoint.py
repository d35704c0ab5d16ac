"""Checkpoints: the reference fixture's numbers, the score_sde layout both ways, and every bad input."""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

import pdscli
from pdscli.models.checkpoint import (
    load_score_model,
    matching_presets,
    open_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from pdscli.errors import PdsError
from pdscli.models import build_model, get_preset
from pdscli.models.ncsnpp import sigma_ladder


@pytest.fixture(scope="module")
def io(fixture_dir):
    return {k: torch.from_numpy(v) for k, v in np.load(fixture_dir / "reference_io.npz").items()}


@pytest.fixture(scope="module")
def manifest(fixture_dir):
    return json.loads((fixture_dir / "state_dict_manifest.json").read_text())


def _load(fixture_dir, **kwargs):
    return load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json", **kwargs)


def assert_matches(out: torch.Tensor, ref: torch.Tensor):
    """The fixture README's bound for a float32 CPU reimplementation."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= tol


def record_outputs(model, indices) -> dict:
    """{index: output of all_modules[index] in the first forward pass}, via forward hooks."""
    outputs = {}

    def hook(index):
        def record(module, inputs, output):
            outputs.setdefault(index, output)  # returns None: a hook's return value would replace the output

        return record

    for index in indices:
        model.all_modules[index].register_forward_hook(hook(index))
    return outputs


# ---- the reference's numbers ----


def test_ema_weights_reproduce_the_reference(fixture_dir, io):
    model = _load(fixture_dir)
    captured = record_outputs(model, [0, 2])
    with torch.no_grad():
        assert_matches(model(io["x"], io["sigmas"]), io["model_out"])
        assert_matches(model(io["x_ext"], io["sigmas_ext"]), io["model_out_ext"])
        # The reference continuous VE score function passes its float32 sigma(t) to the net.
        assert_matches(model(io["x"], io["score_sigma"]), io["score_out"])
    assert_matches(captured[0], io["fourier_emb"])
    assert_matches(captured[2], io["temb"])

    model.scale_by_sigma = False
    with torch.no_grad():
        assert_matches(model(io["x"], io["sigmas"]), io["model_out_unscaled"])


def test_raw_weights_reproduce_the_reference(fixture_dir, io):
    model = _load(fixture_dir, weights="raw")
    assert model.checkpoint_info["weights"] == "raw"
    with torch.no_grad():
        assert_matches(model(io["x"], io["sigmas"]), io["model_out_raw"])


def test_every_module_matches_the_reference_intermediates(fixture_dir, io):
    ref = np.load(fixture_dir / "intermediates.npz")
    model = _load(fixture_dir)
    outputs = record_outputs(model, range(len(model.all_modules)))
    with torch.no_grad():
        model(io["x"], io["sigmas"])
    assert len(ref.files) == len(model.all_modules) == len(outputs)
    for name in ref.files:
        assert_matches(outputs[int(name[1:4])], torch.from_numpy(ref[name]))


def test_model_attributes(fixture_dir, manifest):
    model = _load(fixture_dir)
    config = json.loads((fixture_dir / "config.json").read_text())
    info = model.checkpoint_info
    assert not model.training
    assert model.config["model"]["nf"] == config["model"]["nf"]
    assert model.settings.sigma_max == config["model"]["sigma_max"]
    assert model.settings.num_scales == config["model"]["num_scales"]
    assert info["sha256"] == hashlib.sha256((fixture_dir / "checkpoint.pth").read_bytes()).hexdigest()
    assert info["weights"] == "ema" and info["layout"] == "score_sde" and info["step"] == 0
    expected_params = sum(math.prod(e["shape"]) for e in manifest if e["key"] != "module.sigmas")
    assert info["num_params"] == expected_params
    # sigmas and W come from "model": the ladder is the file's, float64.
    raw = torch.load(fixture_dir / "checkpoint.pth", weights_only=True)
    assert torch.equal(model.sigmas, raw["model"]["module.sigmas"])
    assert torch.equal(model.all_modules[0].W, raw["model"]["module.all_modules.0.W"])


def test_lazy_top_level_export():
    assert pdscli.load_score_model is load_score_model


def test_open_checkpoint_gives_a_score_model(fixture_dir, io):
    sm = open_checkpoint(fixture_dir / "checkpoint.pth", fixture_dir / "config.json", device="cpu")
    assert sm.name == "checkpoint:checkpoint.pth"
    assert sm.sha256 == hashlib.sha256((fixture_dir / "checkpoint.pth").read_bytes()).hexdigest()
    assert sm.info["weights"] == "ema" and sm.info["precision"] == "fp32"
    assert sm.settings.image_size == io["x"].shape[-1]
    assert_matches(sm.score(io["x"], io["sigmas"]), io["model_out"])


# ---- writing and reading back ----


def test_save_writes_the_score_sde_layout(fixture_dir, manifest, tmp_path, io):
    model = _load(fixture_dir, weights="raw")
    raw = read_checkpoint(fixture_dir / "checkpoint.pth")
    path = tmp_path / "out.pth"
    save_checkpoint(path, model, ema_params=raw.ema, step=7)

    saved = torch.load(path, weights_only=True)
    assert list(saved) == ["optimizer", "model", "ema", "step"] and saved["step"] == 7
    assert [k for k in saved["model"]] == [e["key"] for e in manifest]
    for entry in manifest:
        tensor = saved["model"][entry["key"]]
        assert list(tensor.shape) == entry["shape"] and str(tensor.dtype) == "torch." + entry["dtype"]
    assert len(saved["ema"]["shadow_params"]) == sum(e["in_ema"] for e in manifest)
    assert saved["optimizer"]["param_groups"]  # a real optimizer state, as score_sde's restore needs

    again = load_score_model(path, fixture_dir / "config.json")
    with torch.no_grad():
        assert_matches(again(io["x"], io["sigmas"]), io["model_out"])
    assert again.checkpoint_info["step"] == 7


def test_save_round_trips_a_fresh_model(tmp_path):
    cfg = get_preset("ffhq-1024")
    cfg["data"]["image_size"] = 16
    cfg["model"].update(nf=8, ch_mult=[1, 2], attn_resolutions=[8])
    model = build_model(cfg)
    path = tmp_path / "fresh.pth"
    save_checkpoint(path, model)  # no EMA kept: the model's weights stand in for it
    loaded = load_score_model(path, cfg)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("prefix", ["", "module."])
def test_plain_state_dict_loads(fixture_dir, tmp_path, io, prefix):
    raw = torch.load(fixture_dir / "checkpoint.pth", weights_only=True)["model"]
    path = tmp_path / "plain.pth"
    torch.save(OrderedDict((prefix + k.removeprefix("module."), v) for k, v in raw.items()), path)
    model = load_score_model(path, fixture_dir / "config.json")
    assert model.checkpoint_info["layout"] == "state_dict"
    assert model.checkpoint_info["weights"] == "state_dict"
    with torch.no_grad():
        assert_matches(model(io["x"], io["sigmas"]), io["model_out_raw"])


# ---- bad inputs (library level; tests/test_info_cli.py checks them through the CLI) ----


def test_wrong_ema_shapes_are_an_error(fixture_dir, tmp_path):
    state = torch.load(fixture_dir / "checkpoint.pth", weights_only=True)
    state["ema"]["shadow_params"][5] = torch.zeros(3)
    path = tmp_path / "bad_ema.pth"
    torch.save(state, path)
    with pytest.raises(PdsError, match="EMA tensor 5 is"):
        _load_path(path, fixture_dir)
    # The raw weights do not involve the EMA.
    assert _load_path(path, fixture_dir, weights="raw").checkpoint_info["weights"] == "raw"


def _load_path(path, fixture_dir, **kwargs):
    return load_score_model(path, fixture_dir / "config.json", **kwargs)


def test_trusted_checkpoint_loads_with_the_opt_in(fixture_dir, tmp_path):
    import argparse

    state = torch.load(fixture_dir / "checkpoint.pth", weights_only=True)
    state["args"] = argparse.Namespace(lr=1e-4)
    path = tmp_path / "pickled.pth"
    torch.save(state, path)
    with pytest.raises(PdsError, match="argparse.Namespace.*--trust-checkpoint"):
        _load_path(path, fixture_dir)
    assert _load_path(path, fixture_dir, trust_checkpoint=True).checkpoint_info["weights"] == "ema"


def test_unknown_weights_choice(fixture_dir):
    with pytest.raises(PdsError, match="weights"):
        _load(fixture_dir, weights="best")


# ---- telling presets apart ----


@pytest.fixture(scope="module")
def church_shaped(tmp_path_factory):
    """A checkpoint with church's keys, shapes and sigma ladder but no real weights (tiny on disk)."""
    cfg = get_preset("church")
    model = build_model(cfg, device="meta")
    zero = torch.zeros(())
    state = OrderedDict(("module." + k, zero.expand(v.shape)) for k, v in model.state_dict().items())
    m = cfg["model"]
    state["module.sigmas"] = torch.from_numpy(sigma_ladder(m["sigma_min"], m["sigma_max"], m["num_scales"]))
    path = tmp_path_factory.mktemp("church") / "church_shaped.pth"
    torch.save({"model": state, "step": 0}, path)
    return path


def test_presets_are_told_apart_by_shapes_and_noise_levels(church_shaped):
    raw = read_checkpoint(church_shaped)
    assert matching_presets(raw.state_dict) == ["church"]


@pytest.mark.parametrize("preset", ["bedroom", "cifar10"])
def test_a_wrong_preset_names_the_right_one(church_shaped, preset):
    with pytest.raises(PdsError, match="matches preset church: pass --preset church"):
        load_score_model(church_shaped, preset)


def test_without_config_a_checkpoint_that_fits_no_preset_is_an_error(fixture_dir):
    with pytest.raises(PdsError, match="fits no preset"):
        load_score_model(fixture_dir / "checkpoint.pth")


# ---- files that are not checkpoints: one line, nothing else ----


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # making the archive, not reading it
def test_a_torchscript_archive_is_one_line_without_torch_warnings(run_pds, tmp_path):
    path = tmp_path / "scripted.pth"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_pds("info", path, "--preset", "cifar10")
    assert r.exit_code == 2, r.stderr
    assert [str(w.message) for w in caught] == []  # torch's UserWarning would print before the error
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "TorchScript" in lines[0]


# ---- the one opener of an NCSN++ ----


def test_open_network_from_a_checkpoint_is_load_score_model(fixture_dir, io):
    from pdscli.models.network import open_network

    network = open_network(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")
    ref = _load(fixture_dir)
    assert network.sha256 == ref.checkpoint_info["sha256"]
    assert network.weights == "ema" and network.stem == "checkpoint" and network.file == "checkpoint.pth"
    assert network.num_params == ref.checkpoint_info["num_params"] and network.settings == ref.settings
    assert all(torch.equal(a, b) for a, b in zip(network.net.state_dict().values(), ref.state_dict().values()))


def test_open_network_random_weights_are_seeded(fixture_dir):
    from pdscli.models.network import open_network

    cfg = fixture_dir / "config.json"
    a, b = open_network(config=cfg, random_weights=True, seed=1), open_network(config=cfg, random_weights=True, seed=1)
    c = open_network(config=cfg, random_weights=True, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.net.parameters(), b.net.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.net.parameters(), c.net.parameters()))
    assert a.weights == "random(seed=1)" and a.stem == "config-random" and a.sha256 is None
    with pytest.raises(PdsError, match="exclude each other"):
        open_network(fixture_dir / "checkpoint.pth", cfg, random_weights=True)
    with pytest.raises(PdsError, match="--checkpoint"):
        open_network(config=cfg)
