"""The GPU measurements of docs/benchmarks.md, in one run of about ten minutes on an NVIDIA H200.

    PYTHONPATH=. python scripts/gpu_bench.py --out docs/bench/gpu-h200.json      # on the GPU machine
    PYTHONPATH=. python scripts/gpu_bench.py --tiny --out /tmp/gpu-tiny.json     # a CPU smoke run (tiny sizes)
    python scripts/bench_docs.py                                                 # render the JSON into the docs

What it measures (each part under its own share of --budget-s; what the budget cuts is listed
as not measured, never silently dropped):

1. noise: the counter-based generator on the GPU against the CPU (same numbers up to float
   rounding), the fused kernel against the eager ops, batch independence on the device, and the
   time of one draw against the per-sample torch.Generator loop it replaced;
2. step graphs: every sampler's samples from replayed CUDA graphs against the eager step, and
   the time per step of both;
3. latency: per network call of the ffhq-256 and ffhq-1024 architectures (random weights) at
   batch 1, 8, 32: eager fp32 (TF32 off), TF32, bf16, fp16, bf16 channels-last, a CUDA graph of
   the bf16 call, torch.compile of it; images/s, MFU against the listed and the measured peak;
4. PDS overhead: one M z and one M M^T g per NFE, as a share of the fastest backend's call;
5. end to end on ffhq-1024, batch 1, fastest backend: vanilla PC at 2000 steps against PDS at 66;
6. samplers: every sampler at 20 NFE on the 256 architecture, time per step beyond the network.

--tiny swaps in small architectures, fewer steps and repeats, so that the whole path runs on a
CPU in a few minutes: its figures are CPU smoke-test numbers and bench_docs.py refuses to render
them as GPU figures.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pdscli import __version__
from pdscli.bench.mfu import add_mfu, device_peak, measure_matmul_peak
from pdscli.devices import set_tf32, tf32_state
from pdscli.engines.onnx_export import at_precision
from pdscli.engines.graph_step import StepGraphSampler
from pdscli.engines.torch_engine import torch_score
from pdscli.machine import describe_machine
from pdscli.models.network import randomize
from pdscli.models import build_model, get_preset, settings_from_config
from pdscli.noise import NOISE_VERSION, SampleNoise, sample_seed
from pdscli.precondition import Filters, Preconditioner
from pdscli.samplers import REGISTRY, get_sampler, pc_steps
from pdscli.samplers.grids import make_steps

FORMAT = "pds-gpu-bench/1"
PC_FAMILY = ("pc", "pds", "predictor", "corrector")
GOALS = {
    "best_backend_vs_eager_fp32_256_b8": 3.0,
    "pds_overhead_share_of_nfe": 0.02,
    "pds66_vs_vanilla2000_speedup": 29.0,
    "mfu_bf16_b32": 0.40,
}
# Shares of --budget-s per part, in the order they run; time a part leaves unused rolls on to the next.
SHARES = {"noise": 0.04, "step_graphs": 0.10, "latency": 0.42, "overhead": 0.03, "e2e": 0.30, "samplers": 0.11}


# -- sizes -----------------------------------------------------------------------------------


def architectures(tiny: bool) -> dict[str, dict]:
    """name -> config. Tiny: the same kinds of network, small enough for a CPU."""
    cfgs = {"ffhq-256": get_preset("ffhq-256"), "ffhq-1024": get_preset("ffhq-1024")}
    if tiny:
        small = {"ffhq-256": dict(nf=16, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8]),
                 "ffhq-1024": dict(nf=8, ch_mult=[1, 2, 2, 2], num_res_blocks=1, attn_resolutions=[4])}
        for name, cfg in cfgs.items():
            cfg["model"].update(small[name])
            cfg["data"]["image_size"] = 32 if name == "ffhq-256" else 64
    return cfgs


def plan(tiny: bool) -> dict:
    if tiny:
        return dict(batches=[1, 2], warmup=1, repeats=2, noise_batch=2, graph_steps=2, graph_batch=2,
                    e2e_full=20, e2e_pds=4, sampler_nfe=4, sampler_batch=2, overhead_batches=[1, 2])
    return dict(batches=[1, 8, 32], warmup=3, repeats=10, noise_batch=8, graph_steps=10, graph_batch=8,
                e2e_full=2000, e2e_pds=66, sampler_nfe=20, sampler_batch=8, overhead_batches=[1, 8, 32])


# -- timing ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, *, warmup: int, repeats: int) -> dict:
    """Median, min and max seconds of `fn()` (CUDA events on a GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_s": float(np.median(times)), "min_s": times[0], "max_s": times[-1], "repeats": repeats}


class Budget:
    """A deadline per part: what does not fit is recorded as not measured, with the reason. A
    part gets its share of the time still left among the parts still to run."""

    def __init__(self, total_s: float):
        self.start, self.total = time.perf_counter(), total_s
        self.part_end = self.start

    def begin(self, part: str) -> None:
        now = time.perf_counter()
        later = list(SHARES)[list(SHARES).index(part):]
        left = max(0.0, self.start + self.total - now)
        self.part_end = now + left * SHARES[part] / sum(SHARES[k] for k in later)

    def left(self) -> float:
        return self.part_end - time.perf_counter()

    def over(self) -> bool:
        return self.left() <= 0


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- 1. noise --------------------------------------------------------------------------------


def part_noise(device: torch.device, p: dict, tiny: bool, budget: Budget) -> dict:
    shape = (3, 32, 32) if tiny else (3, 256, 256)
    b = p["noise_batch"]
    out: dict = {"noise_version": NOISE_VERSION, "shape": list(shape), "batch": b}
    cpu = [SampleNoise(7, range(b), shape, "cpu")() for _ in range(2)]
    if device.type == "cuda":
        for fused in (False, True):
            noise = SampleNoise(7, range(b), shape, device, fused=fused)
            got = [noise().cpu() for _ in range(2)]
            diff = max(float((g - c).abs().max()) for g, c in zip(got, cpu))
            equal = sum(int((g == c).sum()) for g, c in zip(got, cpu)) / sum(c.numel() for c in cpu)
            out[f"gpu_{'fused' if fused else 'eager'}_vs_cpu"] = {"max_abs_diff": diff, "bit_equal_share": equal}
        alone = SampleNoise(7, [b - 1], shape, device)()
        together = SampleNoise(7, range(b), shape, device)()[b - 1 : b]
        out["gpu_batch_independent"] = bool(torch.equal(alone, together))
    else:
        out["gpu_vs_cpu"] = "not measured: no GPU"
    timings = {}
    for label, fused in (("eager_ops", False), ("fused", True)):
        if fused and device.type != "cuda":
            timings[label] = "not measured: the fused kernel is the GPU path"
            continue
        noise = SampleNoise(7, range(b), shape, device, fused=fused)
        timings[label] = time_it(noise, device, warmup=2, repeats=10)
    gens = [torch.Generator(device=device).manual_seed(sample_seed(7, i)) for i in range(b)]
    timings["per_sample_generators_v1"] = time_it(
        lambda: torch.stack([torch.randn(shape, generator=g, device=device) for g in gens]), device, warmup=2, repeats=10)
    out["draw_time"] = timings
    return out


# -- shared model pieces ----------------------------------------------------------------------


class Nets:
    """Each architecture's random-weights network, built once on the device, and its copies at
    other precisions / layouts (`variant`: fp32, bf16, fp16, bf16-cl), shared by the parts."""

    def __init__(self, archs: dict, device: torch.device):
        self.archs, self.device, self.cache = archs, device, {}

    def get(self, arch: str, variant: str = "fp32"):
        key = (arch, variant)
        if key not in self.cache:
            if variant == "fp32":
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    torch.manual_seed(0)
                    net = build_model(self.archs[arch], device=self.device)
                self.cache[key] = randomize(net, 0).eval()
            else:  # bf16-cl: its own copy, since channels_last converts a module in place
                self.cache[key] = at_precision(self.get(arch), variant.split("-")[0]).eval()  # a fresh copy
        return self.cache[key]

    def score(self, arch: str, name: str, batch: int):
        """The score callable of backend `name` at `batch` (a CUDA graph is captured per batch size)."""
        if name in ("fp32", "tf32"):
            return torch_score(self.get(arch), device=self.device)
        if name in ("bf16", "fp16"):
            return torch_score(self.get(arch, name), device=self.device)
        if name == "bf16-channels-last":
            return torch_score(self.get(arch, "bf16-cl"), device=self.device, channels_last=True)
        if name == "cuda-graph-bf16":
            shape = settings_from_config(self.archs[arch]).shape
            return torch_score(self.get(arch, "bf16"), device=self.device, cuda_graph=True, batch_size=batch, shape=shape)
        if name == "compile-bf16":
            key = (arch, "compiled")
            if key not in self.cache:  # one compiled module; it compiles once per batch size (fixed shapes)
                self.cache[key] = torch_score(self.get(arch, "bf16"), device=self.device, compile=True)
            return self.cache[key]
        raise ValueError(name)


def count_flops(cfg: dict, shape, batch: int) -> int | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        meta = build_model(cfg, device="meta").eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta(torch.empty((batch, *shape), device="meta"), torch.ones(batch, device="meta"))
        return int(counter.get_total_flops())
    except Exception:
        return None


def synthetic_precond(shape, device) -> Preconditioner:
    """Filters of the right shape for timing (no data): the operator's cost does not depend on values."""
    rng = np.random.default_rng(0)
    filters = Filters(freq=rng.uniform(1, 5, shape), space=rng.uniform(0.1, 0.5, shape), size=shape[-1],
                      channels=shape[0], count=1, source="synthetic (timing only)")
    return Preconditioner.from_filters(filters, 5.0, device)


def inputs(settings, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(batch)
    x = torch.rand((batch, *settings.shape), generator=g).to(device)
    sigma = torch.exp(torch.empty(batch).uniform_(math.log(settings.sigma_min), math.log(settings.sigma_max), generator=g))
    return x, sigma.to(device)


# -- 3. latency per call ----------------------------------------------------------------------


BACKENDS = ("fp32", "tf32", "bf16", "fp16", "bf16-channels-last", "cuda-graph-bf16", "compile-bf16")
# What each computes in: the key of the peak its MFU is read against.
# A backend that cannot be stopped half-way (compiling) starts only with this much budget left.
MIN_LEFT_S = {"compile-bf16": 60.0}
PRECISION = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16", "fp16": "fp16", "bf16-channels-last": "bf16",
             "cuda-graph-bf16": "bf16", "compile-bf16": "bf16"}


def backend_reason(name: str, device: torch.device, tiny: bool) -> str | None:
    if device.type != "cuda":
        if name == "tf32":
            return "TF32 is a tensor-core mode of NVIDIA GPUs"
        if name.startswith("cuda-graph"):
            return "CUDA graphs need a GPU"
        if name.startswith("compile") and tiny:
            return "torch.compile takes minutes of C++ compilation on a small CPU: left out of --tiny"
    return None


def part_latency(arch: str, nets: Nets, p: dict, tiny: bool, share: float) -> dict:
    cfg, device = nets.archs[arch], nets.device
    settings = settings_from_config(cfg)
    shape = settings.shape
    net = nets.get(arch)
    flops = {b: count_flops(cfg, shape, b) for b in p["batches"]}
    entries, skipped = [], []
    deadline = time.perf_counter() + share
    refs = {}
    set_tf32("off")
    with torch.inference_mode():
        for b in p["batches"]:
            x, sigma = inputs(settings, b, device)
            refs[b] = (x, sigma, net(x, sigma).float())
    for name in BACKENDS:
        reason = backend_reason(name, device, tiny)
        need = MIN_LEFT_S.get(name, 0.0) if not tiny else 0.0
        if reason is None and time.perf_counter() > deadline - need:
            reason = f"not measured: less than {need:.0f} s of this part's time budget left" if need else \
                "not measured: over this part's time budget"
        if reason:
            skipped.append({"name": name, "reason": reason})
            continue
        entry = {"name": name, "status": "ok", "precision": PRECISION[name], "batches": []}
        set_tf32("on" if name == "tf32" else "off")
        t_setup = time.perf_counter()
        try:
            for b in p["batches"]:
                if time.perf_counter() > deadline - need:
                    entry.setdefault("not_measured", []).append({"batch": b, "reason": "over this part's time budget"})
                    continue
                x, sigma, ref = refs[b]
                score = nets.score(arch, name, b)
                t0 = time.perf_counter()
                first = score(x, sigma)  # compiles / captures / autotunes: reported, not timed
                sync(device)
                first_s = time.perf_counter() - t0
                stats = time_it(lambda: score(x, sigma), device, warmup=p["warmup"], repeats=p["repeats"])
                err = float((first.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                entry["batches"].append({"batch": b, **stats, "first_call_s": first_s, "images_per_s": b / stats["median_s"],
                                         "flops_per_call": flops[b], "max_rel_err_vs_fp32": err})
        except Exception as e:  # one backend failing must not end the run
            entry.update(status="failed", reason=one_line(e))
        entry["setup_s"] = time.perf_counter() - t_setup
        entries.append(entry)
        release(device)
    set_tf32("off")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    # Every entry names its compute precision (the tf32 row "tf32"), so the hook reads no flags.
    add_mfu(entries, gpu, tf32=False, measured_peaks=MEASURED_PEAKS)
    params = sum(t.numel() for t in net.parameters())
    release(device)
    return {"architecture": arch, "shape": list(shape), "params": params, "flops_per_call": flops,
            "backends": entries, "skipped": skipped}


MEASURED_PEAKS: dict = {}


def measure_peaks(device: torch.device, tiny: bool) -> dict:
    """The sustained matmul rate per precision on this device (one large GEMM each)."""
    n = 256 if tiny or device.type != "cuda" else 8192
    peaks = {}
    for label, dtype, tf32 in (("fp32", torch.float32, "off"), ("tf32", torch.float32, "on"), ("bf16", torch.bfloat16, "off"),
                               ("fp16", torch.float16, "off")):
        if device.type != "cuda" and label in ("tf32", "fp16"):
            continue
        set_tf32(tf32)
        try:
            peaks[label] = measure_matmul_peak(device, dtype, n=n, repeats=3 if tiny else 20)
        except Exception as e:
            peaks[label] = None
            print(f"peak {label}: {one_line(e)}", file=sys.stderr)
    set_tf32("off")
    MEASURED_PEAKS.update({k: v for k, v in peaks.items() if v})
    return {"matmul_n": n, "flops_per_s": peaks,
            "listed": {prec: (device_peak(torch.cuda.get_device_name(device), prec) if device.type == "cuda" else None)
                       for prec in ("fp32", "tf32", "bf16", "fp16")}}


def fastest(latency: dict, batch: int) -> tuple[str, float] | None:
    best = None
    for e in latency.get("backends", []):
        if e.get("status") != "ok":
            continue
        for r in e["batches"]:
            if r["batch"] == batch and (best is None or r["median_s"] < best[1]):
                best = (e["name"], r["median_s"])
    return best


# -- 2. step graphs ---------------------------------------------------------------------------


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Bit equality (NaN equal to NaN), the largest difference where both are finite relative to
    the reference's scale, and the elements finite in one and not the other (random weights can
    overflow)."""
    both = torch.isfinite(got) & torch.isfinite(ref)
    same = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
    scale = float(ref[both].abs().max()) if bool(both.any()) else 1.0
    diff = float((got - ref)[both].abs().max()) / max(scale, 1e-30) if bool(both.any()) else 0.0
    return {"bit_equal": bool(same.all()), "max_rel_diff": diff, "nan_mismatches": int((~both & ~same).sum())}


def part_step_graphs(nets: Nets, p: dict, budget: Budget) -> dict:
    """Each sampler through StepGraphSampler against the eager sampler on the same batches: the
    samples and the time per step of both; the bf16 network on a GPU (fp32 on a CPU, where bf16
    convolutions are slow)."""
    device = nets.device
    settings = settings_from_config(nets.archs["ffhq-256"])
    variant = "bf16" if device.type == "cuda" else "fp32"
    score = torch_score(nets.get("ffhq-256", variant), device=device)
    precond = synthetic_precond(settings.shape, device)
    b, n = p["graph_batch"], p["graph_steps"]
    rows = []
    for name, info in REGISTRY.items():
        if budget.over():
            rows.append({"sampler": name, "status": "not measured: over this part's time budget"})
            continue
        steps = pc_steps(settings, n) if info.pc_grid else make_steps("geometric", settings, n)
        kw = {"precond": precond} if name == "pds" else {}
        fn = get_sampler(name)
        wrapped = StepGraphSampler(fn, device)
        try:
            diffs, t_eager, t_graph = [], [], []
            for k in range(4):  # warm-up, capture + replay, replay, replay
                batch = list(range(k * b, (k + 1) * b))
                sync(device)
                t0 = time.perf_counter()
                eager = fn(score, SampleNoise(1, batch, settings.shape, device), steps, **kw)
                sync(device)
                t1 = time.perf_counter()
                got = wrapped(score, SampleNoise(1, batch, settings.shape, device), steps, **kw)
                sync(device)
                t2 = time.perf_counter()
                if k >= 2:
                    t_eager.append(t1 - t0)
                    t_graph.append(t2 - t1)
                diffs.append(compare(got, eager))
            rows.append({"sampler": name, "status": "ok", "steps": n, "batch": b, **wrapped.summary(),
                         "bit_equal": all(d["bit_equal"] for d in diffs),
                         "max_rel_diff_vs_eager": max(d["max_rel_diff"] for d in diffs),
                         "nan_mismatches": sum(d["nan_mismatches"] for d in diffs),
                         "eager_per_step_s": float(np.median(t_eager)) / n,
                         "graph_per_step_s": float(np.median(t_graph)) / n})
        except Exception as e:
            rows.append({"sampler": name, "status": "failed", "reason": one_line(e)})
    release(device)
    return {"architecture": f"ffhq-256 ({variant})", "rows": rows}


# -- 4. PDS overhead --------------------------------------------------------------------------


def part_overhead(nets: Nets, p: dict, latency: dict) -> dict:
    device = nets.device
    settings = settings_from_config(nets.archs["ffhq-256"])
    precond = synthetic_precond(settings.shape, device)
    rows = []
    for b in p["overhead_batches"]:
        z = torch.randn((b, *settings.shape), device=device)
        noise = time_it(lambda: precond.noise(z), device, warmup=3, repeats=20)
        grad = time_it(lambda: precond.grad(z), device, warmup=3, repeats=20)
        draw = time_it(SampleNoise(0, range(b), settings.shape, device), device, warmup=3, repeats=20)
        per_nfe = noise["median_s"] + grad["median_s"]
        best = fastest(latency, b)
        rows.append({"batch": b, "m_z_s": noise["median_s"], "m_mt_g_s": grad["median_s"], "per_nfe_s": per_nfe,
                     "noise_draw_s": draw["median_s"], "fastest_backend": best and best[0],
                     "fastest_nfe_s": best and best[1], "share_of_fastest_nfe": best and per_nfe / best[1]})
    return {"architecture": "ffhq-256", "rows": rows}


# -- 5. end to end ----------------------------------------------------------------------------


def part_e2e(nets: Nets, p: dict, latency: dict, budget: Budget) -> dict:
    device = nets.device
    settings = settings_from_config(nets.archs["ffhq-1024"])
    best = fastest(latency, 1)
    name = best[0] if best else "fp32"
    set_tf32("on" if name == "tf32" else "off")
    score = nets.score("ffhq-1024", name, 1)
    precond = synthetic_precond(settings.shape, device)
    runs = []
    for label, sampler, n, pre in (("PDS", "pds", p["e2e_pds"], precond), ("vanilla PC", "pc", p["e2e_full"], None)):
        steps = pc_steps(settings, n)
        if label == "vanilla PC" and runs and budget.left() < runs[0]["wall_s"] * p["e2e_full"] / p["e2e_pds"] * 1.2:
            runs.append({"label": label, "steps": n, "status": "not measured: would not fit the time budget "
                         f"(PDS took {runs[0]['wall_s']:.3g} s for {p['e2e_pds']} steps)"})
            continue
        fn = get_sampler(sampler)
        fn(score, SampleNoise(0, [1], settings.shape, device), pc_steps(settings, 2), precond=pre)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        fn(score, SampleNoise(0, [0], settings.shape, device), steps, precond=pre)
        sync(device)
        runs.append({"label": label, "sampler": sampler, "steps": n, "nfe": 2 * n, "status": "ok",
                     "wall_s": time.perf_counter() - t0})
    set_tf32("off")
    ok = {r["label"]: r for r in runs if r.get("status") == "ok"}
    speedup = ok["vanilla PC"]["wall_s"] / ok["PDS"]["wall_s"] if len(ok) == 2 else None
    release(device)
    return {"architecture": "ffhq-1024", "backend": name, "batch": 1, "runs": runs, "speedup": speedup,
            "nfe_ratio": p["e2e_full"] / p["e2e_pds"]}


# -- 6. samplers ------------------------------------------------------------------------------


def part_samplers(nets: Nets, p: dict, latency: dict, budget: Budget) -> dict:
    """Every sampler at an equal NFE budget: wall time per step, and per step beyond its score calls."""
    device = nets.device
    settings = settings_from_config(nets.archs["ffhq-256"])
    b = p["sampler_batch"]
    best = fastest(latency, b)
    name = best[0] if best else "fp32"
    set_tf32("on" if name == "tf32" else "off")
    score = nets.score("ffhq-256", name, b)
    x, sigma = inputs(settings, b, device)
    call = time_it(lambda: score(x, sigma), device, warmup=2, repeats=10)["median_s"]
    precond = synthetic_precond(settings.shape, device)
    rows = []
    for sampler, info in REGISTRY.items():
        if budget.over():
            rows.append({"sampler": sampler, "status": "not measured: over this part's time budget"})
            continue
        n = max(1, (p["sampler_nfe"] - info.nfe_offset) // info.nfe_per_step)
        steps = pc_steps(settings, n) if info.pc_grid else make_steps("geometric", settings, n)
        kw = {"precond": precond} if sampler == "pds" else {}
        fn = get_sampler(sampler)
        try:
            wall = time_it(lambda: fn(score, SampleNoise(0, range(b), settings.shape, device), steps, **kw), device,
                           warmup=1, repeats=3)["median_s"]
            nfe = info.nfe(n)
            rows.append({"sampler": sampler, "status": "ok", "steps": n, "nfe": nfe, "wall_s": wall,
                         "per_step_s": wall / n, "overhead_per_step_s": (wall - nfe * call) / n,
                         "overhead_share": (wall - nfe * call) / wall})
        except Exception as e:
            rows.append({"sampler": sampler, "status": "failed", "reason": one_line(e)})
    set_tf32("off")
    release(device)
    return {"architecture": "ffhq-256", "backend": name, "batch": b, "nfe_per_call_s": call, "rows": rows}


# -- goals ------------------------------------------------------------------------------------


def goals(report: dict) -> dict:
    out = {}
    lat256 = report["latency"].get("ffhq-256", {})
    rows = {e["name"]: {r["batch"]: r for r in e["batches"]} for e in lat256.get("backends", []) if e.get("status") == "ok"}
    b8 = 8 if not report["tiny"] else 2
    base = rows.get("fp32", {}).get(b8)
    best = fastest(lat256, b8)
    if base and best:
        out["best_backend_vs_eager_fp32_256_b8"] = {"value": base["median_s"] / best[1], "backend": best[0]}
    ov = [r for r in report.get("pds_overhead", {}).get("rows", []) if r.get("batch") == b8 and r.get("share_of_fastest_nfe")]
    if ov:
        out["pds_overhead_share_of_nfe"] = {"value": ov[0]["share_of_fastest_nfe"]}
    if report.get("e2e", {}).get("speedup"):
        out["pds66_vs_vanilla2000_speedup"] = {"value": report["e2e"]["speedup"]}
    b32 = 32 if not report["tiny"] else 2
    mfus = [(arch, r.get("mfu")) for arch, lat in report["latency"].items() for e in lat.get("backends", [])
            if e.get("name") == "bf16" and e.get("status") == "ok" for r in e["batches"] if r["batch"] == b32]
    if mfus and any(m for _, m in mfus):
        arch, m = max(((a, m) for a, m in mfus if m), key=lambda t: t[1])
        out["mfu_bf16_b32"] = {"value": m, "architecture": arch}
    for key, res in out.items():
        target = GOALS[key]
        res["goal"] = target
        res["met"] = res["value"] <= target if key == "pds_overhead_share_of_nfe" else res["value"] >= target
    return out


# -- main -------------------------------------------------------------------------------------


class HardStop(BaseException):
    """Raised by the alarm at --hard-stop-s: the run ends with what it has, rather than being killed."""

    fired = False


def _hard_stop(signum, frame):
    HardStop.fired = True
    raise HardStop("hard stop: --hard-stop-s reached")


OUT: list[Path] = []


def save(report: dict) -> None:
    """Write the report as it stands (atomically): called between parts and at the end."""
    if not OUT:
        return
    path = OUT[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tiny, p = args.tiny, plan(args.tiny)
    budget = Budget(args.budget_s)
    started = time.perf_counter()
    archs = architectures(tiny)
    nets = Nets(archs, device)
    report = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tiny": tiny, "device": str(device),
              "command": shlex.join(["python", "scripts/gpu_bench.py", *sys.argv[1:]]), "pds_version": __version__,
              "python": platform.python_version(), "machine": describe_machine(device), "plan": p,
              "tf32_default": tf32_state(device)}
    torch.backends.cudnn.benchmark = False  # the library's default: figures a plain `pds sample` gets

    def log(msg):
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    def guarded(part, fn, label=None):
        save(report)  # what is measured so far survives a run that is cut short
        if HardStop.fired:
            return {"status": "not measured", "reason": "the run was stopped at --hard-stop-s"}
        if part is not None:  # None: a piece of a part already begun
            budget.begin(part)
        log(f"{label or part} ...")
        try:
            return fn()
        except (Exception, HardStop) as e:  # a part failing must not lose the others' figures
            log(f"{label or part} failed: {one_line(e)}")
            return {"status": "failed", "reason": one_line(e)}

    report["peaks"] = measure_peaks(device, tiny)
    report["noise"] = guarded("noise", lambda: part_noise(device, p, tiny, budget))
    report["step_graphs"] = guarded("step_graphs", lambda: part_step_graphs(nets, p, budget))
    report["latency"] = {}
    budget.begin("latency")
    for arch in archs:
        share = max(0.0, budget.left()) * (0.45 if arch == "ffhq-256" else 1.0)
        report["latency"][arch] = guarded(None, lambda arch=arch, share=share: part_latency(arch, nets, p, tiny, share),
                                          label=f"latency {arch}")
    report["pds_overhead"] = guarded("overhead", lambda: part_overhead(nets, p, report["latency"].get("ffhq-256", {})))
    report["e2e"] = guarded("e2e", lambda: part_e2e(nets, p, report["latency"].get("ffhq-1024", {}), budget))
    report["samplers"] = guarded("samplers", lambda: part_samplers(nets, p, report["latency"].get("ffhq-256", {}), budget))
    report["goals"] = goals(report)
    report["elapsed_s"] = time.perf_counter() - started
    report["complete"] = not HardStop.fired
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="where to write the JSON report")
    ap.add_argument("--tiny", action="store_true", help="small architectures and step counts: a CPU smoke run")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is visible")
    ap.add_argument("--budget-s", type=float, default=480.0, help="seconds for all the parts together (default 480)")
    ap.add_argument("--hard-stop-s", type=float, default=None,
                    help="stop whatever runs at this many seconds and write what was measured (default: budget + 60)")
    args = ap.parse_args(argv)
    if args.tiny and "docs" in args.out.resolve().parts:
        ap.error("a --tiny run makes CPU smoke-test numbers: write it outside docs/")
    OUT[:] = [args.out]
    signal.signal(signal.SIGALRM, _hard_stop)
    signal.alarm(int(args.hard_stop_s if args.hard_stop_s is not None else args.budget_s + 60))
    try:
        report = run(args)
    finally:
        signal.alarm(0)
    save(report)
    print(f"wrote {args.out} ({report['elapsed_s']:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
