"""PDS inside diffusers: PdsScoreSdeVeScheduler in a ScoreSdeVePipeline equals `pds sample --sampler
pds` with the same noise, equals diffusers' own scheduler without filters, and pdscli.diffusers.sample
runs pds's samplers on a pipeline's network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import pdscli
from pdscli.errors import PdsError
from pdscli.models import build_model, get_preset
from pdscli.models import diffusers as mapping
from pdscli.noise import SampleNoise

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")
pds_diffusers = pytest.importorskip("pdscli.diffusers")
pipeline_module = pytest.importorskip("diffusers.pipelines.deprecated.score_sde_ve.pipeline_score_sde_ve")

B, SIZE, STEPS, SEED = 2, 16, 4, 3
# Outputs are compared after the pipeline's clamp to [0, 1]; sigma_max 1 keeps a good share of the
# pixels inside, and float32 rounding of a state of that scale through 4 steps stays far below this.
TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A small NCSN++ saved as a diffusers pipeline. Its attention level has 128 channels, where
    diffusers' GroupNorm counts are score_sde's, so both networks compute the same function."""
    cfg = get_preset("ffhq-1024")
    cfg["data"]["image_size"] = SIZE
    cfg["model"].update(nf=32, ch_mult=[1, 4], num_res_blocks=1, attn_resolutions=[8], sigma_max=1.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # away from init, whose zero-scaled layers would hide mistakes
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("pipe") / "pipeline"
    mapping.write_pipeline(out, model.eval())
    return out


@pytest.fixture(scope="module")
def filters_file(tmp_path_factory):
    images = torch.rand(20, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("filters") / "f.npz"
    pdscli.filters(images).save(path)
    return path


def pipeline(folder):
    pipe = diffusers.ScoreSdeVePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, **kw) -> np.ndarray:
    """[B, C, H, W] float32 in [0, 1] (the pipeline's np output, channels first)."""
    images = pipe(batch_size=B, num_inference_steps=STEPS, output_type="np", **kw).images
    return images.transpose(0, 3, 1, 2)


def pds_noise(monkeypatch):
    """Every draw of the pipeline and the scheduler is the next draw of `pds sample`'s noise for samples 0..B-1."""
    noise = SampleNoise(SEED, range(B), (3, SIZE, SIZE))

    def draw(shape, **kwargs):
        assert tuple(shape) == (B, 3, SIZE, SIZE)
        return noise()

    monkeypatch.setattr(pipeline_module, "randn_tensor", draw)
    monkeypatch.setattr(pds_diffusers, "randn_tensor", draw)
    return noise


def cli_samples(run_pds, folder, out, *flags) -> np.ndarray:
    r = run_pds("sample", "--checkpoint", folder, "--steps", STEPS, "-n", B, "-b", B, "--seed", SEED, "--device", "cpu",
                "--out", out, "--quiet", *flags)
    assert r.exit_code == 0, r.stderr
    with np.load(out / "samples.npz") as z:
        return z["samples"]


def inside(x: np.ndarray) -> float:
    return float(((x > 0) & (x < 1)).mean())


def test_pipeline_with_pds_scheduler_equals_pds_sample(folder, filters_file, run_pds, tmp_path, monkeypatch):
    expected = cli_samples(run_pds, folder, tmp_path / "s", "--sampler", "pds", "--masks", filters_file)
    assert inside(expected) > 0.1  # enough pixels inside [0, 1] for the comparison to mean something
    pipe = pipeline(folder)
    pipe.scheduler = pds_diffusers.PdsScoreSdeVeScheduler.from_config(pipe.scheduler.config, filters=filters_file,
                                                                      scale_eps=True)
    noise = pds_noise(monkeypatch)
    got = run(pipe)
    assert noise.draws == 1 + 2 * STEPS  # the prior, then a corrector and a predictor draw per step
    assert np.abs(got - expected).max() <= TOL
    # The eps the grid ends at matters: diffusers' fixed 1e-5 is another grid.
    pipe.scheduler = pds_diffusers.PdsScoreSdeVeScheduler.from_config(pipe.scheduler.config, filters=filters_file,
                                                                      scale_eps=False)
    pds_noise(monkeypatch)
    assert np.abs(run(pipe) - expected).max() > 100 * TOL
    # Without filters the same pipeline is vanilla PC, which `pds sample --sampler pc` makes.
    vanilla = cli_samples(run_pds, folder, tmp_path / "v", "--sampler", "pc")
    assert np.abs(vanilla - expected).max() > 100 * TOL
    pipe.scheduler = pds_diffusers.PdsScoreSdeVeScheduler.from_config(pipe.scheduler.config, filters=None, scale_eps=True)
    pds_noise(monkeypatch)
    assert np.abs(run(pipe) - vanilla).max() <= TOL


def test_without_filters_it_is_diffusers_own_scheduler(folder):
    pipe = pipeline(folder)
    expected = run(pipe, generator=torch.Generator().manual_seed(0))
    assert type(pipe.scheduler).__name__ == "ScoreSdeVeScheduler" and inside(expected) > 0.1
    pipe.scheduler = pds_diffusers.PdsScoreSdeVeScheduler.from_config(pipe.scheduler.config)
    got = run(pipe, generator=torch.Generator().manual_seed(0))
    assert np.abs(got - expected).max() <= TOL
    assert np.abs(run(pipe, generator=torch.Generator().manual_seed(1)) - expected).max() > 100 * TOL


def test_scheduler_config_and_save_round_trip(folder, filters_file, tmp_path):
    pipe = pipeline(folder)
    theirs = dict(pipe.scheduler.config)
    ours = pds_diffusers.PdsScoreSdeVeScheduler.from_config(theirs, filters=filters_file, alpha=3.0)
    for key in ("num_train_timesteps", "snr", "sigma_min", "sigma_max", "sampling_eps", "correct_steps"):
        assert ours.config[key] == theirs[key], key
    assert ours.precond is not None and ours.precond.alpha == 3.0 and float(ours.init_noise_sigma) == theirs["sigma_max"]
    ours.save_pretrained(tmp_path / "s")
    saved = json.loads((tmp_path / "s" / "scheduler_config.json").read_text())
    assert saved["filters"] == str(filters_file) and saved["alpha"] == 3.0
    again = pds_diffusers.PdsScoreSdeVeScheduler.from_pretrained(tmp_path / "s")
    assert again.filters is not None and np.array_equal(again.filters.freq, ours.filters.freq)
    # A Filters object works too, and stays out of the saved config (it is not JSON).
    from_object = pds_diffusers.PdsScoreSdeVeScheduler.from_config(theirs, filters=again.filters)
    assert from_object.precond is not None and from_object.config["filters"] is None
    x, z, j = torch.rand(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 5])
    assert torch.allclose(ours.add_noise(x, z, j), diffusers.ScoreSdeVeScheduler.from_config(theirs).add_noise(x, z, j))
    # Copies (diffusers deep-copies schedulers) keep the preconditioned prior.
    import copy

    z = torch.randn(1, 3, SIZE, SIZE)
    assert torch.equal(z * copy.deepcopy(ours).init_noise_sigma, z * ours.init_noise_sigma)
    assert not torch.equal(z * ours.init_noise_sigma, z * float(ours.init_noise_sigma))
    with pytest.raises(PdsError, match="alpha"):
        pds_diffusers.PdsScoreSdeVeScheduler.from_config(theirs, filters=filters_file, alpha="auto")
    with pytest.raises(PdsError, match="not found"):
        pds_diffusers.PdsScoreSdeVeScheduler.from_config(theirs, filters=tmp_path / "missing.npz")


def test_sample_runs_pds_samplers_on_the_pipeline(folder):
    pipe = pipeline(folder)
    model = pdscli.load(folder, device="cpu")
    for kwargs in ({"nfe": 6}, {"sampler": "dpm++2m", "steps": 3, "teleport": "off"}):
        got = pds_diffusers.sample(pipe, B, **kwargs)
        expected = pdscli.sample(model, B, **kwargs)  # the same weights in pds's own network
        assert got.shape == (B, 3, SIZE, SIZE) and inside(expected.numpy()) > 0.1
        assert (got - expected).abs().max().item() <= TOL


@pytest.mark.slow  # every example of docs/api.md
def test_api_doc_examples_run(folder, tmp_path, monkeypatch):
    """Every Python block of docs/api.md, in order, in one namespace, in an empty folder (with the
    small `pipeline/` the diffusers examples open)."""
    import re
    import shutil
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 6
    shutil.copytree(folder, tmp_path / "pipeline")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)
    assert namespace["images"].shape == (4, 1, 16, 16)


def test_load_opens_folders_and_hub_names(folder, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):  # nothing here reaches the network
        calls.append(repo_id)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    hub = pdscli.load("hf:google/ncsnpp-ffhq-1024", device="cpu")
    local = pdscli.load(folder, device="cpu")
    assert calls == ["google/ncsnpp-ffhq-1024"] and hub.filters is None and hub.shape == local.shape == (3, SIZE, SIZE)
    x = torch.rand(1, 3, SIZE, SIZE)
    assert torch.equal(hub.score(x, 0.5), local.score(x, 0.5))
