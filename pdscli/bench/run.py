"""`run_bench`: every requested part of a bench, in order, into one report (pdscli.bench.report).

A report has up to four parts, all timed in the same process on the same inputs:

    nfe       per network call (NFE): latency and throughput per backend and batch size
              (warm-up, repeated timed calls, median and IQR / min-max; CUDA events on a GPU,
              perf_counter on the CPU), FLOPs per call (torch FlopCounterMode) and FLOP/s
    overhead  the PDS preconditioner per score evaluation (one M z and one M M^T g) as a
              fraction of one NFE
    e2e       vanilla PC at the full step count against PDS at 1/k of it: wall time, images/s,
              the speedup ratio, and the quality of both (the exact spectral KL on the analytic
              model, or the reference statistic with --reference; FID / KID with --fid-ref)
    samplers  every --samplers entry at equal NFE budgets (--nfe), time and quality side by side

Honesty rules the code keeps: every figure is a measurement of this run (nothing is estimated
or copied), a backend that cannot run here is listed with the reason, a speedup is never shown
without the quality it costs when a quality figure exists, and the machine (CPU, load, GPU,
driver, versions) is part of every report. See docs/benchmarks.md for what the figures mean.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from pdscli.bench.backends import e2e_backend_name, make_backend, unavailable_reason
from pdscli.bench.config import BenchConfig, error_line
from pdscli.bench.export_cache import ExportCache
from pdscli.bench.fid import FidQuality
from pdscli.bench.latency import add_speed_ratios, run_backends
from pdscli.bench.mfu import add_mfu
from pdscli.bench.model import BenchModel, count_flops, nfe_inputs, open_bench_model
from pdscli.bench.overhead import measure_overhead
from pdscli.bench.preconditioner import PreconditionerCache, bench_filters
from pdscli.bench.quality import make_quality, reference_images
from pdscli.bench.report import build_report, skipped
from pdscli.bench.runs import full_and_pds_steps, run_end_to_end, run_samplers
from pdscli.bench.timing import torch_threads
from pdscli.devices import resolve_device, tf32_state
from pdscli.machine import describe_machine, load_average


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every requested part; returns the report (JSON-ready: plain dicts, lists, numbers)."""
    cfg = cfg.resolved()
    device = resolve_device(cfg.spec.device)
    cache = ExportCache(cfg.cache_dir, log)
    try:
        with torch_threads(cfg.threads):
            return _run(cfg, device, cache, log)
    finally:
        cache.close()


def _run(cfg: BenchConfig, device: torch.device, cache: ExportCache, log) -> dict:
    started = time.perf_counter()
    machine = describe_machine(device)
    log("loading the model ...")
    model = open_bench_model(cfg, device)
    reference, reference_source = reference_images(cfg, model)
    quality = make_quality(model, reference, cfg.seed)
    fid = FidQuality(cfg.fid_ref, cfg.fid_features, model.shape, device, log) if cfg.fid_ref is not None else None
    flops = count_flops(model, cfg.batch_sizes)

    entries, kept = run_backends(cfg, model, flops, cache, log) if "nfe" not in cfg.skip else ([], {})
    add_speed_ratios(entries)
    # MFU against the device's listed peak for the precision each backend computes in (a GPU in the table).
    add_mfu(entries, (machine.get("gpu") or {}).get("name"), tf32=tf32_state()["conv"])
    e2e_name = e2e_backend_name(cfg, model, [e["name"] for e in entries if e["status"] == "ok"])
    filters, filters_info = bench_filters(cfg, model, reference)
    preconds = PreconditionerCache(filters, cfg.alpha, model.settings, device)

    overhead = skipped("--skip overhead") if "overhead" in cfg.skip else measure_overhead(
        cfg, model, preconds.for_steps(full_and_pds_steps(cfg, model.settings)[1]), entries, e2e_name)
    sampling = "e2e" not in cfg.skip or (cfg.samplers and "samplers" not in cfg.skip)
    score, why = _e2e_score(cfg, model, e2e_name, kept, cache) if sampling else (None, "")
    parts = {}
    for key, part, fn in (("end_to_end", "e2e", run_end_to_end), ("samplers", "samplers", run_samplers)):
        if part == "samplers" and not cfg.samplers:
            parts[key] = skipped("no --samplers given")
        elif part in cfg.skip:
            parts[key] = skipped(f"--skip {part}")
        elif score is None:
            parts[key] = skipped(why)
        else:
            parts[key] = {"backend": e2e_name, **fn(cfg, model, score, preconds, quality, log, fid=fid)}
    machine["load_average_end"] = load_average()
    return build_report(cfg, model, machine=machine, flops=flops, quality=quality, reference_source=reference_source,
                        fid=fid.info if fid is not None else None,
                        backends=entries, filters=filters_info, overhead=overhead, warnings=cache.warnings,
                        elapsed_s=time.perf_counter() - started, **parts)


def _e2e_score(cfg: BenchConfig, model: BenchModel, name: str | None, kept: dict, cache: ExportCache
               ) -> tuple[Callable | None, str]:
    """The score callable the sampling runs use: the measured backend object when it was kept
    (already warm), else a fresh one. (None, why) when there is none."""
    if name is None:
        return None, "no backend ran"
    if name in kept:
        return kept[name].score_for(cfg.e2e_batch), ""
    reason = unavailable_reason(name, model)
    if reason is not None:
        return None, f"--e2e-backend {name}: {reason}"
    try:
        backend = make_backend(name, model, cache, cfg.threads, cfg.batch_sizes)
        score = backend.score_for(cfg.e2e_batch)
        x, sigma = nfe_inputs(model.settings, cfg.e2e_batch, model.device, cfg.seed)
        with torch.no_grad():
            score(x, sigma)  # warm: compilation or capture must not land in the first timed run
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return None, f"backend {name} failed: {error_line(e)}"
    return score, ""
