"""`pds bench`: flags -> a BenchConfig -> pdscli.bench.run.run_bench -> a report -> tables, JSON, plot."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from pdscli.cli import options
from pdscli.cli.app import Command, app
from pdscli.cli.output import print_json, stderr_log
from pdscli.console import console, err_console

MODEL, MEASURE, SAMPLING, QUALITY, OUTPUT = "Model", "Measurement", "End to end and samplers", "Quality", "Output"

EPILOG = (
    "Examples:\n\n"
    "  pds bench --quick                                   (a smoke run of under a minute on a CPU)\n\n"
    "  pds bench --model gaussian --speed-up 10 --samplers pc,pds,ddim,accel-ode --nfe 20,50,100\n\n"
    "  pds bench --preset ffhq-256 --random-weights --device cuda --batch-sizes 1,8,32 --out bench.json\n\n"
    "  pds bench --checkpoint ckpt.pth --preset cifar10 --masks masks/cifar10-32.npz --reference ~/data/cifar10 --plot bench.png\n\n"
    "  pds bench --engine engines/cifar10-fp16.onnx --device cuda --skip e2e\n\n"
    "  pds bench --checkpoint ckpt.pth --preset cifar10 --samplers pds,ddim --nfe 50 --fid-ref stats/cifar10-train.npz --device cuda\n\n"
    "  pds bench --quick --json > bench.json                 (the report on stdout, the tables on stderr)\n\n"
    "Parts (--skip any): nfe = per-call latency per backend and batch; overhead = the PDS preconditioner per NFE; "
    "e2e = vanilla PC at the full step count against PDS at --speed-up k, same backend and noise; samplers = "
    "--samplers at equal --nfe budgets. Quality: the exact spectral KL on --model gaussian, a spectral statistic "
    "against --reference images on a network (docs/benchmarks.md says what it sees and what not), and FID / KID "
    "against --fid-ref (docs/evaluation.md). "
    "Backends: {bench_backends} "
    "(default: all that apply; those that cannot run here are listed with the reason)."
)


@app.command(
    "bench", cls=Command,
    help=(
        "Measure what PDS and the engines buy on this model and machine: per-call latency and throughput per "
        "backend and batch size, the PDS overhead, end-to-end vanilla vs PDS wall time with the measured speedup "
        "and the quality it costs. Every report names the machine."
    ),
    epilog=EPILOG,
)
def bench(
    ctx: typer.Context,
    model: Optional[str] = typer.Option(None, "--model", help="gaussian (exact analytic score, exact quality), mixture (exact score of a mixture of Gaussians; quality = mode proportions) or builtin. Default: builtin where installed, else gaussian.", rich_help_panel=MODEL),
    checkpoint: options.Checkpoint = None,
    config: options.Config = None,
    preset: options.Preset = None,
    random_weights: options.RandomWeights = False,
    engine: options.Engine = None,
    engine_backend: options.EngineBackend = None,
    image_size: options.ImageSize = None,
    channels: options.Channels = None,
    trust_checkpoint: options.TrustCheckpoint = False,
    device: options.Device = "auto",
    tf32: options.Tf32 = "off",
    threads: options.Threads = None,
    backends: Optional[str] = typer.Option(None, "--backends", help="Comma-separated backends to measure, or all (default: all that apply, fp16 only on a GPU; --quick: eager only).", rich_help_panel=MEASURE),
    batch_sizes: Optional[str] = typer.Option(None, "--batch-sizes", help="Comma-separated batch sizes (default 1,8,32; --quick 1,8).", rich_help_panel=MEASURE),
    warmup: Optional[str] = typer.Option(None, "--warmup", metavar="N", help="Untimed calls before timing (default 3; --quick 1).", rich_help_panel=MEASURE),
    repeats: Optional[str] = typer.Option(None, "--repeats", metavar="N", help="Timed calls per measurement (default 20; --quick 3).", rich_help_panel=MEASURE),
    skip: Optional[str] = typer.Option(None, "--skip", help="Parts to leave out: {bench_parts}.", rich_help_panel=MEASURE),
    quick: bool = typer.Option(False, "--quick", help="Smoke run: batches 1,8, 3 repeats, vanilla at <= 40 steps, PDS at half, 16 quality samples.", rich_help_panel=MEASURE),
    speed_up: Optional[str] = typer.Option(None, "--speed-up", metavar="K", help="PDS runs full-steps / k steps (default 10; --quick 2).", rich_help_panel=SAMPLING),
    steps: Optional[str] = typer.Option(None, "--steps", metavar="N", help="PDS step count instead of --speed-up.", rich_help_panel=SAMPLING),
    full_steps: Optional[str] = typer.Option(None, "--full-steps", metavar="N", help="Vanilla PC's step count (default: the model's num_scales; --quick: at most 40).", rich_help_panel=SAMPLING),
    alpha: Optional[str] = typer.Option(None, "--alpha", metavar="A|auto", help="PDS filter strength, a number or auto (default: the pds sampler's, as in pds sample; pdscli.precondition.alpha).", rich_help_panel=SAMPLING),
    masks: Optional[Path] = typer.Option(None, "--masks", help="PDS filters .npz (from `pds filters`). Default: exact (gaussian), the built-in's, from --reference, else synthetic (timing only).", rich_help_panel=SAMPLING),
    samplers: Optional[str] = typer.Option(None, "--samplers", help="Compare samplers at equal NFE budgets, e.g. pc,pds,ddim,accel-ode.", rich_help_panel=SAMPLING),
    nfe: Optional[str] = typer.Option(None, "--nfe", help="NFE budgets for --samplers (default 20,50,100; --quick 10,20).", rich_help_panel=SAMPLING),
    e2e_backend: Optional[str] = typer.Option(None, "--e2e-backend", help="Backend of the sampling runs (default eager / analytic / engine).", rich_help_panel=SAMPLING),
    e2e_batch: Optional[str] = typer.Option(None, "--e2e-batch", metavar="N", help="Batch of the sampling runs (default: the largest --batch-sizes).", rich_help_panel=SAMPLING),
    e2e_repeats: Optional[str] = typer.Option(None, "--e2e-repeats", metavar="N", help="Timed batches per sampling run, at least (default 3; --quick 1).", rich_help_panel=SAMPLING),
    seed: str = typer.Option(0, "--seed", metavar="N", help="Seed of the inputs and the sampling noise.", rich_help_panel=SAMPLING),
    quality_samples: Optional[str] = typer.Option(None, "--quality-samples", metavar="N", help="Images per quality figure (default 256; --quick 16).", rich_help_panel=QUALITY),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Folder of real images: a spectral quality statistic for a network model.", rich_help_panel=QUALITY),
    reference_limit: Optional[str] = typer.Option(None, "--reference-limit", metavar="N", help="Reference images read, at most (default 2000; --quick 200).", rich_help_panel=QUALITY),
    fid_ref: Optional[Path] = typer.Option(None, "--fid-ref", help="FID / KID of every sampling run against this reference: a folder of images at the model's size, or statistics from `pds fid --save-stats` (fast). Needs pip install \"pds\\[eval]\" (docs/evaluation.md).", rich_help_panel=QUALITY),
    fid_features: Optional[Path] = typer.Option(None, "--fid-features", help="--fid-ref's feature network file, as `pds fid --features` (default: torch-fidelity's Inception).", rich_help_panel=QUALITY),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the full report (every timing, settings, machine) as JSON to FILE.", rich_help_panel=OUTPUT),
    as_json: options.Json = False,
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a plot (.png, .pdf, .svg): time and quality against NFE, latency against batch. Needs matplotlib.", rich_help_panel=OUTPUT),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Keep exported ONNX / TensorRT files here and reuse them once their recorded hash is verified (default: a temporary folder).", rich_help_panel=OUTPUT),
    force: options.Force = False,
    quiet: options.Quiet = False,
):
    from pdscli.bench.config import KNOWN_BACKENDS, BenchConfig, check_outputs, parse_ints, parse_names
    from pdscli.bench.plot import write_plot
    from pdscli.bench.render import to_rich
    from pdscli.bench.report import write_json
    from pdscli.bench.run import run_bench
    from pdscli.devices import set_tf32
    from pdscli.sample.model import ModelSpec

    set_tf32(tf32)
    spec = ModelSpec(
        model=model, checkpoint=checkpoint, config=config, preset=preset, random_weights=random_weights, engine=engine,
        engine_backend=engine_backend, image_size=image_size, channels=channels, trust_checkpoint=trust_checkpoint,
        device=device,
    )
    cfg = BenchConfig(
        spec=spec, backends=parse_names(backends, "--backends", KNOWN_BACKENDS),
        batch_sizes=parse_ints(batch_sizes, "--batch-sizes"), warmup=warmup, repeats=repeats, threads=threads,
        full_steps=full_steps, speed_up=speed_up, steps=steps, alpha=alpha, masks=masks,
        samplers=parse_names(samplers, "--samplers"), nfe=parse_ints(nfe, "--nfe"), e2e_backend=e2e_backend,
        e2e_batch=e2e_batch, e2e_repeats=e2e_repeats, quality_samples=quality_samples, reference=reference,
        reference_limit=reference_limit, fid_ref=fid_ref, fid_features=fid_features, skip=parse_names(skip, "--skip") or [], seed=seed, quick=quick,
        cache_dir=cache_dir, command=_command_line(ctx),
    ).resolved()  # every flag checked before the outputs are touched
    check_outputs(out, plot, force)

    log = stderr_log(quiet)
    report = run_bench(cfg, log)
    # With --json the report owns stdout, so the tables go to stderr.
    shown = err_console if as_json else console
    if not shown.is_terminal:
        # Tables need room: a pipe or a file gets 140 columns instead of Rich's default 80.
        shown = Console(stderr=as_json, width=140)
    for item in to_rich(report):
        # Lines of text must not wrap (a CPU name split in two); tables fit the width.
        shown.print(item, soft_wrap=isinstance(item, Text))
    if as_json:
        print_json(report)
    if out:
        write_json(report, out)
        log(f"wrote {out}")
    if plot:
        write_plot(report, plot)
        log(f"wrote {plot}")


def _command_line(ctx: typer.Context) -> str:
    """The flags given on the command line, as a shell line: the report says how to rerun it."""
    words = ["pds", "bench"]
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name != "COMMANDLINE":
            continue
        value = ctx.params[param.name]
        if getattr(param, "is_flag", False):
            words.append(param.opts[0] if value else (param.secondary_opts or param.opts)[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)
