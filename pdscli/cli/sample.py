"""`pds sample`: flags -> pdscli.sample.setup.build_job -> pdscli.sample.run. The logic lives in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pdscli.cli import options
from pdscli.cli.app import Command, app, report_interruption
from pdscli.cli.output import print_json, print_line

SAMPLER, RUN = "Sampler", "Run"

EPILOG = (
    "Examples:\n\n"
    "  pds sample --num-samples 16 --out digits/        (the built-in model)\n\n"
    "  pds sample --model gaussian --steps 20 --num-samples 4 --out out/\n\n"
    "  pds sample --nfe 20 --out out/        (the recommended sampler for 20 network calls)\n\n"
    "  pds sample --model mixture --nfe 10 --sampler dpm++2m --out out/\n\n"
    "  pds sample --checkpoint checkpoint.pth --preset cifar10 --masks masks/cifar10-32.npz --speed-up 10\n\n"
    "  pds sample --engine engines/cifar10.onnx --steps 100 --num-samples 50000 --batch-size 500 --out fid/\n\n"
    "  pds sample --out out/ --resume      (finish an interrupted run)\n\n"
    "  torchrun --nproc-per-node 4 -m pdscli sample --checkpoint ... --out fid/      (one process per GPU)\n\n"
    "Writes NNNNNN.png per sample (as soon as its batch is done), grid.png, samples.npz "
    "(float32 [N,C,H,W] in [0,1]) and run.json. Sample i's noise is a function of (--seed, i)."
)

Model = Annotated[Optional[str], typer.Option(
    "--model", help="`builtin` (the default: a small digits model, run with PDS, its own filters and 30 steps "
    "unless told otherwise), `gaussian` (exact analytic score) or `mixture` (exact score of a mixture of "
    "Gaussians).", rich_help_panel=options.MODEL)]
Precision = Annotated[Optional[str], typer.Option(
    "--precision", help="{precisions}: the network only (sampler state stays fp32). Default fp32, or the engine's own.",
    rich_help_panel=options.MODEL)]


def _opt(*names: str, help: str, panel: str = SAMPLER, **kw):
    return typer.Option(*names, help=help, rich_help_panel=panel, **kw)


@app.command(
    "sample", cls=Command,
    help=(
        "Sample images from a score model with the PDS (preconditioned) or vanilla predictor-corrector "
        "sampler, or an accelerated one. Model: --checkpoint with --config/--preset, --engine, or --model "
        "gaussian; none = the built-in digits model."
    ),
    epilog=EPILOG,
)
def sample(
    checkpoint: options.Checkpoint = None,
    config: options.Config = None,
    preset: options.Preset = None,
    engine: options.Engine = None,
    engine_backend: options.EngineBackend = None,
    model: Model = None,
    image_size: options.ImageSize = None,
    channels: options.Channels = None,
    trust_checkpoint: options.TrustCheckpoint = False,
    precision: Precision = None,
    device: options.Device = "auto",
    threads: options.Threads = None,
    tf32: options.Tf32 = "off",
    masks: Annotated[Optional[Path], _opt("--masks", help="Filters .npz made by `pds filters`.")] = None,
    freq_mask: Annotated[Optional[Path], _opt("--freq-mask", help="Reference freq_mask.npy [C,H,W].")] = None,
    space_mask: Annotated[Optional[Path], _opt("--space-mask", help="Reference space_mask.npy [C,H,W].")] = None,
    alpha: Annotated[Optional[str], _opt("--alpha", metavar="A|auto", help=(
        "Filter strength: filter = alpha / (m + alpha - 1); larger = weaker. A number, or `auto`: calibrated per "
        "sampler and step count so that filters are never worse than none on the exact model, and off (with a "
        "warning) where nothing helps. auto keeps filters on where measured to help: {alpha_ranges}; "
        "docs/samplers.md. Default: 5 (the reference's) for pds, "
        "predictor and corrector; auto for ddpm and accel-sde, whose filters hurt at many steps. ddim, accel-ode "
        "and accel-ode2 take no filters."))] = None,
    sampler: Annotated[Optional[str], _opt("--sampler", help=(
        "One of {samplers} (docs/samplers.md). Default: pds with filters, else pc; with --nfe, the recommended one for the budget."))] = None,
    steps: Annotated[Optional[str], _opt("--steps", metavar="N", help="Number of steps (default: the model's num_scales).")] = None,
    nfe: Annotated[Optional[str], _opt("--nfe", metavar="N", help=(
        "Budget of network calls per image: the sampler takes the most steps that fit. Without --sampler, the "
        "recommended sampler and grid for the budget (docs/samplers.md); run.json says which and why."))] = None,
    schedule: Annotated[Optional[str], _opt("--schedule", help=(
        "Step grid, one of {schedules}. Default: pc (the reference's) for pc, pds, predictor and corrector; "
        "each other sampler's own measured-best grid (docs/samplers.md). stats fits the grid to the filters' "
        "statistics for this sampler and step count (cached; the filters then only make the grid)."))] = None,
    speed_up: Annotated[Optional[str], _opt("--speed-up", metavar="K", help=(
        "Run int(num_scales / k) steps for any k > 0, e.g. 2.5 (the reference's speed-up, eps times k too)."))] = None,
    teleport: Annotated[Optional[str], _opt("--teleport", help=(
        "Start below sigma_max at no network call: the Gaussian with the data's mean and spectrum carries the prior "
        "sample to sigma_t in closed form (the exact flow map for ODE samplers, the exact transition for stochastic "
        "ones). auto (the default): sigma_t from a measured table per sampler and budget when statistics are at hand "
        "(filters from `pds filters`, the built-in model's, an exact model's own), else off. off, or a noise level. "
        "Not for the PC family or preconditioned samplers; run.json records sigma_t and why."))] = None,
    snr: Annotated[Optional[str], _opt("--snr", metavar="X", help="Corrector signal-to-noise ratio (default: the model's).")] = None,
    sigma_min: Annotated[Optional[str], _opt("--sigma-min", metavar="X", help="Override the model's sigma_min.")] = None,
    sigma_max: Annotated[Optional[str], _opt("--sigma-max", metavar="X", help="Override the model's sigma_max.")] = None,
    num_scales: Annotated[Optional[str], _opt("--num-scales", metavar="N", help="Override the model's num_scales.")] = None,
    per_sample_step: Annotated[bool, _opt("--per-sample-step", help=(
        "Corrector step size per sample. Default: the reference's batch-mean step size (for fidelity), which couples "
        "the samples of a batch, so images then depend on --batch-size; with this flag a seed gives the same images "
        "at any batch size."))] = False,
    whole_step: Annotated[str, _opt("--whole-step", metavar="PATH", help=(
        "How each whole step (score call and sampler update) runs on a GPU: off (eager, the default); cuda-graph "
        "(captured in CUDA graphs after one eager batch and replayed for every batch of the same size); compile "
        "(torch.compile mode reduce-overhead: compiled on the first batch, Inductor replays CUDA graphs). Eager where "
        "the path cannot run; run.json's step_graph says which path ran and why."), panel=RUN)] = "off",
    step_graphs: Annotated[bool, _opt("--step-graphs", help="The same as --whole-step cuda-graph.", panel=RUN)] = False,
    num_samples: Annotated[str, _opt("--num-samples", "-n", metavar="N", help="How many images.", panel=RUN)] = 16,
    batch_size: Annotated[str, _opt("--batch-size", "-b", metavar="N", help="Images per batch.", panel=RUN)] = 16,
    seed: Annotated[str, _opt("--seed", metavar="N", help="Run seed (0 or more); sample i's noise is a function of (seed, i), whatever the batch.",
                              panel=RUN)] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.", rich_help_panel=options.OUTPUT)] = Path("samples"),
    force: Annotated[bool, typer.Option("--force", help=(
        "Start over in a non-empty output folder (removes an earlier run's images)."), rich_help_panel=options.OUTPUT)] = False,
    resume: Annotated[bool, typer.Option("--resume", help=(
        "Continue a run: keep the images on disk, make the rest."), rich_help_panel=options.OUTPUT)] = False,
    quiet: options.Quiet = False,
    as_json: options.Json = False,
):
    from pdscli.cli.progress import Progress, SampleBars
    from pdscli.devices import set_tf32, set_threads
    from pdscli.sample import distributed
    from pdscli.sample.job import RunInterrupted
    from pdscli.sample.model import ModelSpec
    from pdscli.sample.run import run, run_distributed
    from pdscli.sample.setup import SampleFlags, build_job

    if threads is not None:
        set_threads(threads)
    set_tf32(tf32)
    # Under torchrun each rank joins the process group and takes its local GPU (or the CPU).
    dist, device = distributed.setup(device)
    spec = ModelSpec(
        checkpoint=checkpoint, config=config, preset=preset, engine=engine, engine_backend=engine_backend, model=model,
        image_size=image_size, channels=channels, trust_checkpoint=trust_checkpoint, precision=precision,
        device=device, sigma_min=sigma_min, sigma_max=sigma_max, num_scales=num_scales, snr=snr,
    )
    flags = SampleFlags(
        out=out, masks=masks, freq_mask=freq_mask, space_mask=space_mask, alpha=alpha, sampler=sampler, steps=steps, nfe=nfe,
        speed_up=speed_up, schedule=schedule, per_sample_step=per_sample_step, num_samples=num_samples,
        batch_size=batch_size, seed=seed, force=force, resume=resume, step_graphs=step_graphs, whole_step=whole_step,
        teleport=teleport,
    )
    try:
        with Progress(enabled=not quiet and dist.is_main) as bars:
            if dist.active:
                record = run_distributed(lambda: build_job(spec, flags, lock=dist.is_main), dist, progress=SampleBars(bars))
            else:
                record = run(build_job(spec, flags), progress=SampleBars(bars))
    except RunInterrupted as e:
        report_interruption(str(e))
        raise typer.Exit(e.exit_code) from None
    finally:
        dist.close()
    if record is None:  # not rank 0
        return
    if as_json:
        print_json({"out": str(out), **record})
    else:
        print_line(summary_line(record, out))


def summary_line(record: dict, out: Path) -> str:
    n, t = record["num_samples"], record["timings"]
    return (
        f"{n} images in {out}/ (grid.png, samples.npz, run.json): {record['made_now']} made in "
        f"{t['sampling_s']:.2f} s, {record['nfe']['per_sample']} NFE each, sampler {record['sampler']}"
    ) + (f" ({record['nfe_budget']['reason']})" if record.get("nfe_budget") else "")
