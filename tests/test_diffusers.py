"""Weights in diffusers' format and from the Hugging Face Hub: both layouts, .bin and .safetensors,
old and new attention names, export and back, diffusers itself where it is installed, and hf:
through huggingface_hub's download call (faked: nothing here reaches the network)."""

from __future__ import annotations

import json
import shutil

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pdscli.errors import PdsError
from pdscli.models import build_model, diffusers, get_preset
from pdscli.models.checkpoint import load_score_model, save_safetensors

OLD_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def io(fixture_dir):
    return {k: torch.from_numpy(v) for k, v in np.load(fixture_dir / "reference_io.npz").items()}


@pytest.fixture(scope="module")
def fixture_model(fixture_dir):
    return load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")


@pytest.fixture(scope="module")
def exported(fixture_model, tmp_path_factory):
    """The fixture as a diffusers pipeline folder (unet/ + scheduler/, safetensors), as pds writes it."""
    out = tmp_path_factory.mktemp("export") / "pipeline"
    diffusers.write_pipeline(out, fixture_model)
    return out


def assert_matches(out: torch.Tensor, ref: torch.Tensor):
    """The fixture README's bound for a float32 CPU reimplementation."""
    assert out.shape == ref.shape and out.dtype == torch.float32
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    assert (out - ref).abs().max().item() <= tol


def assert_reference_outputs(model, io):
    with torch.no_grad():
        assert_matches(model(io["x"], io["sigmas"]), io["model_out"])
        assert_matches(model(io["x_ext"], io["sigmas_ext"]), io["model_out_ext"])


def old_names(state: dict) -> dict:
    """The names diffusers files used before its attention rewrite (and the Fourier weights as W)."""
    out = {}
    for key, value in state.items():
        for new, old in OLD_NAMES.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    out["time_proj.W"] = out["time_proj.weight"]
    return out


def relayout(src, dst, *, layout: str, fmt: str, names: str):
    """A copy of a pipeline folder in the flat 2022 layout or with unet/ + scheduler/, .bin or .safetensors."""
    state = load_file(src / "unet" / "diffusion_pytorch_model.safetensors")
    if names == "old":
        state = old_names(state)
    index = json.loads((src / "model_index.json").read_text())
    if layout == "flat":  # as the 2022 Hub repos: everything at the top, the model named "model"
        model_dir, sched_dir = dst, dst
        index["model"] = index.pop("unet")
    else:
        model_dir, sched_dir = dst / "unet", dst / "scheduler"
    for folder in (model_dir, sched_dir):
        folder.mkdir(parents=True, exist_ok=True)
    (dst / "model_index.json").write_text(json.dumps(index))
    shutil.copy(src / "unet" / "config.json", model_dir / "config.json")
    shutil.copy(src / "scheduler" / "scheduler_config.json", sched_dir / "scheduler_config.json")
    if fmt == "bin":
        torch.save(state, model_dir / "diffusion_pytorch_model.bin")
    else:
        save_file({k: v.contiguous().clone() for k, v in state.items()}, model_dir / "diffusion_pytorch_model.safetensors")
    return dst


# ---------------------------------------------------------------------------- the mapping


def test_key_map_covers_every_weight_once(fixture_model):
    mapping = diffusers.key_map(fixture_model)
    keys = [k for k in fixture_model.state_dict() if k != "sigmas"]
    assert list(mapping) == keys
    names = [name for name, _ in mapping.values()]
    assert len(set(names)) == len(names)
    transposed = {k for k, (_, t) in mapping.items() if t}
    assert transposed and all(k.rsplit(".", 2)[-2].startswith("NIN_") and k.endswith(".W") for k in transposed)
    # The ends of construction order: embedding, input conv, and the finest output head.
    assert mapping["all_modules.0.W"] == ("time_proj.weight", False)
    assert mapping["all_modules.3.weight"] == ("conv_in.weight", False)
    assert [mapping[k][0] for k in keys[-4:]] == ["conv_norm_out.weight", "conv_norm_out.bias", "conv_out.weight",
                                                   "conv_out.bias"]


def test_config_round_trip(fixture_model):
    unet, scheduler = diffusers.config_to_diffusers(fixture_model.config)
    back, _ = diffusers.config_from_diffusers(unet, scheduler, "test")
    m, b = fixture_model.config["model"], back["model"]
    for key in ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "sigma_min", "sigma_max", "num_scales",
                "resblock_type", "progressive", "progressive_input", "fir_kernel", "skip_rescale", "scale_by_sigma"):
        assert b[key] == m[key], key
    assert back["data"]["image_size"] == 32 and back["data"]["centered"] is False
    assert back["sampling"]["snr"] == fixture_model.config["sampling"]["snr"]


def test_absent_fields_take_diffusers_defaults(fixture_model):
    unet, scheduler = diffusers.config_to_diffusers(fixture_model.config)
    quiet = {k: v for k, v in unet.items() if k != "attention_head_dim"}
    with pytest.raises(PdsError, match="heads of 8"):  # diffusers' default 8 would be multi-head: refused
        diffusers.config_from_diffusers(quiet, scheduler, "cfg")
    # norm_num_groups defaults to 32 in diffusers: 32 groups on the fixture's 16-channel output head.
    with pytest.raises(PdsError, match="norm_num_groups 32"):
        diffusers.config_from_diffusers({k: v for k, v in unet.items() if k != "norm_num_groups"}, scheduler, "cfg")


def test_group_counts_warned_only_under_128_channels(fixture_model):
    # The fixture's attention level has 32 channels: diffusers normalises it in 32 groups, score_sde in 8.
    found = diffusers.group_count_differences(fixture_model.config)
    assert any("attentions" in f for f in found) and any("resnets" in f for f in found)
    for preset in ("ffhq-1024", "ffhq-256", "celebahq-256"):
        assert diffusers.group_count_differences(get_preset(preset)) == []


# ---------------------------------------------------------------------------- loading


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("names", ["new", "old"])
def test_folder_reproduces_the_reference(exported, fixture_model, io, tmp_path, layout, fmt, names):
    folder = relayout(exported, tmp_path / "repo", layout=layout, fmt=fmt, names=names)
    model = load_score_model(folder)
    assert_reference_outputs(model, io)
    info = model.checkpoint_info
    assert info["layout"] == ("diffusers-pipeline" if layout == "pipeline" else "diffusers-flat")
    assert info["weights_file"].endswith(f"diffusion_pytorch_model.{fmt}")
    assert model.settings == fixture_model.settings  # from the scheduler config
    # Recomputed, not stored: numpy's exp may differ from the reference's in the last bit.
    torch.testing.assert_close(model.sigmas, fixture_model.sigmas, rtol=1e-14, atol=0)


def test_model_folder_finds_the_scheduler_beside_it(exported, fixture_model, io):
    model = load_score_model(exported / "unet")
    assert model.checkpoint_info["layout"] == "diffusers-model"
    assert model.settings == fixture_model.settings
    assert_reference_outputs(model, io)


def test_model_folder_without_scheduler_uses_its_defaults(exported, tmp_path, capsys):
    shutil.copytree(exported / "unet", tmp_path / "unet")
    model = load_score_model(tmp_path / "unet")
    assert (model.settings.sigma_max, model.settings.num_scales) == (1348.0, 2000)
    assert "no scheduler config" in capsys.readouterr().err


def test_single_safetensors_file_with_config(exported, fixture_dir, fixture_model, io, tmp_path):
    # Diffusers names, with the UNet2DModel config.json passed as --config ...
    weights = tmp_path / "model.safetensors"
    shutil.copy(exported / "unet" / "diffusion_pytorch_model.safetensors", weights)
    model = load_score_model(weights, exported / "unet" / "config.json")
    assert_reference_outputs(model, io)
    # ... or with the score_sde config the weights came from.
    assert_reference_outputs(load_score_model(weights, fixture_dir / "config.json"), io)
    # score_sde names, as `pds train` writes them: the config travels in the file.
    own = tmp_path / "own.safetensors"
    save_safetensors(own, fixture_model, step=7)
    model = load_score_model(own)
    assert model.checkpoint_info["layout"] == "safetensors" and model.checkpoint_info["step"] == 7
    assert_reference_outputs(model, io)


def test_bad_inputs_fail_with_one_line(exported, tmp_path, run_pds):
    r = run_pds("info", exported, "--preset", "ffhq-1024")
    assert r.exit_code == 2 and "carries its own config" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()
    r = run_pds("info", tmp_path / "empty")
    assert r.exit_code == 2 and "not a diffusers model or pipeline folder" in r.stderr

    broken = relayout(exported, tmp_path / "broken", layout="pipeline", fmt="safetensors", names="new")
    state = load_file(broken / "unet" / "diffusion_pytorch_model.safetensors")
    del state["mid_block.attentions.0.to_k.weight"]
    save_file(state, broken / "unet" / "diffusion_pytorch_model.safetensors")
    r = run_pds("info", broken)
    assert r.exit_code == 2 and "mid_block.attentions.0.to_k.weight" in r.stderr

    config = json.loads((exported / "unet" / "config.json").read_text())
    config["down_block_types"][0] = "DownBlock2D"
    (broken / "unet" / "config.json").write_text(json.dumps(config))
    r = run_pds("info", broken)
    assert r.exit_code == 2 and "Skip blocks" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- export


def test_export_round_trip(tmp_path, run_pds):
    # The fixture itself cannot be exported (diffusers cannot build its 32-channel attention level):
    # a small model diffusers builds, with weights away from init, saved as a score_sde checkpoint.
    from pdscli.models.checkpoint import save_checkpoint

    model = _perturbed(build_model(_wide_config()), 7)
    save_checkpoint(tmp_path / "wide.pth", model)
    (tmp_path / "wide.json").write_text(json.dumps(model.config))
    common = ("export", "--checkpoint", tmp_path / "wide.pth", "--config", tmp_path / "wide.json", "--format", "diffusers")
    out = tmp_path / "ncsnpp"
    r = run_pds(*common, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["files"] == ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                                "unet/diffusion_pytorch_model.safetensors"]
    x, sigma = _inputs()
    with torch.no_grad():
        assert_matches(load_score_model(out)(x, sigma), model(x, sigma))
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "ScoreSdeVeScheduler"]

    before = sorted(p.name for p in out.rglob("*"))
    r = run_pds(*common, "--out", out)
    assert r.exit_code == 2 and "--force" in r.stderr and sorted(p.name for p in out.rglob("*")) == before
    r = run_pds(*common, "--out", out, "--force")
    assert r.exit_code == 0, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_export_refuses_what_diffusers_cannot_express(tmp_path, run_pds):
    r = run_pds("export", "--preset", "cifar10", "--random-weights", "--format", "diffusers", "--out", tmp_path / "c")
    assert r.exit_code == 2 and "progressive" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the Hub


def test_hf_checkpoint_goes_through_snapshot_download(exported, tmp_path, monkeypatch, run_pds):
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        if kwargs["local_files_only"]:  # not in the cache, which pds looks in first
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(exported)

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    r = run_pds("sample", "--checkpoint", "hf:google/ncsnpp-ffhq-1024", "--steps", 2, "-n", 1,
                "--out", tmp_path / "s", "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    assert np.isfinite(np.load(tmp_path / "s" / "samples.npz")["samples"]).all()
    assert calls[0][1]["local_files_only"]  # the cache first
    repo, kwargs = calls[1]
    assert repo == "google/ncsnpp-ffhq-1024" and kwargs["revision"] is None and not kwargs["local_files_only"]
    assert "*diffusion_pytorch_model.safetensors" in kwargs["allow_patterns"]

    calls.clear()
    r = run_pds("info", "hf:google/ncsnpp-ffhq-1024@abc123", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert calls[1][1]["revision"] == "abc123"
    assert report["hub"]["repo"] == "google/ncsnpp-ffhq-1024" and report["checkpoint"] == "hf:google/ncsnpp-ffhq-1024@abc123"


def test_hf_offline_fails_with_one_line(tmp_path, monkeypatch, run_pds):
    # The real download call, offline, on an empty cache: it must not reach the network at all.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    r = run_pds("sample", "--checkpoint", "hf:google/ncsnpp-ffhq-1024", "--steps", 2, "-n", 1,
                "--out", tmp_path / "s", "--quiet")
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0] and "--checkpoint" in lines[0]


def test_bad_hub_name(run_pds):
    r = run_pds("info", "hf:ncsnpp")
    assert r.exit_code == 2 and "hf:ORG/NAME" in r.stderr


# ---------------------------------------------------------------------------- diffusers itself


def _wide_config() -> dict:
    """A small NCSN++ whose attention level has 128 channels, where diffusers' group counts are score_sde's."""
    cfg = get_preset("ffhq-1024")
    cfg["data"]["image_size"] = 16
    cfg["model"].update(nf=32, ch_mult=[1, 4], num_res_blocks=1, attn_resolutions=[8])
    return cfg


def _perturbed(model, seed: int):
    """Weights away from init (whose zero-scaled layers would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def diffusers_lib():
    return pytest.importorskip("diffusers", reason="diffusers is not installed (pip install diffusers)")


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.rand(2, 3, 16, 16, generator=g), torch.tensor([0.5, 20.0])


def test_diffusers_loads_the_export(diffusers_lib, tmp_path):
    torch.manual_seed(0)
    model = _perturbed(build_model(_wide_config()), 1)
    assert diffusers.group_count_differences(model.config) == []
    diffusers.write_pipeline(tmp_path / "p", model)
    pipe = diffusers_lib.ScoreSdeVePipeline.from_pretrained(tmp_path / "p")
    x, sigma = _inputs()
    with torch.no_grad():
        assert_matches(pipe.unet(x, sigma).sample, model(x, sigma))
    m = model.config["model"]
    assert pipe.scheduler.config.sigma_max == m["sigma_max"] and pipe.scheduler.config.num_train_timesteps == m["num_scales"]


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_pds_loads_what_diffusers_saves(diffusers_lib, tmp_path, safe):
    unet_cfg, sched_cfg = diffusers.config_to_diffusers(_wide_config())
    torch.manual_seed(0)
    unet = _perturbed(diffusers_lib.UNet2DModel.from_config(unet_cfg), 3)
    scheduler = diffusers_lib.ScoreSdeVeScheduler.from_config(sched_cfg)
    diffusers_lib.ScoreSdeVePipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "p", safe_serialization=safe)
    model = load_score_model(tmp_path / "p")
    x, sigma = _inputs()
    with torch.no_grad():
        assert_matches(model(x, sigma), unet(x, sigma).sample)


@pytest.mark.parametrize("preset", ["ffhq-1024", "ffhq-256", "celebahq-256"])
def test_official_architectures_have_diffusers_names_and_shapes(diffusers_lib, preset):
    """The three Hub models: diffusers' own UNet2DModel (structure only) has exactly the names and shapes pds maps to."""
    cfg = get_preset(preset)
    unet_cfg, _ = diffusers.config_to_diffusers(cfg)
    with torch.device("meta"):
        unet = diffusers_lib.UNet2DModel.from_config(unet_cfg)
    theirs = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    model = build_model(cfg, device="meta")
    state = model.state_dict()
    ours = {name: tuple(state[k].t().shape if transposed else state[k].shape)
            for k, (name, transposed) in diffusers.key_map(model).items()}
    assert ours == theirs
