"""`pds train`: the objective, the optimiser pieces, train -> checkpoint -> load -> sample, exact resume, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pdscli.train.loop import EMA, dsm_loss, step_generator, warmup_lr

from conftest import one_line_error

BUILTIN_CONFIG = json.loads((__import__("pdscli.train.loop", fromlist=["x"]).BUILTIN_CONFIG).read_text())


def tiny_config(tmp_path, **training) -> str:
    """An NCSN++ small enough to train a few steps in well under a second each: 8x8 grey, nf 8."""
    cfg = json.loads(json.dumps(BUILTIN_CONFIG))
    cfg["data"]["image_size"] = 8
    cfg["model"].update(nf=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], num_scales=50, sigma_max=5.0)
    cfg["training"].update({"batch_size": 8, "n_iters": 6, "log_freq": 2, "snapshot_freq_for_preemption": 3, **training})
    cfg["optim"].update(warmup=0, lr=2e-3)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def digit_folder(tmp_path, n: int = 24):
    """A folder of real digits as 8x8 PNGs (the image-folder path of the trainer)."""
    from PIL import Image

    from pdscli.train.datasets import load_digits_8x8

    folder = tmp_path / "digits-png"
    folder.mkdir()
    images, _ = load_digits_8x8()
    for i in range(n):
        Image.fromarray((images[i] * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


# ---------------------------------------------------------------------------- the objective


class PointMassScore(torch.nn.Module):
    """The exact score of data that is one image x0: -(x - x0) / sigma^2."""

    def __init__(self, x0):
        super().__init__()
        self.x0 = x0

    def forward(self, x, sigma):
        return -(x - self.x0) / sigma[:, None, None, None] ** 2


def test_dsm_loss_is_zero_for_the_exact_score_and_one_for_a_zero_score():
    x0 = torch.rand(1, 1, 8, 8)
    batch = x0.repeat(256, 1, 1, 1)
    exact = dsm_loss(PointMassScore(x0), batch, sigma_min=0.01, sigma_max=10.0, generator=step_generator(0, 0, "cpu"),
                     reduce_mean=True)
    assert float(exact) < 1e-8
    zero = dsm_loss(lambda x, s: torch.zeros_like(x), batch, sigma_min=0.01, sigma_max=10.0,
                    generator=step_generator(0, 0, "cpu"), reduce_mean=True)
    assert abs(float(zero) - 1.0) < 0.05  # mean of z^2 over 256 x 64 normal draws
    halfsum = dsm_loss(lambda x, s: torch.zeros_like(x), batch, sigma_min=0.01, sigma_max=10.0,
                       generator=step_generator(0, 0, "cpu"), reduce_mean=False)
    assert abs(float(halfsum) / (0.5 * 64) - 1.0) < 0.05  # score_sde: 0.5 * sum over pixels


def test_dsm_loss_samples_sigma_log_uniformly_between_the_limits():
    seen = []

    def spy(x, sigma):
        seen.append(sigma)
        return torch.zeros_like(x)

    dsm_loss(spy, torch.zeros(4000, 1, 2, 2), sigma_min=0.01, sigma_max=100.0, generator=step_generator(1, 0, "cpu"))
    t = torch.log(seen[0] / 0.01) / math.log(100.0 / 0.01)
    assert 0 <= float(t.min()) and float(t.max()) <= 1
    assert abs(float(t.mean()) - 0.5) < 0.02


def test_warmup_and_ema_follow_score_sde():
    assert warmup_lr(0, 1e-3, 100) == 0.0
    assert warmup_lr(50, 1e-3, 100) == pytest.approx(5e-4)
    assert warmup_lr(500, 1e-3, 100) == pytest.approx(1e-3)
    assert warmup_lr(0, 1e-3, 0) == 1e-3
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], rate=0.999)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update([p])  # first update: decay min(0.999, 2/11)
    assert torch.allclose(ema.shadow[0], torch.full((3,), 1 - 2 / 11))


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow  # trains, then samples the checkpoint
def test_train_checkpoint_load_sample_end_to_end(run_pds, tmp_path):
    folder = digit_folder(tmp_path)
    out = tmp_path / "run"
    r = run_pds("train", folder, "--config", tiny_config(tmp_path), "--iters", 6, "--out", out, "--threads", 1, "--json")
    assert r.exit_code == 0, r.stderr
    printed = json.loads(r.stdout)  # --json: one document, and nothing else, on stdout
    assert printed["step"] == 6 and printed["start_step"] == 0 and printed["out"] == str(out)
    assert all(Path(p).is_file() for p in printed["files"].values())
    assert (out / "checkpoint.pth").is_file() and (out / "config.json").is_file()
    summary = json.loads((out / "train.json").read_text())
    assert summary["step"] == 6 and summary["num_images"] == 24
    losses = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in losses] == [2, 4, 6] and all(math.isfinite(rec["loss"]) for rec in losses)

    # What training wrote is what the loader reads: score_sde layout, EMA weights, the same config.
    from pdscli.models.checkpoint import load_score_model

    net = load_score_model(out / "checkpoint.pth", out / "config.json")
    assert net.checkpoint_info["weights"] == "ema" and net.checkpoint_info["step"] == 6
    raw = torch.load(out / "checkpoint.pth", weights_only=True)
    assert set(raw) == {"optimizer", "model", "ema", "step"} and all(k.startswith("module.") for k in raw["model"])
    # The EMA weights as safetensors beside it, config included: the same network.
    light = load_score_model(out / "ema.safetensors")
    assert light.checkpoint_info["step"] == 6
    assert all(torch.equal(v, light.state_dict()[k]) for k, v in net.state_dict().items())

    samples = tmp_path / "samples"
    r = run_pds("sample", "--checkpoint", out / "checkpoint.pth", "--config", out / "config.json",
                "--steps", 3, "-n", 2, "--out", samples, "--quiet", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    x = np.load(samples / "samples.npz")["samples"]
    assert x.shape == (2, 1, 8, 8) and np.isfinite(x).all()


def _weights(path):
    raw = torch.load(path, weights_only=True)
    return raw["model"], raw["ema"]["shadow_params"], raw["optimizer"]["state"]


def test_resume_continues_exactly_as_an_uninterrupted_run(run_pds, tmp_path):
    cfg = tiny_config(tmp_path)
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--config", cfg, "--quiet", "--threads", 1, "--seed", 3)
    assert run_pds("train", "digits", *common, "--iters", 6, "--out", straight).exit_code == 0
    assert run_pds("train", "digits", *common, "--iters", 3, "--out", split).exit_code == 0
    r = run_pds("train", "digits", "--resume", "--iters", 6, "--out", split, "--quiet", "--threads", 1)
    assert r.exit_code == 0, r.stderr

    model_a, ema_a, adam_a = _weights(straight / "checkpoint.pth")
    model_b, ema_b, adam_b = _weights(split / "checkpoint.pth")
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(a, b) for a, b in zip(ema_a, ema_b))
    assert all(torch.equal(adam_a[k]["exp_avg"], adam_b[k]["exp_avg"]) for k in adam_a)
    # The log: the same losses, except that the record at step 4 of the resumed run averages
    # step 4 only (step 3 was logged when the first part stopped).
    log_a = {r["step"]: r["loss"] for r in map(json.loads, (straight / "log.jsonl").read_text().splitlines())}
    log_b = {r["step"]: r["loss"] for r in map(json.loads, (split / "log.jsonl").read_text().splitlines())}
    assert sorted(log_a) == [2, 4, 6] and sorted(log_b) == [2, 3, 4, 6]
    assert log_a[2] == log_b[2] and log_a[6] == log_b[6]


def test_training_lowers_the_loss(tmp_path):
    from pdscli.models import load_config
    from pdscli.train.loop import TrainOptions, run_training

    cfg = load_config(tiny_config(tmp_path, log_freq=10))
    result = run_training("digits", cfg, tmp_path / "run", TrainOptions(iters=40))
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.7 * first, result.losses


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (("{tmp}/no-such-folder",), "no such folder"),
        (("{empty}",), "no images"),
        (("digits", "--iters", 0), "--iters must be at least 1"),
        (("digits", "--iters", -5), "--iters must be at least 1"),
        (("digits", "--lr", 0), "--lr must be a positive number, not 0"),
        (("digits", "--sigma-max", "big"), "--sigma-max must be a positive number or auto, not 'big'"),
        (("digits", "--preset", "cifar11"), "unknown preset"),
        (("digits", "--force", "--resume"), "exclude each other"),
        (("digits", "--resume"), "nothing to resume"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_pds, tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    args = [str(a).format(tmp=tmp_path, empty=empty) for a in args]
    if "--config" not in args and "--preset" not in args and "--resume" not in args:
        args += ["--config", tiny_config(tmp_path)]
    r = run_pds("train", *args, "--out", tmp_path / "out", "--quiet")
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_folder_needs_a_config_and_a_used_out_dir_needs_force(run_pds, tmp_path):
    folder = digit_folder(tmp_path, n=4)
    r = run_pds("train", folder, "--out", tmp_path / "a", "--quiet")
    assert r.exit_code == 2 and "--config" in r.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    r = run_pds("train", folder, "--config", tiny_config(tmp_path), "--iters", 1, "--out", used, "--quiet")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert (used / "keep.txt").read_text() == "mine"


def test_resume_refuses_other_settings(run_pds, tmp_path):
    out = tmp_path / "run"
    assert run_pds("train", "digits", "--config", tiny_config(tmp_path), "--iters", 2, "--out", out, "--quiet").exit_code == 0
    for extra, word in ((("--lr", 1e-3), "--lr"), (("--seed", 5), "seed"), (("--config", tiny_config(tmp_path)), "--config")):
        r = run_pds("train", "digits", "--resume", *extra, "--out", out, "--quiet")
        assert r.exit_code == 2 and word in r.stderr, r.stderr
    r = run_pds("train", digit_folder(tmp_path, n=2), "--resume", "--out", out, "--quiet")
    assert r.exit_code == 2 and "trains on" in r.stderr


# ---------------------------------------------------------------------------- damaged run folders, full disk


def _run_folder(tmp_path, checkpoint: bytes | None = None, config: str | None = None):
    """A run folder as `pds train` leaves it, with the given checkpoint bytes / config.json text."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(config if config is not None else open(tiny_config(tmp_path)).read())
    (out / "checkpoint.pth").write_bytes(checkpoint if checkpoint is not None else b"")
    return out


def test_resume_from_an_empty_checkpoint_is_one_line(run_pds, tmp_path):
    out = _run_folder(tmp_path, checkpoint=b"")
    one_line_error(run_pds("train", "digits", "--resume", "--out", out, "--quiet"), "checkpoint.pth", "empty")


@pytest.mark.parametrize("text", ["{\"model\": ", "[1, 2]", "\udcff"])
def test_resume_with_a_damaged_config_is_one_line(run_pds, tmp_path, text):
    out = _run_folder(tmp_path, checkpoint=b"PK", config="")
    (out / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    one_line_error(run_pds("train", "digits", "--resume", "--out", out, "--quiet"), "config.json")


def test_resume_from_a_pickle_checkpoint_is_one_line(run_pds, tmp_path):
    import argparse
    import io

    buf = io.BytesIO()
    torch.save({"args": argparse.Namespace(lr=1.0)}, buf)
    out = _run_folder(tmp_path, checkpoint=buf.getvalue())
    one_line_error(run_pds("train", "digits", "--resume", "--out", out, "--quiet"), "argparse.Namespace",
                     "--trust-checkpoint")
    # Trusted, it is read, and found not to be a training checkpoint: still one line.
    one_line_error(run_pds("train", "digits", "--resume", "--out", out, "--quiet", "--trust-checkpoint"),
                     "not a `pds train` checkpoint")


@pytest.mark.slow  # trains until the disk fills
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A file-size limit makes every write past 20 kB fail, as a full disk does: the checkpoint cannot be written."""
    import resource
    import subprocess
    import sys

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "pdscli", "train", "digits", "--config", tiny_config(tmp_path),
                        "--iters", "2", "--threads", "1", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] and "checkpoint.pth" in lines[0], r.stderr
    assert not (out / "checkpoint.pth").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []
