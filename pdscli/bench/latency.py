"""Part `nfe`: the latency of one network call per backend and batch size, its throughput and
FLOP/s, and each backend's deviation from eager fp32 on the same inputs."""

from __future__ import annotations

import gc
import time

import torch

from pdscli.bench.backends import Backend, backend_plan, e2e_backend_name, make_backend
from pdscli.bench.config import ANALYTIC, ENGINE, BenchConfig, error_line
from pdscli.bench.export_cache import ExportCache
from pdscli.bench.model import NETWORK, BenchModel, nfe_inputs
from pdscli.bench.timing import time_calls
from pdscli.engines.parity import exact_fp32


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| over the batch: how far a backend is from eager fp32."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    return err / scale if scale > 0 else err


def measure_backend(backend: Backend, model: BenchModel, cfg: BenchConfig, flops: dict, refs: dict) -> list[dict]:
    rows = []
    for b in cfg.batch_sizes:
        x, sigma = nfe_inputs(model.settings, b, model.device, cfg.seed)
        score = backend.score_for(b)
        with torch.no_grad():
            stats = time_calls(lambda: score(x, sigma), warmup=cfg.warmup, repeats=cfg.repeats, device=model.device)
            out = score(x, sigma)
        row = {"batch": b, **stats, "per_image_s": stats["median_s"] / b, "images_per_s": b / stats["median_s"],
               "nfe_per_s": 1.0 / stats["median_s"], "finite": bool(torch.isfinite(out).all())}
        if model.kind == NETWORK and b in refs:
            row["max_rel_err_vs_eager_fp32"] = relative_error(out, refs[b])
        per_call = (flops.get("per_call") or {}).get(b)
        if per_call:
            row["flops_per_call"] = per_call
            row["achieved_flops_per_s"] = per_call / stats["median_s"]
        rows.append(row)
    return rows


def reference_outputs(model: BenchModel, cfg: BenchConfig) -> dict:
    """Eager fp32 outputs on each batch's inputs: what every backend is compared with. TF32 is
    off here (on a GPU it is on by default for convolutions): the reference is true fp32, so
    eager's own TF32 error shows in its row instead of hiding in everyone else's."""
    if model.kind != NETWORK:
        return {}
    refs = {}
    with torch.no_grad(), exact_fp32():
        for b in cfg.batch_sizes:
            x, sigma = nfe_inputs(model.settings, b, model.device, cfg.seed)
            refs[b] = model.score(x, sigma).cpu()
    return refs


def run_backends(cfg: BenchConfig, model: BenchModel, flops: dict, cache: ExportCache, log) -> tuple[list[dict], dict]:
    """Measure every planned backend; returns (report entries, {name: Backend} kept for the e2e run)."""
    entries, kept = [], {}
    refs = reference_outputs(model, cfg)
    plan = backend_plan(cfg, model)
    keep = e2e_backend_name(cfg, model, [n for n, r in plan if r is None])
    for name, reason in plan:
        if reason is not None:
            entries.append({"name": name, "status": "skipped", "reason": reason})
            continue
        log(f"measuring {name} at batch {', '.join(map(str, cfg.batch_sizes))} ...")
        entry, backend = _measure_one(name, cfg, model, flops, cache, refs)
        entries.append(entry)
        if backend is not None and name == keep:
            kept[name] = backend
        release(model.device)
    return entries, kept


def _measure_one(name, cfg, model, flops, cache, refs) -> tuple[dict, Backend | None]:
    t0 = time.perf_counter()
    try:
        backend = make_backend(name, model, cache, cfg.threads, cfg.batch_sizes)
        setup = time.perf_counter() - t0
        rows = measure_backend(backend, model, cfg, flops, refs)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one backend failing (a missing library, a compiler error) must not end the bench
        return {"name": name, "status": "failed", "reason": error_line(e)}, None
    return {"name": name, "status": "ok", **backend.info, "setup_s": setup, "batches": rows}, backend


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_speed_ratios(entries: list[dict]) -> None:
    """Each row's speed against eager fp32 (or the analytic / engine baseline) at the same batch."""
    ok = [e for e in entries if e["status"] == "ok"]
    base = next((e for e in ok if e["name"] in ("eager", ANALYTIC, ENGINE)), None)
    if base is None:
        return
    base_rows = {r["batch"]: r["median_s"] for r in base["batches"]}
    for e in ok:
        for r in e["batches"]:
            if r["batch"] in base_rows:
                r[f"speedup_vs_{base['name']}"] = base_rows[r["batch"]] / r["median_s"]


def nfe_median(entries: list[dict], backend: str, batch: int) -> float | None:
    for e in entries:
        if e["name"] == backend and e["status"] == "ok":
            for r in e["batches"]:
                if r["batch"] == batch:
                    return r["median_s"]
    return None


def fastest_nfe(entries: list[dict], batch: int) -> tuple[str, float] | None:
    best = [(e["name"], r["median_s"]) for e in entries if e["status"] == "ok" for r in e["batches"]
            if r["batch"] == batch]
    return min(best, key=lambda t: t[1]) if best else None
