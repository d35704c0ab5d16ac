"""Run the `pds bench` commands behind docs/benchmarks.md and write their figures into it.

    .venv/bin/python scripts/bench_docs.py --run gaussian fixture    # run some (JSON into docs/bench/)
    .venv/bin/python scripts/bench_docs.py --run all                 # every CPU run (tens of minutes)
    .venv/bin/python scripts/bench_docs.py                           # only re-render the tables

It needs the package importable (installed, or PYTHONPATH=. from a checkout).

Each run's full report (every raw timing, settings, machine) is kept as docs/bench/<name>.json;
the Markdown between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in docs/benchmarks.md is
generated from it by `pds bench`'s own renderer (pdscli.bench.render.to_markdown: the same
tables the terminal shows), so no figure in those blocks is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pdscli.bench.render import markdown_table, ms, rate, to_markdown
from pdscli.bench.report import load_report

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
DATA = REPO / "docs" / "bench"
FIXTURE = REPO / "tests" / "fixtures" / "ncsnpp_small"
GPU_FORMAT = "pds-gpu-bench/1"  # scripts/gpu_bench.py's reports

# One thread: the documentation machine is a shared 2-core box, and one thread keeps the
# figures comparable between runs made while other jobs come and go.
COMMON = ["--threads", "1", "--quiet"]
RUNS = {
    "gaussian": ["--model", "gaussian", "--batch-sizes", "1,8,32", "--speed-up", "20",
                 "--samplers", "pc,pds,ddim,accel-ode", "--nfe", "20,50,100,200"],
    "gaussian-auto": ["--model", "gaussian", "--batch-sizes", "32", "--speed-up", "20", "--alpha", "auto",
                      "--skip", "nfe,overhead"],
    "fixture": ["--checkpoint", str(FIXTURE / "checkpoint.pth"), "--config", str(FIXTURE / "config.json"),
                "--backends", "eager,bf16,fp16,compile,onnx-cpu", "--batch-sizes", "1,8",
                "--full-steps", "100", "--speed-up", "10"],
    "cifar10": ["--preset", "cifar10", "--random-weights", "--backends", "eager,bf16,onnx-cpu", "--batch-sizes", "1,8",
                "--warmup", "1", "--repeats", "5", "--skip", "e2e"],
    # Counting only (FlopCounterMode on the meta device): nothing is timed.
    "flops-256": ["--preset", "ffhq-256", "--random-weights", "--batch-sizes", "1", "--skip", "nfe,overhead,e2e"],
    "flops-1024": ["--preset", "ffhq-1024", "--random-weights", "--batch-sizes", "1", "--skip", "nfe,overhead,e2e"],
}
# For a machine with an NVIDIA GPU (TensorRT installed for the trt-* backends). Random weights
# time the architecture; the e2e runs' images are noise, their wall times are what counts.
GPU_COMMON = ["--device", "cuda", "--quiet", "--cache-dir", "engines/bench"]
GPU_RUNS = {
    "gpu-ffhq-256": ["--preset", "ffhq-256", "--random-weights", "--batch-sizes", "1,8,32", "--skip", "e2e"],
    "gpu-ffhq-1024": ["--preset", "ffhq-1024", "--random-weights", "--batch-sizes", "1,8,32", "--skip", "e2e"],
    "gpu-e2e-ffhq-1024": ["--preset", "ffhq-1024", "--random-weights", "--backends", "eager,trt-fp16", "--batch-sizes", "1",
                          "--full-steps", "2000", "--steps", "66", "--skip", "overhead"],
    "gpu-e2e-ffhq-1024-trt": ["--preset", "ffhq-1024", "--random-weights", "--backends", "eager,trt-fp16", "--batch-sizes", "1",
                              "--full-steps", "2000", "--steps", "66", "--e2e-backend", "trt-fp16", "--skip", "overhead"],
}


def command(name: str) -> list[str]:
    args = [*RUNS[name], *COMMON] if name in RUNS else [*GPU_RUNS[name], *GPU_COMMON]
    return ["pds", "bench", *args, "--out", str(DATA / f"{name}.json"), "--force"]


def run(name: str) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    cmd = command(name)
    print("+", shlex.join(cmd), flush=True)
    cmd[:1] = [sys.executable, "-m", "pdscli"]  # the `pds` of this interpreter
    subprocess.run(cmd, check=True, cwd=REPO)


# --- Markdown from a report: pdscli.bench.render's own tables ----------------------------------


def _command(report: dict) -> str:
    """The recorded command as a reader in the repository's root would type it: the absolute
    paths of the checkout that ran it made relative. Reports recorded before `--out` existed
    name their file with `--json FILE`: the same run, spelled as the command line spells it now."""
    command = re.sub(r"\S*/fixtures/ncsnpp_small", "tests/fixtures/ncsnpp_small", report["command"])
    command = re.sub(r"\S*/docs/bench/", "docs/bench/", command)
    return re.sub(r"--json (\S+\.json)", r"--out \1", command)


def render(report: dict, name: str) -> str:
    return to_markdown(report, command=_command(report), full_report=f"docs/bench/{name}.json")


# --- Markdown from a scripts/gpu_bench.py report ---------------------------------------------------


def _f(v, fmt=".3g", suffix="") -> str:
    return "—" if v is None else f"{v:{fmt}}{suffix}"


def _pc(v) -> str:
    return "—" if v is None else f"{100 * v:.1f} %"


def _ok(part) -> bool:
    return isinstance(part, dict) and part.get("status", "ok") == "ok"


GOAL_NAMES = {"best_backend_vs_eager_fp32_256_b8": "best backend vs eager fp32 per NFE, 256², batch 8",
              "pds_overhead_share_of_nfe": "PDS overhead per NFE, share of the fastest call (256², batch 8)",
              "pds66_vs_vanilla2000_speedup": "PDS@66 vs vanilla PC@2000, end to end (1024², batch 1)",
              "mfu_bf16_b32": "MFU of bf16 eager at batch 32 (listed bf16 peak)"}


def render_gpu(report: dict, name: str) -> str:
    """The GPU block from scripts/gpu_bench.py's JSON: goals, latency and MFU, overhead, end to end,
    samplers, whole steps (CUDA graphs, torch.compile), noise. A --tiny or CPU report is refused
    (CPU smoke numbers)."""
    if report.get("tiny") or not str(report.get("device", "")).startswith("cuda"):
        raise ValueError(f"{name}: a --tiny or CPU run of scripts/gpu_bench.py; not GPU figures")
    parts = [_gpu_provenance(report, name), _gpu_peaks(report["peaks"]) if "peaks" in report else "", _gpu_goals(report)]
    for arch, lat in report.get("latency", {}).items():
        parts.append(_gpu_latency(arch, lat) if _ok(lat) else _not_run(f"Per network call, {arch} architecture", lat))
    for key, label, fn in (("pds_overhead", "PDS overhead", _gpu_overhead), ("e2e", "End to end", _gpu_e2e),
                           ("samplers", "Samplers", _gpu_samplers),
                           ("step_graphs", "Whole steps from CUDA graphs", _gpu_whole_steps),
                           ("compiled_steps", "Whole steps through torch.compile", _gpu_whole_steps),
                           ("noise", "Noise", _gpu_noise)):
        part = report.get(key)
        if part is not None:
            parts.append(fn(report, key) if _ok(part) else _not_run(label, part))
    return "\n\n".join(p for p in parts if p)


def _not_run(label: str, part: dict) -> str:
    return f"{label}: {part.get('status', 'not measured')} ({part.get('reason') or 'no reason recorded'})."


def _gpu_provenance(report: dict, name: str) -> str:
    m, gpu = report["machine"], report["machine"]["gpu"]
    return (f"Command: `{report['command']}`  \nMeasured {report['created']} on {gpu['name']} ({gpu['memory_gib']} GiB, "
            f"driver {gpu['driver']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}), host {m['cpu']}; torch "
            f"{m['libraries']['torch']}, onnxruntime {m['libraries'].get('onnxruntime')}, pds {report['pds_version']}; "
            + (f"the run took {report['elapsed_s']:.0f} s. " if report.get("complete") else
               "**the run was cut short: parts missing below were not measured.** ")
            + f"Full report: `docs/bench/{name}.json`.")


def _gpu_peaks(peaks: dict) -> str:
    return "Matmul peaks (one {n}³ GEMM, measured / data sheet dense): ".format(n=peaks["matmul_n"]) + ", ".join(
        f"{k} {_f((v or 0) / 1e12, '.0f')} / {_f(((peaks['listed'].get(k) or {}).get('flops_per_s') or 0) / 1e12, '.0f')} TFLOP/s"
        for k, v in peaks["flops_per_s"].items()) + "."


def _gpu_goals(report: dict) -> str:
    rows = []
    for key, g in report.get("goals", {}).items():
        verdict = "not measured" if g.get("met") is None else ("met" if g["met"] else "not met")
        how = g.get("backend") or g.get("architecture") or g.get("reason") or ""
        rows.append([GOAL_NAMES.get(key, key), _f(g["goal"]), _f(g.get("value")), verdict, how])
    return "Goals, as measured:\n\n" + markdown_table(["goal", "target", "measured", "", "backend / note"], rows)


def _gpu_latency(arch: str, lat: dict) -> str:
    base = {r["batch"]: r["median_s"] for e in lat["backends"] if e["name"] == "fp32" and e["status"] == "ok"
            for r in e["batches"]}
    rows = []
    for e in lat["backends"]:
        if e["status"] != "ok":
            rows.append([e["name"], e.get("precision") or "?", "—", "—", "—", "—", "—", "—", f"failed: {e.get('reason')}"])
            continue
        for r in e["batches"]:
            rows.append([e["name"], e.get("compute_precision") or e["precision"], str(r["batch"]), ms(r["median_s"]),
                         rate(r["images_per_s"]), _f(base[r["batch"]] / r["median_s"] if r["batch"] in base else None, ".2f", "×"),
                         _pc(r.get("mfu")), _pc(r.get("mfu_of_measured_peak")), _f(r.get("max_rel_err_vs_eager_fp32"), ".1e")])
    skipped = "".join(f" Not measured: `{s['name']}` ({s['reason']})." for s in lat["skipped"])
    return (f"Per network call, {arch} architecture (random weights, {lat['params']:,} parameters, "
            f"{_f((lat['flops_per_call'].get('1') or 0) / 1e9, '.4g')} GFLOP per image):{skipped}\n\n"
            + markdown_table(["backend", "computes in", "batch", "median ms", "images/s", "vs fp32", "MFU (data sheet)",
                              "MFU (measured peak)", "rel. error vs fp32"], rows))


def _gpu_overhead(report: dict, key: str) -> str:
    rows = [[str(r["batch"]), ms(r["noise"]["median_s"]), ms(r["grad"]["median_s"]), ms(r["per_nfe_s"]),
             ms(r["noise_draw"]["median_s"]), f"{_pc(r['fraction_of_fastest_nfe'])} ({r['fastest_backend']})"]
            for r in report[key]["batches"]]
    return ("PDS overhead per NFE on the 256 architecture (one M z and one M Mᵀ g; synthetic filters):\n\n"
            + markdown_table(["batch", "M z ms", "M Mᵀ g ms", "per NFE ms", "one noise draw ms", "share of the fastest NFE"], rows))


def _gpu_e2e(report: dict, key: str) -> str:
    e2e = report[key]
    rows = [[r["label"], str(r["steps"]), str(r["nfe"]), _f(r["wall_s"], ".4g")] for r in e2e["runs"]]
    return (f"End to end, ffhq-1024 architecture, batch 1, backend `{e2e['backend']}`: speedup "
            f"**{_f(e2e['speedup'], '.1f', '×')}** for an NFE ratio of {e2e['nfe_ratio']:.1f}×.\n\n"
            + markdown_table(["run", "steps", "NFE", "wall s"], rows))


def _gpu_samplers(report: dict, key: str) -> str:
    sm = report[key]
    rows = [[r["sampler"], str(r["steps"]), str(r["nfe"]), ms(r["per_step_s"]), ms(r["overhead_per_step_s"]),
             _pc(r["overhead_share"])] if r["status"] == "ok" else [r["sampler"], "—", "—", "—", "—", r["status"]]
            for r in sm["rows"]]
    return (f"Samplers at {report['plan']['sampler_nfe']} NFE, 256 architecture, batch {sm['batch']}, backend "
            f"`{sm['backend']}` (one call {ms(sm['nfe_per_call_s'])} ms):\n\n"
            + markdown_table(["sampler", "steps", "NFE", "ms per step", "ms per step beyond the calls", "share of the time"], rows))


def _gpu_whole_steps(report: dict, key: str) -> str:
    part, compiled = report[key], key == "compiled_steps"
    rows = []
    for r in part["rows"]:
        if r["status"] != "ok":
            rows.append([r["sampler"], "—", "—", "—", "—", "—", r["status"] + (f": {r['reason']}" if r.get("reason") else "")])
            continue
        rows.append([r["sampler"], r["path"], "yes" if r["bit_equal"] else _f(r["max_rel_diff_vs_eager"], ".1e"),
                     ms(r["eager_per_step_s"]), ms(r["graph_per_step_s"]),
                     _f(r.get("compile_s"), ".3g") if compiled else "—", _whole_step_note(r)])
    what = (f"through {part.get('compile', 'torch.compile')}" if compiled else "from CUDA graphs")
    return (f"Whole steps {what} against the eager step ({part['architecture']}, batch {report['plan']['graph_batch']}, "
            f"{report['plan']['graph_steps']} steps):\n\n"
            + markdown_table(["sampler", "path", "bit-identical (else max rel. diff)", "eager ms/step", "wrapped ms/step",
                              "first batch s (compile)", "note"], rows))


def _whole_step_note(row: dict) -> str:
    """Why a sampler ran eagerly, or what Dynamo made of it (graphs, breaks, graphs without replay)."""
    if row["path"] == "eager":
        return (row.get("reason") or "")[:100]
    g = row.get("graphs")
    return (f"{g['graphs']} graphs, {g['graph_breaks']} breaks, {g.get('cudagraph_skips', 0)} without CUDA-graph replay"
            if g else "")


def _gpu_noise(report: dict, key: str) -> str:
    nz = report[key]
    t = nz["draw_time"]
    g = [f"{k.replace('_', ' ')}: max |diff| {v['max_abs_diff']:.2g}, {100 * v['bit_equal_share']:.4g} % bit-equal"
         for k, v in nz.items() if k.startswith("gpu_") and isinstance(v, dict)]
    return (f"Noise (version {nz['noise_version']}), {nz['batch']} × {'×'.join(map(str, nz['shape']))}: "
            + "; ".join(g) + f"; batch-independent on the GPU: {nz.get('gpu_batch_independent')}. One draw: "
            + ", ".join(f"{k.replace('_', ' ')} {ms(v['median_s'])} ms" for k, v in t.items() if isinstance(v, dict)) + ".")


def update_doc() -> None:
    text = DOC.read_text()
    for path in sorted(DATA.glob("*.json")):
        name = path.stem
        block = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(\n<!-- /bench:{re.escape(name)} -->)", re.S)
        if not block.search(text):
            print(f"note: docs/benchmarks.md has no block for {name}", file=sys.stderr)
            continue
        report = json.loads(path.read_text())
        body = render_gpu(report, name) if report.get("format") == GPU_FORMAT else render(load_report(path), name)
        text = block.sub(lambda m: m.group(1) + body + m.group(2), text)
    DOC.write_text(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="*", default=[],
                   help=f"runs to (re)make: {', '.join(RUNS)} or all (CPU); {', '.join(GPU_RUNS)} or gpu (a GPU machine)")
    p.add_argument("--print", action="store_true", help="print the commands instead of running them")
    args = p.parse_args(argv)
    names = {"all": list(RUNS), "gpu": list(GPU_RUNS)}.get(" ".join(args.run), args.run)
    for name in names:
        if name not in RUNS and name not in GPU_RUNS:
            p.error(f"unknown run {name!r}")
        if args.print:
            print(shlex.join(command(name)).replace(str(REPO) + "/", ""))
        else:
            run(name)
    if not args.print:
        update_doc()


if __name__ == "__main__":
    main()
