"""MFU arithmetic and the device peak table (pdscli.bench.mfu)."""

from __future__ import annotations

import pytest
import torch

from pdscli.bench import mfu as M


@pytest.mark.parametrize("name,label", [
    ("NVIDIA H200", "NVIDIA H200 (SXM)"),
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 (SXM)"),
    ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100"),
    ("NVIDIA A10", "NVIDIA A10"),
    ("NVIDIA L4", "NVIDIA L4"),
    ("NVIDIA L40S", "NVIDIA L40S"),
    ("Tesla T4", "NVIDIA T4"),
])
def test_device_names_find_their_row(name, label):
    assert M.device_peak(name, "fp32")["device"] == label


@pytest.mark.parametrize("name", ["NVIDIA H200 NVL", "NVIDIA GeForce RTX 3060", "AMD EPYC", "", None])
def test_unknown_devices_have_no_peak(name):
    assert M.device_peak(name, "bf16") is None


def test_h200_peaks_are_the_dense_data_sheet_figures():
    bf16 = M.device_peak("NVIDIA H200", "bf16")
    assert bf16["flops_per_s"] == pytest.approx(989.4e12) and "dense" in bf16["source"]
    assert M.device_peak("NVIDIA H200", "fp32")["flops_per_s"] == pytest.approx(67e12)
    assert M.device_peak("NVIDIA V100-SXM2-32GB", "bf16") is None  # no bf16 tensor cores there


def test_every_row_orders_its_precisions():
    # Tensor-core rates never fall below the CUDA-core fp32 rate, and 16-bit is at least TF32.
    for _, label, peaks in M.PEAKS_TFLOPS:
        assert set(peaks) <= set(M.PRECISIONS), label
        if "tf32" in peaks:
            assert peaks["fp32"] <= peaks["tf32"] <= peaks["bf16"] == peaks["fp16"], label
        assert peaks["fp16"] > peaks["fp32"], label


def test_compute_precision_reads_tf32():
    assert M.compute_precision("fp32", tf32=False) == "fp32"
    assert M.compute_precision("fp32", tf32=True) == "tf32"
    assert M.compute_precision("BF16", tf32=True) == "bf16"
    assert M.compute_precision(None) is None and M.compute_precision("int4") is None


def test_mfu_is_achieved_over_peak():
    flops, seconds, peak = 3.0e12, 0.01, 989.4e12
    assert M.mfu(flops, seconds, peak) == pytest.approx(flops / seconds / peak)
    for bad in ((None, 1, 1), (1, 0, 1), (1, 1, None), (-1, 1, 1)):
        assert M.mfu(*bad) is None


def test_add_mfu_fills_rows_from_their_own_fields():
    entries = [
        {"name": "eager", "status": "ok", "precision": "fp32",
         "batches": [{"batch": 8, "flops_per_call": 8e11, "median_s": 0.02}]},
        {"name": "bf16", "status": "ok", "precision": "bf16",
         "batches": [{"batch": 8, "flops_per_call": 8e11, "median_s": 0.004}, {"batch": 1, "median_s": 0.001}]},
        {"name": "onnx-cuda", "status": "ok", "precision": "fp32", "batches": [{"batch": 8, "flops_per_call": 8e11, "median_s": 0.03}]},
        {"name": "trt-fp16", "status": "skipped", "reason": "no tensorrt"},
    ]
    M.add_mfu(entries, "NVIDIA H200", tf32=True, measured_peaks={"bf16": 790e12})
    eager, bf16, onnx, skipped = entries
    assert eager["compute_precision"] == "tf32"  # torch's own backends follow torch's TF32 flags
    assert onnx["compute_precision"] == "fp32"  # another runtime does not
    assert eager["batches"][0]["mfu"] == pytest.approx(8e11 / 0.02 / 494.7e12)
    assert bf16["batches"][0]["mfu"] == pytest.approx(8e11 / 0.004 / 989.4e12)
    assert bf16["batches"][0]["mfu_of_measured_peak"] == pytest.approx(8e11 / 0.004 / 790e12)
    assert bf16["batches"][1]["mfu"] is None  # no FLOP count for that row
    assert "mfu" not in str(skipped)


def test_matmul_peak_is_a_positive_rate_on_cpu():
    rate = M.measure_matmul_peak(torch.device("cpu"), torch.float32, n=64, repeats=2)
    assert rate > 0


def _nfe_report(gpu_name):
    """A `pds bench` report reduced to what the per-call table reads, MFU added as run_bench adds it."""
    rows = {"eager": (0.020, 0.030), "bf16": (0.004, 0.011)}
    entries = [{"name": name, "status": "ok", "precision": "fp32" if name == "eager" else name, "setup_s": 0.0,
                "batches": [{"batch": b, "median_s": t, "iqr_s": t / 10, "min_s": t, "max_s": t, "images_per_s": b / t,
                             "first_call_s": t, "flops_per_call": 1e11 * b, "achieved_flops_per_s": 1e11 * b / t}
                            for b, t in zip((8, 32), times)]}
               for name, times in rows.items()]
    M.add_mfu(entries, gpu_name, tf32=False)
    return {"backends": entries, "settings": {"repeats": 5, "warmup": 1}, "flops": {}}


def test_the_text_table_shows_mfu_against_the_listed_peak():
    from pdscli.bench.render import markdown_table, nfe_table

    table = nfe_table(_nfe_report("NVIDIA H100 80GB HBM3"))
    col = table.columns.index("MFU")
    bf16_b32 = next(r for r in table.rows if r[0] == "bf16" and r[2] == "32")
    assert bf16_b32[col] == f"{3.2e12 / 0.011 / 989.4e12 * 100:.0f} %"  # 29 % of the H100's dense bf16
    eager_b8 = next(r for r in table.rows if r[0] == "eager" and r[2] == "8")
    assert eager_b8[col] == f"{8e11 / 0.020 / 67e12 * 100:.2g} %"
    note = table.notes[-1]
    assert "NVIDIA H100 (SXM)" in note and "bf16 989.4 TFLOP/s (bf16)" in note and "fp32 67.0 TFLOP/s (eager)" in note
    assert "| MFU |" in markdown_table(table.columns, table.rows)


def test_without_a_listed_peak_there_is_no_mfu_column():
    from pdscli.bench.render import nfe_table

    table = nfe_table(_nfe_report(None))  # a CPU, or a GPU not in the table
    assert "MFU" not in table.columns and not any("MFU" in n for n in table.notes)
    assert all(len(r) == len(table.columns) for r in table.rows)


def test_peaks_are_measured_per_precision_the_device_has():
    from pdscli.devices import tf32_state

    peaks = M.measure_peaks(torch.device("cpu"), n=64, repeats=2)
    assert set(peaks) == {"fp32", "bf16"} and all(v > 0 for v in peaks.values())  # no TF32 or fp16 GEMM on a CPU
    assert tf32_state("cpu")["matmul"] is False
