"""Model FLOP utilisation (MFU): the model FLOPs a backend gets through per second, as a share
of the device's peak for the precision it computes in.

The peaks are the vendors' listed dense tensor-core (or, for fp32 without TF32, CUDA-core)
rates, never the "with sparsity" figures: an NCSN++ call has no 2:4 structured sparsity.
Listed peaks assume boost clocks and no power or clock limits; even a large, perfectly shaped
GEMM reaches noticeably less, so a report can also carry the peak `measure_matmul_peak` measures
on the machine, and MFU against both.

The precision a backend computes in is not its name: eager "fp32" runs its convolutions and
matmuls on TF32 tensor cores when TF32 is allowed (pdscli.devices.tf32_state), and a bf16 body
keeps a float32 time embedding and normalisation, which hold a negligible share of the FLOPs.
"""

from __future__ import annotations

import re

import torch

from pdscli.devices import set_tf32

# Dense peak TFLOP/s per precision, from the vendors' data sheets (SXM / the named form factor).
# Keys: a regular expression matched against torch.cuda.get_device_name(); the first match wins,
# so more specific names come first.
PEAKS_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    # The H200 NVL (PCIe, 600 W) runs lower clocks; it is left out rather than given SXM peaks.
    (r"\bH200\b(?!\s*NVL)", "NVIDIA H200 (SXM)", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"\bH100\b.*\bPCIe\b", "NVIDIA H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0, "fp8": 1513.0}),
    (r"\bH100\b", "NVIDIA H100 (SXM)", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4, "fp8": 1978.9}),
    (r"\bA100\b", "NVIDIA A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    (r"\bL40S\b", "NVIDIA L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "fp16": 362.1, "fp8": 733.0}),
    (r"\bL4\b", "NVIDIA L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0, "fp8": 242.0}),
    (r"\bA10\b", "NVIDIA A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    (r"\bV100\b", "NVIDIA V100 (SXM2)", {"fp32": 15.7, "fp16": 125.0}),
    (r"\bT4\b", "NVIDIA T4", {"fp32": 8.1, "fp16": 65.0}),
]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8")


def compute_precision(precision: str | None, *, tf32: bool = False) -> str | None:
    """The precision the tensor cores (or CUDA cores) run at for a backend's nominal precision."""
    if precision is None:
        return None
    p = precision.lower()
    if p == "fp32" and tf32:
        return "tf32"
    return p if p in PRECISIONS else None


def device_peak(device_name: str | None, precision: str | None) -> dict | None:
    """{"device", "precision", "flops_per_s", "source"} for a device name and compute precision,
    or None when the device or the precision is not in the table."""
    if not device_name or not precision:
        return None
    for pattern, label, peaks in PEAKS_TFLOPS:
        if re.search(pattern, device_name):
            tflops = peaks.get(precision)
            if tflops is None:
                return None
            return {"device": label, "precision": precision, "flops_per_s": tflops * 1e12,
                    "source": "vendor data sheet, dense (no sparsity)"}
    return None


def mfu(flops_per_call: float | None, seconds_per_call: float | None, peak_flops_per_s: float | None) -> float | None:
    """Achieved model FLOP/s over the peak, a fraction; None when any input is missing or not positive."""
    if not flops_per_call or not seconds_per_call or not peak_flops_per_s:
        return None
    if flops_per_call <= 0 or seconds_per_call <= 0 or peak_flops_per_s <= 0:
        return None
    return flops_per_call / seconds_per_call / peak_flops_per_s


def add_mfu(entries: list[dict], device_name: str | None, *, tf32: bool, measured_peaks: dict | None = None) -> None:
    """The hook for `pds bench`: give every timed row of every backend entry its MFU, in place.

    An entry has "precision" and "batches" (rows with "flops_per_call" and "median_s"), as
    pdscli.bench reports them. `measured_peaks`: {precision: FLOP/s} measured on this machine.
    Each entry gets "compute_precision" and "peak"; each row "mfu" (against the listed peak)
    and, where a measured peak is given, "mfu_of_measured_peak".
    """
    for entry in entries:
        if entry.get("status", "ok") != "ok":
            continue
        prec = compute_precision(entry.get("precision"), tf32=tf32 and entry.get("name", "").startswith(("eager", "compile", "cuda-graph")))
        peak = device_peak(device_name, prec)
        entry["compute_precision"] = prec
        entry["peak"] = peak
        measured = (measured_peaks or {}).get(prec)
        for row in entry.get("batches", []):
            row["mfu"] = mfu(row.get("flops_per_call"), row.get("median_s"), peak and peak["flops_per_s"])
            if measured:
                row["mfu_of_measured_peak"] = mfu(row.get("flops_per_call"), row.get("median_s"), measured)


def mfu_note(entries: list[dict]) -> str:
    """What an MFU column is read against, in one sentence: each peak the entries' rows used
    (the entries as `add_mfu` left them), once."""
    peaks = {}
    for e in entries:
        peak = e.get("peak")
        if peak and any(r.get("mfu") is not None for r in e.get("batches", [])):
            peaks.setdefault((peak["device"], peak["precision"]), (peak["flops_per_s"], []))[1].append(e["name"])
    listed = "; ".join(f"{prec} {flops / 1e12:,.1f} TFLOP/s ({', '.join(names)})"
                       for (_, prec), (flops, names) in peaks.items())
    devices = ", ".join(sorted({device for device, _ in peaks}))
    return (f"MFU: model FLOP/s over the {devices} data sheet's dense peak for the precision each backend "
            f"computes in: {listed}.") if peaks else ""


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, *, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of an n x n x n matmul at `dtype` on `device` (a CUDA device: timed with events).

    What the tensor cores sustain on a large, perfectly shaped GEMM: the ceiling a network's
    MFU can be read against besides the data sheet's number.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type != "cuda":
        import time

        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        return 2.0 * n**3 * repeats / (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    return 2.0 * n**3 * repeats / (start.elapsed_time(end) / 1e3)


# The precisions a GEMM peak is measured at: (label, dtype, TF32 policy). A CPU has no TF32 and
# no fast fp16 matmul.
PEAK_GEMMS = (("fp32", torch.float32, "off"), ("tf32", torch.float32, "on"), ("bf16", torch.bfloat16, "off"),
              ("fp16", torch.float16, "off"))


def measure_peaks(device: torch.device, *, n: int = 8192, repeats: int = 20) -> dict[str, float | None]:
    """{precision: FLOP/s of one n x n x n GEMM} on `device` (None where it failed), the TF32
    flags restored to "off" after: the measured peaks `add_mfu` reads MFU against."""
    peaks = {}
    for label, dtype, tf32 in PEAK_GEMMS:
        if device.type != "cuda" and label in ("tf32", "fp16"):
            continue
        set_tf32(tf32)
        try:
            peaks[label] = measure_matmul_peak(device, dtype, n=n, repeats=repeats)
        except (RuntimeError, MemoryError):  # a dtype this device has no matmul for; out of memory
            peaks[label] = None
    set_tf32("off")
    return peaks
