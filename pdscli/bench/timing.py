"""Timing: warm-up, then timed calls one by one (CUDA events on a GPU, perf_counter on the CPU),
summarised as median, quartiles, IQR, min, max and mean; the --threads budget for one run."""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float]) -> dict:
    """Median, quartiles, IQR, min, max and mean of a list of seconds."""
    a = np.asarray(times, dtype=np.float64)
    q1, med, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "min_s": float(a.min()),
            "max_s": float(a.max()), "mean_s": float(a.mean()), "count": int(a.size)}


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> dict:
    """Warm up, then time `repeats` calls of fn one by one.

    CPU: perf_counter around each call (the result is ready when it returns). CUDA: an event
    pair on the current stream around each call, read after one synchronise at the end, so
    the host never stalls the queue; `wall_mean_s` (synchronised wall clock over all calls / n)
    is recorded beside it as a cross-check. The first warm-up call is timed on its own: it
    holds compilation, graph capture and lazy allocation, which the steady state does not."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events must live on the stream the calls run on
            times, wall = _time_cuda(fn, repeats, device)
        clock = "cuda-events"
    else:
        times, wall, clock = _time_cpu(fn, repeats), None, "perf_counter"
    out = {**summarize(times), "times_s": times, "clock": clock, "warmup": warmup, "first_call_s": first}
    if wall is not None:
        out["wall_mean_s"] = wall
    return out


def _time_cpu(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _time_cuda(fn, repeats: int, device: torch.device) -> tuple[list[float], float]:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    sync(device)
    t0 = time.perf_counter()
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    sync(device)
    wall = (time.perf_counter() - t0) / repeats
    return [start.elapsed_time(end) / 1e3 for start, end in pairs], wall


@contextlib.contextmanager
def torch_threads(n: int | None):
    """--threads for the run only (the process's setting is restored: tests share a process)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
