"""The GPU measurements of docs/benchmarks.md, in one run of under ten minutes on an NVIDIA H100 or H200.

    timeout 580 python scripts/gpu_bench.py --out gpu-h100.json --budget-s 450 --hard-stop-s 520   # the GPU machine
    PYTHONPATH=. python scripts/gpu_bench.py --tiny --out /tmp/gpu-tiny.json     # a CPU smoke run (tiny sizes)
    python scripts/bench_docs.py                                                 # render the JSON into the docs

What it measures (each part under its own share of --budget-s; what the budget cuts is listed
as not measured, never silently dropped):

1. noise: the counter-based generator on the GPU against the CPU (same numbers up to float
   rounding), the fused kernel against the eager ops, batch independence on the device, and the
   time of one draw against the per-sample torch.Generator loop it replaced;
2. latency: per network call of the ffhq-256 and ffhq-1024 architectures (random weights) at
   batch 1, 8, 32: eager fp32 (TF32 off), TF32, bf16, fp16, bf16 channels-last, a CUDA graph of
   the bf16 call, torch.compile of it, ONNX Runtime's CUDA provider and a TensorRT fp16 engine
   (each listed with the reason where it cannot run); images/s, MFU against the listed and the
   measured peak;
3. PDS overhead: one M z and one M M^T g per NFE, as a share of the fastest backend's call;
4. end to end on ffhq-1024, batch 1, fastest backend: vanilla PC at 2000 steps against PDS at 66;
5. samplers: every sampler at 20 NFE on the 256 architecture, time per step beyond the network;
6. step graphs: every sampler's samples from replayed CUDA graphs against the eager step, and
   the time per step of both;
7. compiled steps: a few samplers through torch.compile(mode="reduce-overhead") as whole steps
   (pdscli.engines.graph_step.CompiledStepSampler) against the eager step: compile time, the
   samples, the time per step.

The parts that decide the goals run first; the ones that compile or capture run last, so a run
cut short by --hard-stop-s loses those rather than the goals. The measuring itself is
pdscli.bench's (backends, timing, FLOPs, MFU, overhead, the end-to-end and sampler runs, the
step plans); this script picks the sizes, holds the budget and adds the GPU-only comparisons.

--tiny swaps in small architectures, fewer steps and repeats, so that the whole path runs on a
CPU in a few minutes: its figures are CPU smoke-test numbers and bench_docs.py refuses to render
them as GPU figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pdscli import __version__
from pdscli.bench.backends import Backend, make_backend, unavailable_reason
from pdscli.bench.config import BenchConfig, error_line
from pdscli.bench.export_cache import ExportCache
from pdscli.bench.latency import fastest_nfe, measure_backend, reference_outputs, release
from pdscli.bench.mfu import add_mfu, device_peak, measure_peaks
from pdscli.bench.model import count_flops, nfe_inputs, random_network_model
from pdscli.bench.overhead import measure_overhead
from pdscli.bench.preconditioner import PreconditionerCache, spectrum_filters
from pdscli.bench.runs import run_end_to_end, run_samplers
from pdscli.bench.timing import sync, time_calls
from pdscli.devices import set_tf32, tf32_state
from pdscli.engines.graph_step import CompiledStepSampler, StepGraphSampler
from pdscli.engines.onnx_export import at_precision
from pdscli.engines.torch_engine import torch_score
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.fsutil import atomic_write_text
from pdscli.machine import describe_machine
from pdscli.models import get_preset
from pdscli.noise import NOISE_VERSION, SampleNoise, sample_seed
from pdscli.precondition.alpha import ALPHA_REFERENCE
from pdscli.samplers import REGISTRY, get_sampler
from pdscli.samplers import plan as planner

FORMAT = "pds-gpu-bench/1"
GOALS = {
    "best_backend_vs_eager_fp32_256_b8": 3.0,
    "pds_overhead_share_of_nfe": 0.02,
    "pds66_vs_vanilla2000_speedup": 29.0,
    "mfu_bf16_b32": 0.40,
}
# Shares of --budget-s per part, in the order they run; time a part leaves unused rolls on to the next.
SHARES = {"noise": 0.03, "latency": 0.42, "overhead": 0.03, "e2e": 0.26, "samplers": 0.07, "step_graphs": 0.09,
          "compiled_steps": 0.10}
# Each compiles the network again: a few, not all; the one with the fewest graph breaks first.
COMPILED_SAMPLERS = ("ddim", "pc", "pds")
TINY_COMPILED_SAMPLERS = ("ddim",)


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
                    e2e_full=20, e2e_pds=4, sampler_nfe=4, sampler_batch=2)
    return dict(batches=[1, 8, 32], warmup=3, repeats=10, noise_batch=8, graph_steps=10, graph_batch=8,
                e2e_full=2000, e2e_pds=66, sampler_nfe=20, sampler_batch=8)


def bench_config(p: dict, **kw) -> BenchConfig:
    """The pdscli.bench settings its measuring functions read here: sizes, repeats, seed, and
    no quality figure (random weights make noise images)."""
    return BenchConfig(**{"batch_sizes": p["batches"], "warmup": p["warmup"], "repeats": p["repeats"], "seed": 0,
                          "e2e_batch": p["sampler_batch"], "e2e_repeats": 2, "quality_samples": 0, **kw})


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


def time_it(fn, device: torch.device, *, warmup: int = 2, repeats: int = 10) -> dict:
    """pdscli.bench's timing without the raw list (this report keeps summaries)."""
    stats = time_calls(fn, warmup=warmup, repeats=repeats, device=device)
    stats.pop("times_s")
    return stats


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
        timings[label] = time_it(SampleNoise(7, range(b), shape, device, fused=fused), device)
    gens = [torch.Generator(device=device).manual_seed(sample_seed(7, i)) for i in range(b)]
    timings["per_sample_generators_v1"] = time_it(
        lambda: torch.stack([torch.randn(shape, generator=g, device=device) for g in gens]), device)
    out["draw_time"] = timings
    return out


# -- the networks -----------------------------------------------------------------------------


class Nets:
    """Each architecture's random-weights network as a pdscli.bench model, built once on the
    device, its bf16 copy and its backends, shared by the parts (a compiled or captured backend
    is not compiled or captured again)."""

    def __init__(self, archs: dict, device: torch.device, batches: list[int], cache: ExportCache):
        self.archs, self.device, self.batches, self.cache = archs, device, batches, cache
        self.models, self.bf16, self.backends = {}, {}, {}

    def model(self, arch: str):
        if arch not in self.models:
            model = random_network_model(self.device, config=self.archs[arch], seed=0)
            model.name = f"random:{arch}"
            self.models[arch] = model
        return self.models[arch]

    def bf16_net(self, arch: str):
        if arch not in self.bf16:
            self.bf16[arch] = at_precision(self.model(arch).net, "bf16")
        return self.bf16[arch]

    def backend(self, arch: str, name: str) -> Backend:
        if (arch, name) not in self.backends:
            self.backends[arch, name] = make_gpu_backend(name, self, arch)
        return self.backends[arch, name]


# What each backend computes in (the key of the peak its MFU is read against) and how it is made:
# pdscli.bench's own backends by their `pds bench` names, the GPU variants here.
BACKENDS = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16", "fp16": "fp16", "bf16-channels-last": "bf16",
            "cuda-graph-bf16": "bf16", "compile-bf16": "bf16", "onnx-cuda": "fp32", "trt-fp16": "fp16"}
BENCH_NAMES = {"fp32": "eager", "tf32": "eager"}  # the pdscli.bench backend a name runs
# A backend that cannot be stopped half-way (compiling, building an engine) starts only with this much budget left.
MIN_LEFT_S = {"compile-bf16": 60.0, "onnx-cuda": 60.0, "trt-fp16": 120.0}


def backend_reason(name: str, nets: Nets, arch: str, tiny: bool) -> str | None:
    """Why backend `name` is not measured here (None: it is)."""
    device = nets.device
    if name in ("onnx-cuda", "trt-fp16"):  # pdscli.bench knows: the ORT build's providers, TensorRT installed
        return unavailable_reason(name, nets.model(arch))
    if device.type != "cuda":
        if name == "tf32":
            return "TF32 is a tensor-core mode of NVIDIA GPUs"
        if name.startswith("cuda-graph"):
            return "CUDA graphs need a GPU"
        if name.startswith("compile") and tiny:
            return "torch.compile takes minutes of C++ compilation on a small CPU: left out of --tiny"
    return None


def make_gpu_backend(name: str, nets: Nets, arch: str) -> Backend:
    model, device = nets.model(arch), nets.device
    if name in ("fp32", "tf32", "bf16", "fp16", "onnx-cuda", "trt-fp16"):
        return make_backend(BENCH_NAMES.get(name, name), model, nets.cache, None, nets.batches)
    if name == "bf16-channels-last":  # its own copy: channels_last converts a module in place
        score = torch_score(at_precision(model.net, "bf16"), device=device, channels_last=True)
        return Backend(name, lambda b: score, {"precision": "bf16"})
    if name == "cuda-graph-bf16":
        def make(b):
            return torch_score(nets.bf16_net(arch), device=device, cuda_graph=True, batch_size=b, shape=model.shape)
        return Backend(name, make, {"precision": "bf16"}, per_batch=True)
    if name == "compile-bf16":  # one compiled module; it compiles once per batch size (fixed shapes)
        score = torch_score(nets.bf16_net(arch), device=device, compile=True)
        return Backend(name, lambda b: score, {"precision": "bf16"})
    raise ValueError(name)


# -- 2. latency per call ----------------------------------------------------------------------


def part_latency(arch: str, nets: Nets, p: dict, tiny: bool, share: float) -> dict:
    model = nets.model(arch)
    cfg = bench_config(p)
    flops = count_flops(model, p["batches"])
    refs = reference_outputs(model, cfg)  # eager fp32 with TF32 off: what every backend is compared with
    entries, skipped = [], []
    deadline = time.perf_counter() + share
    for name, precision in BACKENDS.items():
        reason = backend_reason(name, nets, arch, tiny)
        need = MIN_LEFT_S.get(name, 0.0) if not tiny else 0.0
        if reason is None and time.perf_counter() > deadline - need:
            reason = f"not measured: less than {need:.0f} s of this part's time budget left" if need else \
                "not measured: over this part's time budget"
        if reason:
            skipped.append({"name": name, "reason": reason})
            continue
        entries.append(measure_one(name, precision, nets, arch, cfg, flops, refs, deadline - need))
        release(nets.device)
    set_tf32("off")
    gpu = torch.cuda.get_device_name(nets.device) if nets.device.type == "cuda" else None
    # Every entry names its compute precision (the tf32 row "tf32"), so the hook reads no flags.
    add_mfu(entries, gpu, tf32=False, measured_peaks=MEASURED_PEAKS)
    return {"architecture": arch, "shape": list(model.shape), "params": model.info["num_params"],
            "flops_per_call": {str(b): f for b, f in (flops.get("per_call") or {}).items()},
            "backends": entries, "skipped": skipped}


def measure_one(name, precision, nets, arch, cfg, flops, refs, deadline) -> dict:
    """One backend at every batch that fits before `deadline`; a failure is the entry's status."""
    entry = {"name": name, "status": "ok", "precision": precision, "batches": []}
    set_tf32("on" if name == "tf32" else "off")
    t0 = time.perf_counter()
    try:
        backend = nets.backend(arch, name)
        for b in cfg.batch_sizes:
            if time.perf_counter() > deadline:
                entry.setdefault("not_measured", []).append({"batch": b, "reason": "over this part's time budget"})
                continue
            rows = measure_backend(backend, nets.model(arch), dataclasses.replace(cfg, batch_sizes=[b]), flops, refs)
            for row in rows:
                row.pop("times_s")
            entry["batches"] += rows
    except Exception as e:  # one backend failing must not end the run
        entry.update(status="failed", reason=error_line(e))
    entry["setup_s"] = time.perf_counter() - t0
    return entry


MEASURED_PEAKS: dict = {}


def part_peaks(device: torch.device, tiny: bool) -> dict:
    """The sustained matmul rate per precision on this device (one large GEMM each), and the listed ones."""
    n = 256 if tiny or device.type != "cuda" else 8192
    peaks = measure_peaks(device, n=n, repeats=3 if tiny else 20)
    MEASURED_PEAKS.update({k: v for k, v in peaks.items() if v})
    return {"matmul_n": n, "flops_per_s": peaks,
            "listed": {prec: (device_peak(torch.cuda.get_device_name(device), prec) if device.type == "cuda" else None)
                       for prec in ("fp32", "tf32", "bf16", "fp16")}}


def fastest(latency: dict, batch: int) -> tuple[str, float] | None:
    return fastest_nfe(latency.get("backends", []), batch)


def fastest_score(nets: Nets, arch: str, latency: dict, batch: int):
    """(name, score callable at `batch`) of the fastest backend measured at `batch`, else eager fp32."""
    best = fastest(latency, batch)
    name = best[0] if best else "fp32"
    set_tf32("on" if name == "tf32" else "off")
    return name, nets.backend(arch, name).score_for(batch)


def synthetic_preconds(model, device: torch.device) -> PreconditionerCache:
    """Filters of the right shape for timing (no data): the operator's cost does not depend on values."""
    c, size, _ = model.shape
    return PreconditionerCache(spectrum_filters(GaussianImageModel(size, c)), f"{ALPHA_REFERENCE:g}", model.settings, device)


# -- 3. PDS overhead --------------------------------------------------------------------------


def part_overhead(nets: Nets, p: dict, latency: dict) -> dict:
    model, device = nets.model("ffhq-256"), nets.device
    cfg = dataclasses.replace(bench_config(p), warmup=3, repeats=20)
    precond = synthetic_preconds(model, device).for_steps(p["e2e_pds"])
    out = measure_overhead(cfg, model, precond, latency.get("backends", []), None)
    for row in out["batches"]:
        for key in ("noise", "grad"):
            row[key].pop("times_s")
        row["noise_draw"] = time_it(SampleNoise(0, range(row["batch"]), model.shape, device), device, warmup=3, repeats=20)
    return {"architecture": "ffhq-256", "synthetic_filters": True, **out}


# -- 4. end to end ----------------------------------------------------------------------------


def part_e2e(nets: Nets, p: dict, latency: dict, budget: Budget) -> dict:
    """pdscli.bench's end-to-end run (vanilla PC at 2000 steps, PDS at 66, same noise), batch 1,
    on the fastest backend; not started when the calls alone would not fit the budget."""
    model, device = nets.model("ffhq-1024"), nets.device
    name, score = fastest_score(nets, "ffhq-1024", latency, 1)
    cfg = bench_config(p, full_steps=p["e2e_full"], steps=p["e2e_pds"], e2e_batch=1, e2e_repeats=1)
    best = fastest(latency, 1)
    calls = 2 * (p["e2e_full"] + p["e2e_pds"])
    if best and best[1] * calls * 1.2 > budget.left():
        return {"status": "not measured", "backend": name, "reason": f"would not fit the time budget: {calls} calls "
                f"at {best[1] * 1e3:.3g} ms need {best[1] * calls:.0f} s, {max(0.0, budget.left()):.0f} s left"}
    out = run_end_to_end(cfg, model, score, synthetic_preconds(model, device), None, log)
    for run in out["runs"]:
        run.pop("samples", None)
        run["timing"].pop("times_s", None)
        run["wall_s"] = run["timing"]["median_s"]
    set_tf32("off")
    release(device)
    return {"architecture": "ffhq-1024", "backend": name, **out}


# -- 5. samplers ------------------------------------------------------------------------------


def part_samplers(nets: Nets, p: dict, latency: dict) -> dict:
    """Every sampler at an equal NFE budget (pdscli.bench's sampler runs): wall time per step,
    and per step beyond its score calls."""
    model, device, b = nets.model("ffhq-256"), nets.device, p["sampler_batch"]
    name, score = fastest_score(nets, "ffhq-256", latency, b)
    x, sigma = nfe_inputs(model.settings, b, device)
    call = time_it(lambda: score(x, sigma), device)["median_s"]
    cfg = bench_config(p, samplers=list(REGISTRY), nfe=[p["sampler_nfe"]], e2e_batch=b, e2e_repeats=2)
    out = run_samplers(cfg, model, score, synthetic_preconds(model, device), None, log)
    rows = []
    for r in out["rows"]:
        if r["status"] != "ok":
            rows.append({"sampler": r["sampler"], "status": f"skipped: {r['reason']}"})
            continue
        wall, n, nfe = r["timing"]["median_s"], r["steps"], r["nfe"]
        rows.append({"sampler": r["sampler"], "status": "ok", "steps": n, "nfe": nfe, "wall_s": wall,
                     "per_step_s": wall / n, "overhead_per_step_s": (wall - nfe * call) / n,
                     "overhead_share": (wall - nfe * call) / wall, "finite": r["finite"]})
    set_tf32("off")
    release(device)
    return {"architecture": "ffhq-256", "backend": name, "batch": b, "nfe_per_call_s": call, "rows": rows}


# -- 6, 7. whole steps: CUDA graphs and torch.compile(mode="reduce-overhead") ---------------------


def compare(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """Bit equality (NaN equal to NaN), the largest difference where both are finite relative to
    the reference's scale, and the elements finite in one and not the other (random weights can
    overflow)."""
    both = torch.isfinite(got) & torch.isfinite(ref)
    same = (got == ref) | (torch.isnan(got) & torch.isnan(ref))
    scale = float(ref[both].abs().max()) if bool(both.any()) else 1.0
    diff = float((got - ref)[both].abs().max()) / max(scale, 1e-30) if bool(both.any()) else 0.0
    return {"bit_equal": bool(same.all()), "max_rel_diff": diff, "nan_mismatches": int((~both & ~same).sum())}


def whole_steps(nets: Nets, p: dict, budget: Budget, wrap, samplers) -> dict:
    """Each sampler wrapped by `wrap(fn, device)` against the eager sampler on the same batches:
    the samples and the time per step of both; the bf16 network on a GPU (fp32 on a CPU, where
    bf16 convolutions are slow)."""
    model, device = nets.model("ffhq-256"), nets.device
    variant = "bf16" if device.type == "cuda" else "fp32"
    score = torch_score(nets.bf16_net("ffhq-256") if variant == "bf16" else model.net, device=device)
    preconds = synthetic_preconds(model, device)
    b, n = p["graph_batch"], p["graph_steps"]
    rows = []
    for name in samplers:
        if budget.over():
            rows.append({"sampler": name, "status": "not measured: over this part's time budget"})
            continue
        planned = planner.plan(name, settings=model.settings, steps=n)  # its own grid and parts, as `pds sample` plans them
        steps = planned.steps
        kw = {**planned.sampler_options(), **({"precond": preconds.for_steps(n)} if name == "pds" else {})}
        fn = get_sampler(name)
        wrapped = wrap(fn, device)
        try:
            diffs, t_eager, t_wrapped = [], [], []
            for k in range(4):  # warm-up, capture or compile, then replays
                batch = list(range(k * b, (k + 1) * b))
                sync(device)
                t0 = time.perf_counter()
                eager = fn(score, SampleNoise(1, batch, model.shape, device), steps, **kw)
                sync(device)
                t1 = time.perf_counter()
                got = wrapped(score, SampleNoise(1, batch, model.shape, device), steps, **kw)
                sync(device)
                t2 = time.perf_counter()
                if k >= 2:
                    t_eager.append(t1 - t0)
                    t_wrapped.append(t2 - t1)
                diffs.append(compare(got, eager))
            rows.append({"sampler": name, "status": "ok", "steps": n, "batch": b, **wrapped.summary(),
                         "bit_equal": all(d["bit_equal"] for d in diffs),
                         "max_rel_diff_vs_eager": max(d["max_rel_diff"] for d in diffs),
                         "nan_mismatches": sum(d["nan_mismatches"] for d in diffs),
                         "eager_per_step_s": float(np.median(t_eager)) / n,
                         "graph_per_step_s": float(np.median(t_wrapped)) / n})
        except Exception as e:
            rows.append({"sampler": name, "status": "failed", "reason": error_line(e)})
        release(device)
    return {"architecture": f"ffhq-256 ({variant})", "rows": rows}


def part_step_graphs(nets: Nets, p: dict, budget: Budget) -> dict:
    return whole_steps(nets, p, budget, StepGraphSampler, list(REGISTRY))


def part_compiled_steps(nets: Nets, p: dict, budget: Budget, tiny: bool) -> dict:
    if tiny:  # Inductor's C++ compile of a network takes minutes on a small CPU; Dynamo alone shows the path
        def wrap(fn, device):
            return CompiledStepSampler(fn, device, mode=None, backend="eager")
    else:
        wrap = CompiledStepSampler
    out = whole_steps(nets, p, budget, wrap, TINY_COMPILED_SAMPLERS if tiny else COMPILED_SAMPLERS)
    out["compile"] = "dynamo only (backend eager): --tiny" if tiny else 'torch.compile(mode="reduce-overhead")'
    return out


# -- goals ------------------------------------------------------------------------------------


def goals(report: dict) -> dict:
    """Each goal of the GPU issue, as measured: value, target, met (a goal with no figure is listed
    as not measured, with why)."""
    latency = report.get("latency", {})
    lat256 = latency.get("ffhq-256", {})
    rows = {e["name"]: {r["batch"]: r for r in e["batches"]} for e in lat256.get("backends", []) if e.get("status") == "ok"}
    b8, b32 = (2, 2) if report["tiny"] else (8, 32)
    out = {}
    base, best = rows.get("fp32", {}).get(b8), fastest(lat256, b8)
    if base and best:
        out["best_backend_vs_eager_fp32_256_b8"] = {"value": base["median_s"] / best[1], "backend": best[0]}
    ov = [r for r in report.get("pds_overhead", {}).get("batches", [])
          if r.get("batch") == b8 and r.get("fraction_of_fastest_nfe")]
    if ov:
        out["pds_overhead_share_of_nfe"] = {"value": ov[0]["fraction_of_fastest_nfe"], "backend": ov[0]["fastest_backend"]}
    if report.get("e2e", {}).get("speedup"):
        out["pds66_vs_vanilla2000_speedup"] = {"value": report["e2e"]["speedup"], "backend": report["e2e"]["backend"]}
    mfus = [(arch, r.get("mfu")) for arch, lat in latency.items() for e in lat.get("backends", [])
            if e.get("name") == "bf16" and e.get("status") == "ok" for r in e["batches"] if r["batch"] == b32]
    if any(m for _, m in mfus):
        arch, m = max(((a, m) for a, m in mfus if m), key=lambda t: t[1])
        out["mfu_bf16_b32"] = {"value": m, "architecture": arch}
    for key, target in GOALS.items():
        res = out.setdefault(key, {"value": None, "reason": "not measured (see the parts below)"})
        res["goal"] = target
        res["met"] = None if res["value"] is None else (
            res["value"] <= target if key == "pds_overhead_share_of_nfe" else res["value"] >= target)
    return out


# -- main -------------------------------------------------------------------------------------


class HardStop(BaseException):
    """Raised by the alarm at --hard-stop-s: the run ends with what it has, rather than being killed."""

    fired = False


def _hard_stop(signum, frame):
    HardStop.fired = True
    raise HardStop("hard stop: --hard-stop-s reached")


OUT: list[Path] = []
STARTED = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {msg}", file=sys.stderr, flush=True)


def save(report: dict) -> None:
    """Write the report as it stands (atomically): called between parts and at the end. NaN is
    written as NaN (a network overflowing at fp16 is a finding, not a reason to lose the report)."""
    if OUT:
        atomic_write_text(OUT[0], json.dumps(report, indent=1, default=str) + "\n")


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tiny, p = args.tiny, plan(args.tiny)
    budget = Budget(args.budget_s)
    archs = architectures(tiny)
    cache = ExportCache(None, log)  # ONNX / TensorRT files of this run only
    nets = Nets(archs, device, p["batches"], cache)
    report = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "tiny": tiny, "device": str(device),
              "command": shlex.join(["python", "scripts/gpu_bench.py", *sys.argv[1:]]), "pds_version": __version__,
              "python": platform.python_version(), "machine": describe_machine(device), "plan": p,
              "tf32_default": tf32_state(device)}
    torch.backends.cudnn.benchmark = False  # the library's default: figures a plain `pds sample` gets

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
            log(f"{label or part} failed: {error_line(e)}")
            return {"status": "failed", "reason": error_line(e)}

    try:
        report["peaks"] = part_peaks(device, tiny)
        report["noise"] = guarded("noise", lambda: part_noise(device, p, tiny, budget))
        report["latency"] = {}
        budget.begin("latency")
        for arch in archs:
            share = max(0.0, budget.left()) * (0.45 if arch == "ffhq-256" else 1.0)
            report["latency"][arch] = guarded(None, lambda arch=arch, share=share: part_latency(arch, nets, p, tiny, share),
                                              label=f"latency {arch}")
        lat256, lat1024 = (report["latency"].get(a, {}) for a in archs)
        report["pds_overhead"] = guarded("overhead", lambda: part_overhead(nets, p, lat256))
        report["e2e"] = guarded("e2e", lambda: part_e2e(nets, p, lat1024, budget))
        report["samplers"] = guarded("samplers", lambda: part_samplers(nets, p, lat256))
        report["step_graphs"] = guarded("step_graphs", lambda: part_step_graphs(nets, p, budget))
        report["compiled_steps"] = guarded("compiled_steps", lambda: part_compiled_steps(nets, p, budget, tiny))
    except HardStop:  # fired between parts (while saving, say): the report is finished with what it has
        log("stopped at --hard-stop-s")
    finally:
        cache.close()
    report["goals"] = goals(report)
    report["elapsed_s"] = time.perf_counter() - STARTED
    report["complete"] = not HardStop.fired
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="where to write the JSON report")
    ap.add_argument("--tiny", action="store_true", help="small architectures and step counts: a CPU smoke run")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where a GPU is visible")
    ap.add_argument("--budget-s", type=float, default=450.0, help="seconds for all the parts together (default 450)")
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
