"""The bench report: one JSON-ready dict, built here and nowhere else, that the Rich tables,
the Markdown of docs/benchmarks.md, the plot and `--json` / `--out` all render.

Schema (format `pds-bench/1`; times in seconds, None where a figure does not exist, never NaN):

    format, pds_version, created, command   str (command: the flags given, as a shell line)
    machine      pdscli.machine.describe_machine(), plus load_average_end
    settings     every BenchConfig field, defaults resolved, plus device, torch_threads,
                 per_sample_step, snr and (on a GPU) the TF32 / cudnn flags
    model        name, kind (analytic | network | engine), shape [C, H, W], sampling_settings,
                 and what is known of its source (checkpoint, sha256, preset, num_params, ...)
    flops        per_call {batch (str): FLOPs} | None, per_image, method, counts | note
    quality      metric | None, description, reference (where the images came from) | None
    fid          --fid-ref only, else None: {path, kind (folder | samples.npz | statistics), count,
                 size, features, feature_dim, note (FID's small-sample bias)}
    backends     [{name, status: ok | skipped | failed, reason?, description, precision,
                   compute_precision, peak (pdscli.bench.mfu.device_peak) | None,
                   setup_s, provider?, ..., batches: [{batch, <timing summary>, times_s, clock,
                   warmup, first_call_s, per_image_s, images_per_s, nfe_per_s, finite,
                   max_rel_err_vs_eager_fp32?, flops_per_call?, achieved_flops_per_s?,
                   mfu (a fraction of the listed peak) | None, speedup_vs_<base>?}]}]
    filters      {source, kinds, images_meaningful}
    pds_overhead {status, reason? | preconditioner, what, batches: [{batch, noise, grad (timing
                  summaries), per_nfe_s, per_pc_step_s, fraction_of_nfe {backend: x},
                  fraction_of_e2e_backend_nfe, fraction_of_fastest_nfe, fastest_backend}]}
    end_to_end   {status, reason? | backend, batch, samples, speedup, nfe_ratio, full_steps,
                  pds_steps, runs: [<run>, <run>] (vanilla, pds)}
    samplers     {status, reason? | backend, batch, samples, rows: [{sampler, nfe_budget, status,
                  reason? | <run>}]}
    warnings     [str]
    elapsed_s    float

A <timing summary> is pdscli.bench.timing.summarize's dict (median_s, q1_s, q3_s, iqr_s, min_s,
max_s, mean_s, count). A <run> is {label, sampler, steps, schedule, nfe, alpha, batch, timing
(a summary plus times_s), per_image_s, images_per_s, finite, quality {metric, value,
high_band_variance_ratio, samples, floor} | None, fid {fid, kid {mean, std, subsets, subset_size},
samples_count, reference_count, features} | {fid: None, reason} | None (no --fid-ref), network_s?,
network_share?}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from pdscli import __version__
from pdscli.bench.config import BenchConfig
from pdscli.bench.latency import nfe_median
from pdscli.bench.model import BenchModel
from pdscli.devices import tf32_state
from pdscli.engines.parity import TOLERANCES
from pdscli.errors import PdsError
from pdscli.fsutil import atomic_write_text

FORMAT = "pds-bench/1"
# An end-to-end run may not be faster than its network calls by more than timing noise.
CONSISTENCY_SLACK = 1.25


def skipped(reason: str) -> dict:
    """A part that did not run."""
    return {"status": "skipped", "reason": reason}


def build_report(cfg: BenchConfig, model: BenchModel, *, machine: dict, flops: dict, quality,
                 reference_source: str | None, fid: dict | None, backends: list[dict], filters: dict, overhead: dict,
                 end_to_end: dict, samplers: dict, warnings: list[str], elapsed_s: float) -> dict:
    """The report, from the measured parts (the schema above)."""
    report = {
        "format": FORMAT,
        "pds_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": cfg.command,
        "machine": machine,
        "settings": {**cfg.to_dict(), "device": str(model.device), "torch_threads": torch.get_num_threads(),
                     "per_sample_step": False, "snr": model.settings.snr, **_precision_flags(model.device)},
        "model": {"name": model.name, "kind": model.kind, "shape": list(model.shape),
                  "sampling_settings": model.settings.to_dict(), **model.info},
        "flops": {k: ({str(b): v for b, v in val.items()} if isinstance(val, dict) else val) for k, val in flops.items()},
        "quality": ({"metric": quality.metric, "description": quality.description} if quality is not None else
                    {"metric": None, "description": "no quality figure: a network model needs --reference DIR"}),
        "fid": fid,
        "backends": backends,
        "filters": filters,
        "pds_overhead": overhead,
        "end_to_end": end_to_end,
        "samplers": samplers,
    }
    report["quality"]["reference"] = reference_source
    report["warnings"] = [*warnings, *consistency_warnings(report)]
    report["elapsed_s"] = elapsed_s
    return report


def _precision_flags(device: torch.device) -> dict:
    """TF32 silently changes what "fp32" means on Ampere and later: record it."""
    if device.type != "cuda":
        return {}
    tf32 = tf32_state(device)
    return {"cudnn_allow_tf32": tf32["conv"], "matmul_allow_tf32": tf32["matmul"], "tf32_policy": tf32["policy"],
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def consistency_warnings(report: dict) -> list[str]:
    """What a reader must know before trusting the figures: a loaded machine, a backend that
    computes something else, a run faster than its own network calls (timing noise)."""
    warnings = []
    load, cores = report["machine"].get("load_average"), report["machine"].get("usable_cores") or 1
    timed = any(e["status"] == "ok" for e in report.get("backends", [])) or any(
        report.get(k, {}).get("status") == "ok" for k in ("pds_overhead", "end_to_end", "samplers"))
    if timed and load and load[0] > 0.75 * cores:
        warnings.append(f"the machine was busy (load average {load[0]:g} on {cores} cores): CPU timings are slower "
                        "and noisier than on an idle machine")
    for e in report.get("backends", []):
        for r in e.get("batches", []):
            err = r.get("max_rel_err_vs_eager_fp32")
            tol = TOLERANCES.get(e.get("precision") or "fp32", 1e-4) * 10
            if err is not None and err > tol:
                warnings.append(f"{e['name']} at batch {r['batch']} differs from eager fp32 by {err:.2g} (relative)")
            if not r.get("finite", True):
                warnings.append(f"{e['name']} at batch {r['batch']} returned NaN/Inf")
    warnings += _e2e_warnings(report)
    return warnings


def _e2e_warnings(report: dict) -> list[str]:
    """Also adds each end-to-end run's network_s and network_share (its NFE at the measured
    per-call time, and that as a share of the run's own time)."""
    e2e, out = report.get("end_to_end", {}), []
    if e2e.get("status") != "ok":
        return out
    per_nfe = nfe_median(report.get("backends", []), e2e["backend"], e2e["batch"])
    for run in e2e["runs"]:
        if per_nfe:
            run["network_s"] = run["nfe"] * per_nfe
            run["network_share"] = run["network_s"] / run["timing"]["median_s"]
            if run["network_share"] > CONSISTENCY_SLACK:
                out.append(f"end-to-end {run['label']} took {run['timing']['median_s']:.3g} s, less than its "
                           f"{run['nfe']} network calls at {per_nfe:.3g} s each: timing noise, treat both with care")
        if not run["finite"]:
            out.append(f"end-to-end {run['label']} produced NaN/Inf samples")
    if report["filters"].get("images_meaningful") is False:
        out.append("PDS ran with synthetic filters (no --masks or --reference): its timing is right, its images are not")
    return out


def to_json(report: dict) -> str:
    """Strict JSON: NaN / Inf never appear (they are None in the report)."""
    return json.dumps(report, indent=2, default=str, allow_nan=False) + "\n"


def write_json(report: dict, path: Path) -> None:
    """--out FILE, atomically: a full disk leaves no half-written report, and says so in one line."""
    try:
        atomic_write_text(path, to_json(report))
    except PdsError:
        raise  # a full disk: fsutil's DiskFull names the file already
    except OSError as e:  # a folder made read-only, a path gone meanwhile
        raise PdsError(f"cannot write the report {path}: {e.strerror or e}") from None


def load_report(path: Path) -> dict:
    """A report written by `--out`, checked to be one (scripts/bench_docs.py renders these)."""
    report = json.loads(Path(path).read_text())
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise PdsError(f"{path} is not a {FORMAT} report")
    return report
