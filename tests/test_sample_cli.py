"""`pds sample` through the CLI: outputs, --json, determinism, resume, interruption and every bad input (exit 2, one line)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import pdscli.evaluate.analytic
from pdscli.precondition import Filters

SMALL = ("--model", "gaussian", "--image-size", "8", "--steps", "5", "--quiet")


def sample(run_pds, out, *args):
    return run_pds("sample", *SMALL, "--out", out, *args)


def samples_of(out) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        return z["samples"]


def assert_user_error(r, *needles):
    """Exit 2, one line on stderr, no traceback, and the message says what is wrong."""
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def make_filters(path, size=8, channels=3):
    rng = np.random.default_rng(0)
    shape = (channels, size, size)
    Filters(freq=rng.uniform(1, 5, shape), space=rng.uniform(0.1, 0.5, shape), size=size, channels=channels, count=10).save(path)
    return path


def tiny_onnx(path, *, inputs=("x", "sigma"), size=8, channels=3):
    """An ONNX file whose score is -x (sigma unused); `inputs` lets a test break the contract."""
    import onnx
    from onnx import TensorProto, helper

    shapes = {"x": ["B", channels, size, size], "sigma": ["B"]}
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes.get(n, ["B", channels, size, size])) for n in inputs]
    out = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B", channels, size, size])
    graph = helper.make_graph([helper.make_node("Neg", [inputs[0]], ["score"])], "tiny", ins, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in {"sigma_min": 0.01, "sigma_max": 10.0, "num_scales": 100, "snr": 0.16, "image_size": size,
                 "num_channels": channels}.items():
        model.metadata_props.add(key=f"pds.{k}", value=repr(v))
    onnx.save(model, str(path))
    return path


# ---------------------------------------------------------------------------- what it makes


def test_sample_writes_images_grid_npz_and_run_json(run_pds, tmp_path):
    out = tmp_path / "out"
    r = sample(run_pds, out, "--num-samples", "3", "--batch-size", "2", "--seed", "7")
    assert r.exit_code == 0, r.stderr
    for name in ("000000.png", "000001.png", "000002.png", "grid.png"):
        assert (out / name).is_file()
    x = samples_of(out)
    assert x.shape == (3, 3, 8, 8) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
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


def test_same_seed_same_images_whatever_the_batch_size(run_pds, tmp_path):
    for b in ("1", "4"):
        r = sample(run_pds, tmp_path / b, "-n", "4", "-b", b, "--per-sample-step")
        assert r.exit_code == 0, r.stderr
    np.testing.assert_allclose(samples_of(tmp_path / "1"), samples_of(tmp_path / "4"), atol=1e-5)
    for i in range(4):
        assert (tmp_path / "1" / f"{i:06d}.png").read_bytes() == (tmp_path / "4" / f"{i:06d}.png").read_bytes()


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


def test_force_starts_over(run_pds, tmp_path):
    out = tmp_path / "o"
    sample(run_pds, out, "-n", "3")
    r = sample(run_pds, out, "-n", "1", "--force")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png"]


# ---------------------------------------------------------------------------- bad inputs


def test_filters_of_the_wrong_shape(run_pds, tmp_path):
    masks = make_filters(tmp_path / "m16.npz", size=16)
    assert_user_error(sample(run_pds, tmp_path / "o", "--masks", masks), "3x16x16", "3x8x8")


def test_reference_npy_of_the_wrong_size(run_pds, tmp_path):
    np.save(tmp_path / "freq_mask.npy", np.ones((3, 16, 16), np.float32))
    assert_user_error(sample(run_pds, tmp_path / "o", "--freq-mask", tmp_path / "freq_mask.npy"), "freq_mask.npy")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_must_be_positive(run_pds, tmp_path, steps):
    r = run_pds("sample", "--model", "gaussian", "--image-size", "8", "--steps", steps, "--out", tmp_path / "o")
    assert_user_error(r, "--steps")


@pytest.mark.parametrize("alpha", ["0", "-1"])
def test_alpha_must_be_positive(run_pds, tmp_path, alpha):
    masks = make_filters(tmp_path / "m.npz")
    assert_user_error(sample(run_pds, tmp_path / "o", "--masks", masks, "--alpha", alpha), "--alpha")


def test_unwritable_output_folder(run_pds, tmp_path):
    # Tests may run as root (chmod would not stop it): a folder under a regular file cannot be made by anyone.
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert_user_error(sample(run_pds, blocker / "out"), "cannot create output folder")


def test_existing_output_folder_needs_force(run_pds, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.png").write_bytes(b"")
    assert_user_error(sample(run_pds, out), "not empty", "--force")


def test_onnx_with_the_wrong_inputs(run_pds, tmp_path):
    engine = tiny_onnx(tmp_path / "bad.onnx", inputs=("image",))
    r = run_pds("sample", "--engine", engine, "--steps", "3", "--out", tmp_path / "o")
    assert_user_error(r, "bad.onnx", "score contract")


def test_steps_and_speed_up_exclude_each_other(run_pds, tmp_path):
    assert_user_error(sample(run_pds, tmp_path / "o", "--speed-up", "2"), "--steps", "--speed-up")


def test_unknown_sampler(run_pds, tmp_path):
    assert_user_error(sample(run_pds, tmp_path / "o", "--sampler", "euler-magic"), "euler-magic")


def test_pds_sampler_needs_filters(run_pds, tmp_path):
    assert_user_error(sample(run_pds, tmp_path / "o", "--sampler", "pds"), "filters")


def test_two_models_at_once(run_pds, tmp_path):
    engine = tiny_onnx(tmp_path / "t.onnx")
    assert_user_error(sample(run_pds, tmp_path / "o", "--engine", engine), "--engine", "--model")


def test_missing_masks_file(run_pds, tmp_path):
    assert_user_error(sample(run_pds, tmp_path / "o", "--masks", tmp_path / "nope.npz"), "nope.npz")


def test_nan_in_the_state_is_a_user_error_naming_step_and_sigma(run_pds, tmp_path, monkeypatch):
    real = pdscli.evaluate.analytic.gaussian_score_model

    def exploding(*a, **kw):
        model = real(*a, **kw)
        model.score = lambda x, sigma: x * float("inf")
        return model

    monkeypatch.setattr(pdscli.evaluate.analytic, "gaussian_score_model", exploding)
    assert_user_error(sample(run_pds, tmp_path / "o"), "step 1 of 5", "sigma=")


def test_schedule_choice_is_recorded(run_pds, tmp_path):
    r = sample(run_pds, tmp_path / "o", "-n", "1", "--sampler", "predictor", "--schedule", "edm")
    assert r.exit_code == 0, r.stderr
    record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert record["schedule"] == "edm" and record["sampler"] == "predictor" and record["nfe"]["per_sample"] == 5
    assert record["steps"]["sigma_last"] == pytest.approx(0.01)  # edm ends exactly at sigma_min


def test_unknown_schedule(run_pds, tmp_path):
    assert_user_error(sample(run_pds, tmp_path / "o", "--schedule", "cosine"), "cosine", "geometric")


def test_precision_does_not_apply_to_the_analytic_model(run_pds, tmp_path):
    assert_user_error(sample(run_pds, tmp_path / "o", "--precision", "fp16"), "--precision")
    assert not (tmp_path / "o").exists()  # a set-up error leaves no empty output folder behind


def test_no_gpu_is_a_user_error(run_pds, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert_user_error(sample(run_pds, tmp_path / "o", "--device", "cuda"), "--device cuda")


def test_pc_with_filters_is_refused(run_pds, tmp_path):
    masks = make_filters(tmp_path / "m.npz")
    assert_user_error(sample(run_pds, tmp_path / "o", "--masks", masks, "--sampler", "pc"), "--sampler pds")


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
    assert_user_error(sample(run_pds, tmp_path / "o", "--masks", masks, "--alpha", "often"), "--alpha", "auto")


def test_threads_flag(run_pds, tmp_path):
    assert_user_error(sample(run_pds, tmp_path / "o", "--threads", "0"), "--threads")
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
