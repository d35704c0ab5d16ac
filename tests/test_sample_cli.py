"""`pds sample` through the CLI: outputs, --json, determinism, resume, interruption and every bad input (exit 2, one line)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import pdscli.evaluate.analytic
from pdscli.precondition import Filters
from pdscli.sample import outputs

from conftest import one_line_error, tiny_onnx

SMALL = ("--model", "gaussian", "--image-size", "8", "--steps", "5", "--quiet")


def sample(run_pds, out, *args):
    return run_pds("sample", *SMALL, "--out", out, *args)


def samples_of(out) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        return z["samples"]


def make_filters(path, size=8, channels=3):
    rng = np.random.default_rng(0)
    shape = (channels, size, size)
    Filters(freq=rng.uniform(1, 5, shape), space=rng.uniform(0.1, 0.5, shape), size=size, channels=channels, count=10).save(path)
    return path


# ---------------------------------------------------------------------------- what it makes


def test_the_flags_reach_run_json_and_the_summary(run_pds, tmp_path):
    """What the run writes is tests/test_runner.py's; here, that the flags arrive."""
    out = tmp_path / "out"
    r = sample(run_pds, out, "--num-samples", "3", "--batch-size", "2", "--seed", "7")
    assert r.exit_code == 0, r.stderr
    assert samples_of(out).shape == (3, 3, 8, 8)
    record = json.loads((out / "run.json").read_text())
    assert record["seed"] == 7 and record["num_samples"] == 3 and record["batch_size"] == 2
    assert record["model"]["name"] == "gaussian" and record["sampler"] == "pc"
    assert record["steps"]["count"] == 5 and record["nfe"]["per_sample"] == 10
    assert record["device"] == "cpu" and record["precision"] == "fp32" and record["pds_version"]
    assert set(record["timings"]) >= {"sampling_s", "total_s"}
    assert "3 images" in r.stdout


def test_json_summary_is_one_parsable_document(run_pds, tmp_path):
    r = sample(run_pds, tmp_path / "out", "--num-samples", "2", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["num_samples"] == 2 and summary["out"] == str(tmp_path / "out")


def test_progress_goes_to_stderr_not_stdout(run_pds, tmp_path):
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", "3", "-n", "2", "--out", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.stderr
    json.loads(r.stdout)
    assert "images" in r.stderr and "steps" in r.stderr


def test_short_gaussian_run_takes_a_second_or_two(run_pds, tmp_path):
    # CPU time, not wall time: the test machine is shared, and waiting for a core is not our cost.
    t0 = time.process_time()
    r = run_pds("sample", "--model", "gaussian", "--steps", "20", "--num-samples", "4", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert time.process_time() - t0 < 3.0


def test_other_seed_other_images(run_pds, tmp_path):
    sample(run_pds, tmp_path / "a", "-n", "2", "--seed", "1")
    sample(run_pds, tmp_path / "b", "-n", "2", "--seed", "2")
    assert not np.allclose(samples_of(tmp_path / "a"), samples_of(tmp_path / "b"))


def test_ctrl_c_keeps_images_and_resume_finishes_identically(run_pds, tmp_path, monkeypatch):
    r = sample(run_pds, tmp_path / "ref", "-n", "5", "-b", "2")
    assert r.exit_code == 0
    real = pdscli.evaluate.analytic.gaussian_score_model

    def interrupting(*a, **kw):
        model = real(*a, **kw)
        exact, calls = model.score, {"n": 0}

        def score(x, sigma):
            calls["n"] += 1
            if calls["n"] == 25:  # in the third batch (10 calls per batch)
                raise KeyboardInterrupt
            return exact(x, sigma)

        model.score = score
        return model

    monkeypatch.setattr(pdscli.evaluate.analytic, "gaussian_score_model", interrupting)
    out = tmp_path / "run"
    r = sample(run_pds, out, "-n", "5", "-b", "2")
    assert r.exit_code == 130
    assert r.stderr.strip() == "interrupted: 4 of 5 images written; rerun with --resume"
    assert len(list(out.glob("0*.png"))) == 4 and not (out / "samples.npz").exists()

    monkeypatch.setattr(pdscli.evaluate.analytic, "gaussian_score_model", real)
    r = sample(run_pds, out, "-n", "5", "-b", "2", "--resume")
    assert r.exit_code == 0, r.stderr
    np.testing.assert_array_equal(samples_of(out), samples_of(tmp_path / "ref"))
    assert json.loads((out / "run.json").read_text())["resumed_from_disk"] == 4
    assert not (out / outputs.PARTIAL).exists()


def test_filters_make_it_pds_by_default(run_pds, tmp_path):
    masks = make_filters(tmp_path / "m.npz")
    r = sample(run_pds, tmp_path / "o", "-n", "2", "--masks", masks, "--alpha", "3")
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["sampler"] == "pds" and record["preconditioned"] and record["alpha"] == 3.0
    assert record["filters"]["count"] == 10 and record["filters"]["files"] == [str(masks)]


def test_reference_npy_filters(run_pds, tmp_path):
    rng = np.random.default_rng(1)
    np.save(tmp_path / "freq_mask.npy", rng.uniform(1, 5, (3, 8, 8)).astype(np.float32))
    np.save(tmp_path / "space_mask.npy", rng.uniform(0.1, 0.5, (3, 8, 8)).astype(np.float32))
    r = sample(run_pds, tmp_path / "o", "-n", "1", "--freq-mask", tmp_path / "freq_mask.npy",
               "--space-mask", tmp_path / "space_mask.npy")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "o" / "run.json").read_text())["sampler"] == "pds"


def test_onnx_engine_runs(run_pds, tmp_path):
    engine = tiny_onnx(tmp_path / "tiny.onnx")
    r = run_pds("sample", "--engine", engine, "--steps", "3", "-n", "2", "--out", tmp_path / "o", "--quiet", "--sigma-max", "5")
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["model"]["name"].startswith("onnx:") and record["settings"]["sigma_max"] == 5.0
    assert record["model"]["sha256"]


def test_speed_up_sets_the_step_count(run_pds, tmp_path):
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--num-scales", "40", "--speed-up", "8",
                "-n", "1", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "o" / "run.json").read_text())["steps"]["count"] == 5


# ---------------------------------------------------------------------------- bad inputs


def test_filters_of_the_wrong_shape(run_pds, tmp_path):
    masks = make_filters(tmp_path / "m16.npz", size=16)
    one_line_error(sample(run_pds, tmp_path / "o", "--masks", masks), "3x16x16", "3x8x8")


def test_reference_npy_of_the_wrong_size(run_pds, tmp_path):
    np.save(tmp_path / "freq_mask.npy", np.ones((3, 16, 16), np.float32))
    one_line_error(sample(run_pds, tmp_path / "o", "--freq-mask", tmp_path / "freq_mask.npy"), "freq_mask.npy")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_must_be_positive(run_pds, tmp_path, steps):
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", steps, "--out", tmp_path / "o")
    one_line_error(r, "--steps")


@pytest.mark.parametrize("alpha", ["0", "-1"])
def test_alpha_must_be_positive(run_pds, tmp_path, alpha):
    masks = make_filters(tmp_path / "m.npz")
    one_line_error(sample(run_pds, tmp_path / "o", "--masks", masks, "--alpha", alpha), "--alpha")


def test_unwritable_output_folder(run_pds, tmp_path):
    # Tests may run as root (chmod would not stop it): a folder under a regular file cannot be made by anyone.
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    one_line_error(sample(run_pds, blocker / "out"), "cannot create output folder")


def test_existing_output_folder_needs_force(run_pds, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.png").write_bytes(b"")
    one_line_error(sample(run_pds, out), "not empty", "--force")


def test_onnx_with_the_wrong_inputs(run_pds, tmp_path):
    engine = tiny_onnx(tmp_path / "bad.onnx", inputs=("image",))
    r = run_pds("sample", "--engine", engine, "--steps", "3", "--out", tmp_path / "o")
    one_line_error(r, "bad.onnx", "score contract")


def test_steps_and_speed_up_exclude_each_other(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "o", "--speed-up", "2"), "--steps", "--speed-up")


def test_unknown_sampler(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "o", "--sampler", "euler-magic"), "euler-magic")


def test_pds_sampler_needs_filters(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "o", "--sampler", "pds"), "filters")


def test_two_models_at_once(run_pds, tmp_path):
    engine = tiny_onnx(tmp_path / "t.onnx")
    one_line_error(sample(run_pds, tmp_path / "o", "--engine", engine), "--engine", "--model")


def test_missing_masks_file(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "o", "--masks", tmp_path / "nope.npz"), "nope.npz")


def test_schedule_choice_is_recorded(run_pds, tmp_path):
    r = sample(run_pds, tmp_path / "o", "-n", "1", "--sampler", "predictor", "--schedule", "edm")
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["schedule"] == "edm" and record["sampler"] == "predictor" and record["nfe"]["per_sample"] == 5
    assert record["steps"]["sigma_last"] == pytest.approx(0.01)  # edm ends exactly at sigma_min


def test_unknown_schedule(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "o", "--schedule", "cosine"), "cosine", "geometric")


def test_precision_does_not_apply_to_the_analytic_model(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "o", "--precision", "fp16"), "--precision")
    assert not (tmp_path / "o").exists()  # a set-up error leaves no empty output folder behind


def test_no_gpu_is_a_user_error(run_pds, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    one_line_error(sample(run_pds, tmp_path / "o", "--device", "cuda"), "--device cuda")


def test_pc_with_filters_is_refused(run_pds, tmp_path):
    masks = make_filters(tmp_path / "m.npz")
    one_line_error(sample(run_pds, tmp_path / "o", "--masks", masks, "--sampler", "pc"), "--sampler pds")


def test_builtin_model_runs_pds_with_its_own_filters(run_pds, tmp_path, monkeypatch):
    """No model flag = the built-in model, run as pdscli.models.builtin says. A stand-in replaces its (trained) weights."""
    builtin = pytest.importorskip("pdscli.models.builtin")
    monkeypatch.setattr(builtin, "default_score_model", lambda device: pdscli.evaluate.analytic.gaussian_score_model(8, 1, device))
    monkeypatch.setattr(builtin, "default_filters", lambda: Filters(
        freq=np.full((1, 8, 8), 2.0, np.float32), space=np.full((1, 8, 8), 0.3, np.float32), size=8, channels=1, count=4))
    monkeypatch.setattr(builtin, "FILTERS", make_filters(tmp_path / "b.npz", channels=1))  # hashed for run.json
    r = run_pds("sample", "-n", "1", "--out", tmp_path / "o", "--quiet")
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["sampler"] == "pds" and record["steps"]["count"] == builtin.DEFAULT_STEPS
    assert record["filters"]["files"] == [str(tmp_path / "b.npz")]
    r = run_pds("sample", "-n", "1", "--out", tmp_path / "v", "--quiet", "--sampler", "pc", "--steps", "2")
    assert r.exit_code == 0, r.stderr
    assert not json.loads((tmp_path / "v" / "run.json").read_text())["preconditioned"]


@pytest.mark.parametrize("steps", ["5", "200"])
def test_alpha_auto_follows_the_step_count(run_pds, tmp_path, steps):
    from pdscli.precondition.alpha import auto_alpha

    masks = make_filters(tmp_path / "m.npz")
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--quiet", "--out", tmp_path / "o",
                "-n", "1", "--masks", masks, "--alpha", "auto", "--steps", steps)
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    s = record["settings"]
    assert record["alpha_given"] == "auto"
    assert record["alpha"] == pytest.approx(auto_alpha(int(steps), sigma_min=s["sigma_min"], sigma_max=s["sigma_max"]))


def test_alpha_must_be_a_number_or_auto(run_pds, tmp_path):
    masks = make_filters(tmp_path / "m.npz")
    one_line_error(sample(run_pds, tmp_path / "o", "--masks", masks, "--alpha", "often"), "--alpha", "auto")


def test_threads_flag(run_pds, tmp_path):
    one_line_error(sample(run_pds, tmp_path / "o", "--threads", "0"), "--threads")
    r = sample(run_pds, tmp_path / "p", "-n", "1", "--threads", "1")
    assert r.exit_code == 0, r.stderr


def test_checkpoint_at_half_precision_keeps_the_sampler_in_fp32(run_pds, tmp_path, fixture_dir):
    common = ("sample", "--checkpoint", fixture_dir / "checkpoint.pth", "--config", fixture_dir / "config.json",
              "--steps", "2", "-n", "1", "--quiet", "--device", "cpu")
    r16 = run_pds(*common, "--precision", "bf16", "--out", tmp_path / "bf16")
    r32 = run_pds(*common, "--out", tmp_path / "fp32")
    assert r16.exit_code == 0 and r32.exit_code == 0, (r16.stderr, r32.stderr)
    record = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert record["precision"] == "bf16"
    assert json.loads((tmp_path / "fp32" / "run.json").read_text())["precision"] == "fp32"
    a = samples_of(tmp_path / "bf16")
    assert a.dtype == np.float32 and np.isfinite(a).all()


# ---------------------------------------------------------------------------- reliability (docs/reliability.md)

KILLER = r"""
import os, re, signal, sys
real_replace, count = os.replace, 0
kill_at = int(sys.argv[1])

def replace(src, dst, *a, **kw):
    # SIGKILL as the kill_at-th sample PNG is about to appear: inside a batch, its other files half done.
    global count
    if re.fullmatch(r"\d+\.png", os.path.basename(str(dst))):
        count += 1
        if count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *a, **kw)

os.replace = replace
from pdscli.cli import main
main(sys.argv[2:])
"""


def _pngs(out) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("[0-9]*.png"))}


def assert_same_run(a, b):
    assert _pngs(a) == _pngs(b)
    with np.load(a / "samples.npz") as za, np.load(b / "samples.npz") as zb:
        assert np.array_equal(za["samples"], zb["samples"]) and np.array_equal(za["indices"], zb["indices"])
    assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()


@pytest.mark.slow  # a killed subprocess per case
@pytest.mark.parametrize("per_sample", [False, True], ids=["batch-mean", "per-sample"])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_sigkill_inside_a_batch_then_resume_is_byte_identical(run_pds, tmp_path, batch, per_sample):
    import os
    import subprocess
    import sys

    args = ["sample", *SMALL, "-n", "7", "-b", str(batch), "--seed", "5", "--threads", "1"]
    args += ["--per-sample-step"] if per_sample else []
    assert run_pds(*args, "--out", tmp_path / "ref").exit_code == 0
    out = tmp_path / "run"
    # Killed before the second PNG of the second batch (b=1: before the second batch's only PNG).
    kill_at = batch + 2 if batch > 1 else 2
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *map(str, args), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert len(_pngs(out)) == kill_at - 1 and not (out / "samples.npz").exists()
    r = run_pds(*args, "--out", out, "--resume")
    assert r.exit_code == 0, r.stderr
    assert_same_run(out, tmp_path / "ref")


def test_resume_remakes_whole_batches_after_deleting_images(run_pds, tmp_path):
    # The repro: two members of a 4-sample batch deleted, then --resume.
    sample(run_pds, tmp_path / "ref", "-n", "4", "-b", "4", "--seed", "0")
    out = tmp_path / "c"
    sample(run_pds, out, "-n", "4", "-b", "4", "--seed", "0")
    for name in ("000002.png", "000003.png", "samples.npz", "grid.png"):  # run.json, the run's record, stays
        (out / name).unlink()
    r = sample(run_pds, out, "-n", "4", "-b", "4", "--seed", "0", "--resume")
    assert r.exit_code == 0, r.stderr
    assert_same_run(out, tmp_path / "ref")
    assert json.loads((out / "run.json").read_text())["made_now"] == 2


def test_resume_with_another_batch_size_is_refused_when_batches_couple(run_pds, tmp_path):
    out = tmp_path / "o"
    sample(run_pds, out, "-n", "4", "-b", "2")
    (out / "000003.png").unlink()
    one_line_error(sample(run_pds, out, "-n", "4", "-b", "4", "--resume"), "batch_size 2 -> 4")
    r = sample(run_pds, out, "-n", "4", "-b", "4", "--resume", "--per-sample-step", "--force")
    assert r.exit_code == 2  # --force and --resume exclude each other


def test_with_per_sample_steps_resume_may_change_the_batch_size(run_pds, tmp_path):
    sample(run_pds, tmp_path / "ref", "-n", "5", "-b", "2", "--per-sample-step")
    out = tmp_path / "o"
    sample(run_pds, out, "-n", "5", "-b", "2", "--per-sample-step")
    for i in (1, 4):
        (out / f"{i:06d}.png").unlink()
    r = sample(run_pds, out, "-n", "5", "-b", "3", "--per-sample-step", "--resume")
    assert r.exit_code == 0, r.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["made_now"] == 2 and record["samples_from_png"] == []  # the others' floats came from samples.npz
    np.testing.assert_allclose(samples_of(out), samples_of(tmp_path / "ref"), atol=1e-5)


def test_a_second_run_on_a_locked_folder_gets_one_line_naming_the_holder(run_pds, tmp_path):
    import fcntl

    out = tmp_path / "o"
    sample(run_pds, out, "-n", "2")
    with open(out / ".pds-lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.truncate(0)
        held.write("pid 4242 on somehost\n")
        held.flush()
        before = _pngs(out)
        one_line_error(sample(run_pds, out, "-n", "2", "--force"), "pid 4242 on somehost", "in use")
        one_line_error(sample(run_pds, out, "-n", "3", "--resume"), "pid 4242 on somehost")
        assert _pngs(out) == before
    r = sample(run_pds, out, "-n", "3", "--resume")  # released: the kernel drops a lock with its holder
    assert r.exit_code == 0, r.stderr


def _enospc_when(monkeypatch, pattern: str):
    """os.fsync fails with ENOSPC for files whose name matches `pattern` (as a full disk does)."""
    import errno
    import os
    import re

    real = os.fsync

    def fsync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if re.search(pattern, name):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_while_sampling_is_one_line_and_resume_finishes(run_pds, tmp_path, monkeypatch):
    sample(run_pds, tmp_path / "ref", "-n", "5", "-b", "2")
    out = tmp_path / "o"
    _enospc_when(monkeypatch, r"^\.000003\.png\.")
    one_line_error(sample(run_pds, out, "-n", "5", "-b", "2"), "no space left", "000003.png", "--resume")
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    monkeypatch.undo()
    r = sample(run_pds, out, "-n", "5", "-b", "2", "--resume")
    assert r.exit_code == 0, r.stderr
    assert_same_run(out, tmp_path / "ref")


@pytest.mark.parametrize("last", ["samples.npz", "run.json"])
def test_full_disk_at_the_end_writes_no_partial_set(run_pds, tmp_path, monkeypatch, last):
    out = tmp_path / "o"
    _enospc_when(monkeypatch, rf"^\.{last}\.")
    one_line_error(sample(run_pds, out, "-n", "3"), "no space left", last)
    assert not [n for n in ("grid.png", "samples.npz", "run.json") if (out / n).exists()]
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))
    monkeypatch.undo()
    r = sample(run_pds, out, "-n", "3", "--resume")
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "run.json").read_text())["samples_from_png"] == []


@pytest.mark.parametrize("where", ["cpu", "cuda", "python"])
def test_out_of_memory_is_one_line_suggesting_a_smaller_batch(run_pds, tmp_path, monkeypatch, where):
    import torch

    real = pdscli.evaluate.analytic.gaussian_score_model
    error = {
        "cpu": RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                            "you tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)"),
        "cuda": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        "python": MemoryError(),
    }[where]

    def hungry(*a, **kw):
        model = real(*a, **kw)

        def score(x, sigma):
            raise error

        model.score = score
        return model

    monkeypatch.setattr(pdscli.evaluate.analytic, "gaussian_score_model", hungry)
    one_line_error(sample(run_pds, tmp_path / "o", "-n", "4"), "out of memory", "--batch-size")


def test_impossible_batch_is_refused_before_any_allocation(run_pds, tmp_path):
    r = sample(run_pds, tmp_path / "o", "-n", "1000000000", "-b", "1000000000", "--image-size", "64")
    one_line_error(r, "--batch-size", "GiB")


def test_huge_run_is_planned_without_index_lists(run_pds, tmp_path, monkeypatch):
    # -n 10**12: the first batch starts at once (the run is stopped there, as by Ctrl-C).
    real = pdscli.evaluate.analytic.gaussian_score_model

    def stopping(*a, **kw):
        model = real(*a, **kw)

        def score(x, sigma):
            raise KeyboardInterrupt

        model.score = score
        return model

    monkeypatch.setattr(pdscli.evaluate.analytic, "gaussian_score_model", stopping)
    t0 = time.process_time()
    r = sample(run_pds, tmp_path / "o", "-n", str(10**12), "-b", "2")
    assert r.exit_code == 130 and "0 of 1000000000000 images" in r.stderr
    assert time.process_time() - t0 < 60  # a list of 10**12 indices could not be built at all


def _interrupted_run(run_pds, tmp_path, monkeypatch, out, n=5, b=2, calls=25):
    real = pdscli.evaluate.analytic.gaussian_score_model

    def interrupting(*a, **kw):
        model = real(*a, **kw)
        exact, count = model.score, {"n": 0}

        def score(x, sigma):
            count["n"] += 1
            if count["n"] == calls:
                raise KeyboardInterrupt
            return exact(x, sigma)

        model.score = score
        return model

    monkeypatch.setattr(pdscli.evaluate.analytic, "gaussian_score_model", interrupting)
    assert sample(run_pds, out, "-n", str(n), "-b", str(b)).exit_code == 130
    monkeypatch.setattr(pdscli.evaluate.analytic, "gaussian_score_model", real)


@pytest.mark.parametrize("damage", ["npy", "png", "partial-file"])
def test_damaged_run_folder_is_remade_with_a_warning(run_pds, tmp_path, monkeypatch, damage):
    sample(run_pds, tmp_path / "ref", "-n", "5", "-b", "2")
    out = tmp_path / "o"
    _interrupted_run(run_pds, tmp_path, monkeypatch, out)  # samples 0..3 on disk
    if damage == "npy":
        path = out / ".partial" / "1.npy"
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "png":
        (out / "000002.png").write_bytes(b"")
    else:
        import shutil

        shutil.rmtree(out / ".partial")
        (out / ".partial").write_text("not a folder")
    r = sample(run_pds, out, "-n", "5", "-b", "2", "--resume")
    assert r.exit_code == 0, r.stderr
    assert "warning:" in r.stderr and {"npy": "1.npy", "png": "000002.png", "partial-file": ".partial"}[damage] in r.stderr
    if damage == "partial-file":
        # The float records went with the folder: those samples come from their PNGs (8-bit), as run.json says.
        assert json.loads((out / "run.json").read_text())["samples_from_png"] == [0, 1, 2, 3]
        assert _pngs(out) == _pngs(tmp_path / "ref")
    else:
        assert_same_run(out, tmp_path / "ref")


def test_resume_and_force_remove_stale_temporary_files(run_pds, tmp_path, monkeypatch):
    out = tmp_path / "o"
    _interrupted_run(run_pds, tmp_path, monkeypatch, out)
    stale = [out / ".000004.png.k2j3h4g5.tmp", out / ".partial" / ".4.npy.a1b2c3d4.tmp", out / ".samples.npz.zz9y8x7w.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    (out / ".notes.tmp").write_text("mine")  # not ours: kept
    assert sample(run_pds, out, "-n", "5", "-b", "2", "--resume").exit_code == 0
    assert not [p for p in stale if p.exists()] and (out / ".notes.tmp").exists()
    (out / ".000001.png.q1w2e3r4.tmp").write_bytes(b"half")
    assert sample(run_pds, out, "-n", "2", "--force").exit_code == 0
    assert not (out / ".000001.png.q1w2e3r4.tmp").exists()


def test_resume_with_fewer_samples_keeps_the_saved_floats(run_pds, tmp_path):
    out = tmp_path / "o"
    sample(run_pds, out, "-n", "5", "-b", "2")
    before = (out / "samples.npz").read_bytes()
    one_line_error(sample(run_pds, out, "-n", "3", "-b", "2", "--resume"), "--num-samples 5", "--force")
    assert (out / "samples.npz").read_bytes() == before
    r = sample(run_pds, out, "-n", "3", "-b", "2", "--force")
    assert r.exit_code == 0, r.stderr
    assert samples_of(out).shape[0] == 3


@pytest.mark.parametrize("flags, needles", [
    (("--seed", "-1"), ("--seed",)),
    (("--sigma-max", "1e39"), ("sigma_max", "float32")),
    (("--channels", "5"), ("1 or 3 channels", "5")),
    (("--channels", "0"), ("--channels",)),
    (("--image-size", "0"), ("--image-size",)),
    (("-n", "0"), ("--num-samples",)),
    (("-b", "0"), ("--batch-size",)),
    (("--steps", "3", "--speed-up", "2"), ("--steps", "--speed-up")),
], ids=["negative-seed", "sigma-max-beyond-float32", "channels-5", "channels-0", "image-size-0", "n-0", "b-0",
        "steps-and-speed-up"])
def test_bad_numbers_are_one_line(run_pds, tmp_path, flags, needles):
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--quiet", "--out", tmp_path / "o", *flags)
    one_line_error(r, *needles)
    assert not (tmp_path / "o").exists()


def test_an_npz_given_as_a_reference_mask_says_use_masks(run_pds, tmp_path):
    masks = make_filters(tmp_path / "m.npz")
    one_line_error(sample(run_pds, tmp_path / "o", "--freq-mask", masks), "--masks")


def test_engine_backend_flag_and_its_old_name(run_pds, tmp_path):
    engine = tiny_onnx(tmp_path / "tiny.onnx")
    for flag in ("--engine-backend", "--backend"):
        r = run_pds("sample", "--engine", engine, flag, "cpu", "--steps", "2", "-n", "1", "--out", tmp_path / flag, "--quiet")
        assert r.exit_code == 0, r.stderr
    one_line_error(sample(run_pds, tmp_path / "x", "--engine-backend", "cpu"), "--engine-backend", "--engine")


def test_json_prints_only_the_document_on_stdout(run_pds, tmp_path):
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", "2", "-n", "2", "--out", tmp_path / "o",
                "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout is one document
    assert doc["num_samples"] == 2 and doc["out"] == str(tmp_path / "o")
