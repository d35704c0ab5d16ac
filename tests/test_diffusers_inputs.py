"""diffusers folders and `hf:` names against wrong types, absurd sizes, paths that lead out of the
folder and a Hub that never answers (docs/reliability.md). Nothing here reaches the network: the
"Hub" is a socket on 127.0.0.1 that accepts and never replies."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import one_line_error
from safetensors.torch import load_file, save_file

from pdscli.models import diffusers
from pdscli.models.checkpoint import load_score_model


@pytest.fixture(scope="module")
def exported(fixture_dir, tmp_path_factory):
    model = load_score_model(fixture_dir / "checkpoint.pth", fixture_dir / "config.json")
    out = tmp_path_factory.mktemp("export") / "pipeline"
    diffusers.write_pipeline(out, model)
    return out


def relayout(src, dst, *, layout: str):
    """A copy of a pipeline folder pds wrote, with unet/ + scheduler/ or flat (2022: all at the top)."""
    shutil.copytree(src, dst)
    if layout == "flat":
        for path in [*(dst / "unet").iterdir(), *(dst / "scheduler").iterdir()]:
            os.rename(path, dst / path.name)
        index = json.loads((dst / "model_index.json").read_text())
        index["model"] = index.pop("unet")
        (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def edited(exported, dst, *, layout="pipeline", unet=None, scheduler=None):
    folder = relayout(exported, dst, layout=layout)
    model_dir, sched_dir = (folder, folder) if layout == "flat" else (folder / "unet", folder / "scheduler")
    for path, changes in ((model_dir / "config.json", unet), (sched_dir / "scheduler_config.json", scheduler)):
        cfg = json.loads(path.read_text())
        cfg.update(changes or {})
        path.write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------------------- wrong types and sizes

WRONG = [
    ("unet", "norm_eps", "abc"), ("unet", "dropout", "high"), ("unet", "mid_block_scale_factor", None),
    ("unet", "layers_per_block", None), ("unet", "layers_per_block", "abc"), ("unet", "layers_per_block", 1.7),
    ("unet", "layers_per_block", 100000), ("unet", "center_input_sample", "no"),
    ("scheduler", "sigma_min", "small"), ("scheduler", "correct_steps", "two"),
    ("scheduler", "num_train_timesteps", 10**12), ("scheduler", "snr", -1),
]


@pytest.mark.parametrize("layout", ["pipeline", "flat"])
@pytest.mark.parametrize("part, field, value", WRONG, ids=[f"{f}={v}" for _, f, v in WRONG])
def test_a_config_value_of_the_wrong_type_or_size_is_one_line_naming_the_field(exported, tmp_path, run_pds, layout,
                                                                               part, field, value):
    folder = edited(exported, tmp_path / "m", layout=layout, **{part: {field: value}})
    r = run_pds("info", folder)
    one_line_error(r, f"{field} is {json.dumps(value)}")


def test_weights_stored_as_integers_or_bools_are_refused(exported, tmp_path, run_pds):
    folder = relayout(exported, tmp_path / "m", layout="pipeline")
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    state["conv_in.weight"] = state["conv_in.weight"].to(torch.int8)
    save_file(state, path)
    one_line_error(run_pds("info", folder), "conv_in.weight holds int8 values")
    state["conv_in.weight"] = state["conv_in.weight"].bool()
    save_file(state, path)
    one_line_error(run_pds("info", folder), "conv_in.weight holds bool values")


# ---------------------------------------------------------------------------- what the scheduler and attention mean


@pytest.mark.parametrize("correct, nfe", [(3, 2 * (3 + 1)), (0, 2)])
def test_the_schedulers_corrector_steps_are_honoured(exported, tmp_path, run_pds, correct, nfe):
    folder = edited(exported, tmp_path / "m", scheduler={"correct_steps": correct})
    r = run_pds("sample", "--checkpoint", folder, "--steps", "2", "-n", "1", "--out", tmp_path / "o", "--quiet",
                "--device", "cpu")
    assert r.exit_code == 0 and "corrector steps" not in r.stderr, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["nfe"]["per_sample"] == nfe  # predictor + `correct` Langevin steps per step, as the pipeline runs


def test_sampling_eps_is_said_and_num_scales_reproduces_the_pipelines_grid(exported, tmp_path, run_pds):
    from diffusers import ScoreSdeVeScheduler

    from pdscli.samplers import pc_steps

    folder = edited(exported, tmp_path / "m", scheduler={"sampling_eps": 1e-3})
    r = run_pds("info", folder)
    assert r.exit_code == 0 and "sampling_eps 0.001 is not used" in r.stderr, r.stderr
    settings = load_score_model(exported).settings
    n = 50
    pipeline = ScoreSdeVeScheduler(num_train_timesteps=settings.num_scales, sigma_min=settings.sigma_min,
                                   sigma_max=settings.sigma_max)
    pipeline.set_timesteps(n)
    pipeline.set_sigmas(n)
    import dataclasses

    same = pc_steps(dataclasses.replace(settings, num_scales=n), n)  # --num-scales N --steps N
    torch.testing.assert_close(same.sigma.float(), pipeline.sigmas.float(), rtol=1e-6, atol=0)
    other = pc_steps(settings, n)  # --steps N alone: score_sde's eps rule, another last step
    assert not torch.allclose(other.sigma.float(), pipeline.sigmas.float(), rtol=1e-3)


@pytest.mark.parametrize("heads", ["absent", 16])  # the attention levels have 32 channels
def test_attention_that_diffusers_splits_into_heads_is_refused_alike(exported, tmp_path, run_pds, heads):
    folder = edited(exported, tmp_path / "m")
    config = json.loads((folder / "unet" / "config.json").read_text())
    if heads == "absent":
        del config["attention_head_dim"]
    else:
        config["attention_head_dim"] = heads
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    one_line_error(run_pds("info", folder), "attention_head_dim", "single head")


# ---------------------------------------------------------------------------- paths out of the folder


@pytest.mark.parametrize("name", ["../outside", "/abs/unet", ".."])
def test_model_index_names_that_lead_out_of_the_folder_are_refused(exported, tmp_path, run_pds, name):
    (tmp_path / "outside").mkdir()
    folder = relayout(exported, tmp_path / "m", layout="pipeline")
    for part in ("config.json", "diffusion_pytorch_model.safetensors"):  # a whole model where the name points
        (tmp_path / "outside" / part).write_bytes((folder / "unet" / part).read_bytes())
    index = json.loads((folder / "model_index.json").read_text())
    index[name] = index.pop("unet")
    (folder / "model_index.json").write_text(json.dumps(index))
    one_line_error(run_pds("info", folder), "model_index.json", "not a folder inside the pipeline")


@pytest.mark.parametrize("part", ["unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                                  "scheduler/scheduler_config.json", "unet"])
def test_links_that_lead_out_of_the_folder_are_refused(exported, tmp_path, run_pds, part):
    folder = relayout(exported, tmp_path / "m", layout="pipeline")
    target = tmp_path / "elsewhere" / part
    target.parent.mkdir(parents=True)
    os.rename(folder / part, target)
    (folder / part).symlink_to(target)
    one_line_error(run_pds("info", folder), "leads outside", str(folder))


# ---------------------------------------------------------------------------- the Hub


@pytest.fixture
def silent_hub():
    """A server that accepts connections and never answers; yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def pds_against(hub: str, home, *args, timeout: float = 120):
    env = {**os.environ, "HF_ENDPOINT": hub, "HF_HOME": str(home), "HF_HUB_ETAG_TIMEOUT": "2",
           "HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_TOKEN", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pdscli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # a hang fails the test here
    return proc, time.monotonic() - started


def test_a_hub_that_never_answers_is_one_line_not_a_hang(silent_hub, tmp_path):
    proc, _ = pds_against(silent_hub, tmp_path / "hf", "info", "hf:google/ncsnpp-ffhq-256")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "hf:google/ncsnpp-ffhq-256" in lines[0] and "--checkpoint" in lines[0]


def test_a_cached_hub_model_opens_without_asking_the_hub(silent_hub, exported, tmp_path):
    repo = tmp_path / "hf" / "hub" / "models--google--ncsnpp-ffhq-256"
    commit = "0123456789abcdef0123456789abcdef01234567"
    relayout(exported, repo / "snapshots" / commit, layout="pipeline")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    proc, _ = pds_against(silent_hub, tmp_path / "hf", "info", "hf:google/ncsnpp-ffhq-256", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["hub"]["repo"] == "google/ncsnpp-ffhq-256"


@pytest.mark.parametrize("name", ["hf:../..", "hf:./x", "hf:org/.."])
def test_hub_names_that_are_paths_are_refused_without_a_local_dir_hint(run_pds, name):
    r = run_pds("info", name)
    one_line_error(r, "is not a Hub model", "hf:ORG/NAME")
    assert "--local-dir" not in r.stderr


# ---------------------------------------------------------------------------- absurd sizes (also score_sde configs)

SMALL = ("--model", "gaussian", "--image-size", "8", "--quiet")


@pytest.mark.parametrize("flags, needle", [
    (("--steps", "1000000000"), "--steps must be"), (("--nfe", "1000000000"), "--nfe must be"),
    (("--steps", "5", "--num-scales", "1000000000000"), "--num-scales"),
], ids=["steps", "nfe", "num-scales"])
def test_step_counts_beyond_a_million_are_refused(run_pds, tmp_path, flags, needle):
    one_line_error(run_pds("sample", *SMALL, *flags, "--out", tmp_path / "o"), needle, "a whole number from 1 to 1000000")
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
    one_line_error(run_pds("info", fixture_dir / "checkpoint.pth", "--config", tmp_path / "config.json"), needle)


def test_an_image_size_whose_activations_cannot_fit_is_refused_before_the_load(run_pds, tmp_path, exported):
    folder = edited(exported, tmp_path / "m", unet={"sample_size": 100000})
    r = run_pds("sample", "--checkpoint", folder, "-n", "1", "--steps", "2", "--out", tmp_path / "o", "--device", "cpu")
    one_line_error(r, "100000x100000", "GiB of activations")


# ---------------------------------------------------------------------------- exports diffusers can build


def test_an_export_diffusers_cannot_build_is_refused_in_one_line(run_pds, tmp_path, fixture_dir):
    r = run_pds("export", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
                "--format", "diffusers", "--out", tmp_path / "p")
    one_line_error(r, "cannot export to diffusers", "GroupNorm(32 groups) over 48 channels")
    assert list(tmp_path.iterdir()) == []
    # It is so: diffusers itself cannot build the config pds would have written.
    from diffusers import UNet2DModel

    unet, _ = diffusers.config_to_diffusers(json.loads((fixture_dir / "config.json").read_text()))
    with pytest.raises(ValueError, match="divisible"):
        UNet2DModel.from_config(unet)


def test_the_group_count_warning_names_the_output_and_shows_without_json(run_pds, tmp_path):
    from pdscli.models import get_preset

    cfg = get_preset("ffhq-1024")  # 32 channels at the attention level: diffusers builds it, with other groups
    cfg["data"]["image_size"] = 16
    cfg["model"].update(nf=32, ch_mult=[1, 1], num_res_blocks=1, attn_resolutions=[8])
    (tmp_path / "narrow.json").write_text(json.dumps(cfg))
    out = tmp_path / "p"
    r = run_pds("export", "--config", tmp_path / "narrow.json", "--random-weights", "--format", "diffusers",
                "--out", out)
    assert r.exit_code == 0, r.stderr
    assert "warning: diffusers computes" in r.stderr and "GroupNorm" in r.stderr
    assert ".tmp" not in r.stderr  # no temporary folder, which no longer exists, is named
