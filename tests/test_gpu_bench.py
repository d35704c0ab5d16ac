"""scripts/gpu_bench.py and its rendering (scripts/bench_docs.py render_gpu), on CPU: the guards
against passing CPU smoke numbers off as GPU figures, the goal arithmetic, the noise part, and
(slow) a whole --tiny run whose report the GPU renderer reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_bench():
    return _load("gpu_bench")


@pytest.fixture(scope="module")
def bench_docs():
    return _load("bench_docs")


def test_a_tiny_run_may_not_write_into_docs(gpu_bench, tmp_path):
    with pytest.raises(SystemExit) as e:
        gpu_bench.main(["--tiny", "--out", str(SCRIPTS.parent / "docs" / "bench" / "gpu-tiny.json")])
    assert e.value.code == 2


def _row(batch, median_s, **kw):
    return {"batch": batch, "median_s": median_s, "images_per_s": batch / median_s, **kw}


def _report(tiny=False, device="cuda:0"):
    """A report shaped like gpu_bench's, with made-up timings (the arithmetic is what is tested)."""
    lat = {"architecture": "ffhq-256", "shape": [3, 256, 256], "params": 10, "flops_per_call": {"1": 2e9, "8": 1.6e10},
           "skipped": [{"name": "compile-bf16", "reason": "not measured: over this part's time budget"}],
           "backends": [
               {"name": "fp32", "status": "ok", "precision": "fp32", "compute_precision": "fp32",
                "batches": [_row(8, 0.030, mfu=0.1, max_rel_err_vs_eager_fp32=0.0)]},
               {"name": "bf16", "status": "ok", "precision": "bf16", "compute_precision": "bf16",
                "batches": [_row(8, 0.008, mfu=0.3, max_rel_err_vs_eager_fp32=1e-2), _row(32, 0.030, mfu=0.45)]},
               {"name": "fp16", "status": "failed", "precision": "fp16", "reason": "RuntimeError: boom"}]}
    return {
        "format": "pds-gpu-bench/1", "tiny": tiny, "device": device, "created": "2026-01-01T00:00:00+0000",
        "command": "python scripts/gpu_bench.py --out docs/bench/gpu-h200.json", "pds_version": "0",
        "elapsed_s": 1.0, "complete": True, "plan": {"sampler_nfe": 20, "graph_batch": 8, "graph_steps": 10},
        "machine": {"cpu": "host", "libraries": {"torch": "2"}, "gpu": {"name": "NVIDIA H200", "memory_gib": 139,
                                                                        "driver": "1", "cuda": "13", "cudnn": 9}},
        "peaks": {"matmul_n": 8192, "flops_per_s": {"bf16": 7.0e14}, "listed": {"bf16": {"flops_per_s": 9.894e14}}},
        "latency": {"ffhq-256": lat},
        "pds_overhead": {"status": "ok", "batches": [
            {"batch": 8, "noise": {"median_s": 1e-4}, "grad": {"median_s": 1e-4}, "per_nfe_s": 2e-4,
             "noise_draw": {"median_s": 1e-5}, "fastest_backend": "bf16", "fraction_of_fastest_nfe": 0.025}]},
        "e2e": {"status": "ok", "backend": "bf16", "batch": 1, "nfe_ratio": 4000 / 132, "speedup": 25.0,
                "runs": [{"label": "vanilla", "steps": 2000, "nfe": 4000, "wall_s": 50.0},
                         {"label": "pds", "steps": 66, "nfe": 132, "wall_s": 2.0}]},
        "samplers": {"status": "failed", "reason": "x"}, "step_graphs": {"status": "failed", "reason": "x"},
        "compiled_steps": {"status": "not measured", "reason": "the run was stopped at --hard-stop-s"},
        "noise": {"status": "failed", "reason": "x"},
    }


def test_goals_compare_the_measured_figures_with_the_targets(gpu_bench):
    report = _report()
    goals = gpu_bench.goals(report)
    assert goals["best_backend_vs_eager_fp32_256_b8"]["value"] == pytest.approx(0.030 / 0.008)
    assert goals["best_backend_vs_eager_fp32_256_b8"]["backend"] == "bf16"
    assert goals["best_backend_vs_eager_fp32_256_b8"]["met"] is True  # 3.75 >= 3
    assert goals["pds_overhead_share_of_nfe"]["met"] is False  # 2.5 % > 2 %
    assert goals["pds66_vs_vanilla2000_speedup"]["met"] is False  # 25 < 29
    assert goals["mfu_bf16_b32"]["value"] == pytest.approx(0.45) and goals["mfu_bf16_b32"]["met"] is True


def test_a_goal_without_its_figure_is_not_measured_rather_than_missing(gpu_bench):
    report = _report()
    report["e2e"] = {"status": "not measured", "reason": "would not fit the time budget"}
    goal = gpu_bench.goals(report)["pds66_vs_vanilla2000_speedup"]
    assert goal["value"] is None and goal["met"] is None and goal["goal"] == 29.0


def test_render_refuses_cpu_and_tiny_reports(bench_docs):
    for report in (_report(tiny=True), _report(device="cpu")):
        with pytest.raises(ValueError, match="not GPU figures"):
            bench_docs.render_gpu(report, "gpu-h200")


def test_render_shows_the_goals_and_the_ratios(gpu_bench, bench_docs):
    report = _report()
    report["goals"] = gpu_bench.goals(report)
    text = bench_docs.render_gpu(report, "gpu-h200")
    assert "NVIDIA H200" in text and report["command"] in text
    assert f"{0.030 / 0.008:.2f}×" in text  # bf16 against fp32 at batch 8
    assert "not met" in text and "| met |" in text
    assert "failed: RuntimeError: boom" in text and "compile-bf16" in text
    assert "speedup **25.0×**" in text
    assert "Whole steps through torch.compile: not measured (the run was stopped at --hard-stop-s)." in text
    assert "Samplers: failed (x)." in text


def test_missing_gpu_runtimes_are_skipped_with_their_reason(gpu_bench):
    """A CPU-only onnxruntime and no TensorRT (the GPU machine's set-up) are listed, not failures."""
    nets = gpu_bench.Nets(gpu_bench.architectures(tiny=True), torch.device("cpu"), [1], None)
    for name, why in (("onnx-cuda", "runs on the GPU"), ("trt-fp16", "TensorRT engines need --device cuda")):
        assert why in gpu_bench.backend_reason(name, nets, "ffhq-256", tiny=True)


@pytest.mark.slow
def test_a_tiny_run_makes_a_report_the_gpu_renderer_reads(gpu_bench, bench_docs, tmp_path):
    """The whole script on a CPU at --tiny sizes; its report, relabelled as a GPU one, renders
    (the renderer reads the fields the script writes, not a hand-made copy of them)."""
    out = tmp_path / "gpu-tiny.json"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        gpu_bench.main(["--tiny", "--cpu", "--out", str(out), "--budget-s", "300"])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["complete"] and set(report["goals"]) == set(gpu_bench.GOALS)
    assert {s["name"] for s in report["latency"]["ffhq-256"]["skipped"]} >= {"onnx-cuda", "trt-fp16", "cuda-graph-bf16"}
    assert all(r["status"] == "ok" and r["bit_equal"] for r in report["step_graphs"]["rows"])
    assert [r["path"] for r in report["compiled_steps"]["rows"]] == ["compile"]
    assert report["e2e"]["runs"][0]["nfe"] == 2 * report["plan"]["e2e_full"]
    with pytest.raises(ValueError, match="not GPU figures"):
        bench_docs.render_gpu(report, "gpu-tiny")
    report.update(tiny=False, device="cuda:0")
    report["machine"]["gpu"] = {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 80, "driver": "?", "cuda": "?", "cudnn": "?"}
    text = bench_docs.render_gpu(report, "gpu-tiny")
    for heading in ("Goals, as measured", "Per network call, ffhq-1024", "PDS overhead per NFE", "End to end, ffhq-1024",
                    "Samplers at 4 NFE", "Whole steps from CUDA graphs", "Whole steps through dynamo only", "Noise (version"):
        assert heading in text


def test_noise_part_on_cpu_times_both_generators(gpu_bench):
    p = gpu_bench.plan(tiny=True)
    out = gpu_bench.part_noise(torch.device("cpu"), p, True, gpu_bench.Budget(60))
    assert out["noise_version"] >= 2 and out["gpu_vs_cpu"].startswith("not measured")
    assert out["draw_time"]["eager_ops"]["median_s"] > 0 and out["draw_time"]["per_sample_generators_v1"]["median_s"] > 0


def test_a_report_with_nan_is_still_written(gpu_bench, tmp_path):
    out = tmp_path / "r.json"
    gpu_bench.OUT[:] = [out]
    try:
        gpu_bench.save({"latency": {"max_rel_err_vs_eager_fp32": float("nan")}, "path": tmp_path})
    finally:
        gpu_bench.OUT[:] = []
    assert json.loads(out.read_text())["path"] == str(tmp_path)


def test_a_run_stopped_before_any_part_renders_its_goals_as_not_measured(gpu_bench, bench_docs):
    report = {k: v for k, v in _report().items() if k not in ("latency", "peaks", "pds_overhead", "e2e", "samplers",
                                                               "step_graphs", "compiled_steps", "noise")}
    report.update(complete=False, goals=gpu_bench.goals(report))
    text = bench_docs.render_gpu(report, "gpu-h100")
    assert "the run was cut short" in text and text.count("| not measured |") == len(gpu_bench.GOALS)
