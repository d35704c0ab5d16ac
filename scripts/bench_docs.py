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
import re
import shlex
import subprocess
import sys
from pathlib import Path

from pdscli.bench.render import to_markdown
from pdscli.bench.report import load_report

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"
DATA = REPO / "docs" / "bench"
FIXTURE = REPO / "tests" / "fixtures" / "ncsnpp_small"

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


def update_doc() -> None:
    text = DOC.read_text()
    for path in sorted(DATA.glob("*.json")):
        name = path.stem
        block = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(\n<!-- /bench:{re.escape(name)} -->)", re.S)
        if not block.search(text):
            print(f"note: docs/benchmarks.md has no block for {name}", file=sys.stderr)
            continue
        body = render(load_report(path), name)
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
