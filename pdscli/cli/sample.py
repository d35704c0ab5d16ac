"""`pds sample`: flags -> a SampleJob -> pdscli.sample.run.run. The logic lives in the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pdscli.cli import options
from pdscli.cli.app import app
from pdscli.console import console, err_console

MODEL, SAMPLER, OUTPUT, RUN = "Model", "Sampler", "Output", "Run"

EPILOG = (
    "Examples:\n\n"
    "  pds sample --num-samples 16 --out digits/        (the built-in model)\n\n"
    "  pds sample --model gaussian --steps 20 --num-samples 4 --out out/\n\n"
    "  pds sample --checkpoint checkpoint.pth --preset cifar10 --masks masks/cifar10-32.npz --speed-up 10\n\n"
    "  pds sample --engine engines/cifar10.onnx --steps 100 --num-samples 50000 --batch-size 500 --out fid/\n\n"
    "  pds sample --out out/ --resume      (finish an interrupted run)\n\n"
    "Writes NNNNNN.png per sample (as soon as its batch is done), grid.png, samples.npz "
    "(float32 [N,C,H,W] in [0,1]) and run.json. Sample i's noise is seeded from (--seed, i)."
)


@app.command(
    "sample",
    help=(
        "Sample images from a score model with the PDS (preconditioned) or vanilla predictor-corrector "
        "sampler, or an accelerated one. Model: --checkpoint with --config/--preset, --engine, or --model "
        "gaussian; none = the built-in digits model."
    ),
    epilog=EPILOG,
)
def sample(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="score_sde / pds checkpoint (.pth).", rich_help_panel=MODEL),
    config: Optional[Path] = typer.Option(None, "--config", help="Config of the checkpoint (.json / score_sde .py).", rich_help_panel=MODEL),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named config of an official checkpoint, e.g. cifar10.", rich_help_panel=MODEL),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Exported engine: .onnx or TensorRT .plan.", rich_help_panel=MODEL),
    backend: Optional[str] = typer.Option(None, "--backend", help="Engine backend (passed to the engine loader), e.g. cpu, cuda, tensorrt.", rich_help_panel=MODEL),
    model: Optional[str] = typer.Option(None, "--model", help="`builtin` (the default: a small digits model, run with PDS, its own filters and 30 steps unless told otherwise) or `gaussian` (exact analytic score).", rich_help_panel=MODEL),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Image side of --model gaussian (default 32).", rich_help_panel=MODEL),
    channels: Optional[int] = typer.Option(None, "--channels", help="Channels of --model gaussian (default 3).", rich_help_panel=MODEL),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow a checkpoint that needs full pickle loading (runs code from the file).", rich_help_panel=MODEL),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32 | fp16 | bf16, the network only (sampler state stays fp32). Default fp32, or the engine's own.", rich_help_panel=MODEL),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N.", rich_help_panel=MODEL),
    tf32: options.Tf32 = "off",
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's, one per core). On a busy machine 1 is often much faster for small models.", rich_help_panel=MODEL),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Filters .npz made by `pds filters`.", rich_help_panel=SAMPLER),
    freq_mask: Optional[Path] = typer.Option(None, "--freq-mask", help="Reference freq_mask.npy [C,H,W].", rich_help_panel=SAMPLER),
    space_mask: Optional[Path] = typer.Option(None, "--space-mask", help="Reference space_mask.npy [C,H,W].", rich_help_panel=SAMPLER),
    alpha: str = typer.Option("5", "--alpha", help="Filter strength: filter = alpha / (m + alpha - 1); larger = weaker. A number (the reference uses 5) or `auto`: alpha from the step count, so that PDS is not worse than vanilla at many steps (docs/samplers.md).", rich_help_panel=SAMPLER),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="pc, pds, predictor, corrector, or an accelerated one: ddim, accel-ode, accel-ode2, ddpm, accel-sde. Default: pds with filters, else pc.", rich_help_panel=SAMPLER),
    steps: Optional[int] = typer.Option(None, "--steps", help="Number of steps (default: the model's num_scales).", rich_help_panel=SAMPLER),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="Step grid: pc (the reference's; default for pc/pds/predictor/corrector), geometric (default for the accelerated samplers) or edm.", rich_help_panel=SAMPLER),
    speed_up: Optional[int] = typer.Option(None, "--speed-up", help="Run num_scales / k steps (the reference's speed-up, eps times k too).", rich_help_panel=SAMPLER),
    snr: Optional[float] = typer.Option(None, "--snr", help="Corrector signal-to-noise ratio (default: the model's).", rich_help_panel=SAMPLER),
    sigma_min: Optional[float] = typer.Option(None, "--sigma-min", help="Override the model's sigma_min.", rich_help_panel=SAMPLER),
    sigma_max: Optional[float] = typer.Option(None, "--sigma-max", help="Override the model's sigma_max.", rich_help_panel=SAMPLER),
    num_scales: Optional[int] = typer.Option(None, "--num-scales", help="Override the model's num_scales.", rich_help_panel=SAMPLER),
    per_sample_step: bool = typer.Option(
        False, "--per-sample-step",
        help=(
            "Corrector step size per sample. Default: the reference's batch-mean step size (for fidelity), "
            "which couples the samples of a batch, so images then depend on --batch-size; with this flag "
            "a seed gives the same images at any batch size."
        ),
        rich_help_panel=SAMPLER,
    ),
    step_graphs: bool = typer.Option(False, "--step-graphs", help="On a GPU: capture each whole step (score call and sampler update) in a CUDA graph after one eager batch, and replay it for every batch of the same size; falls back to eager where it cannot (run.json says which path ran).", rich_help_panel=RUN),
    num_samples: int = typer.Option(16, "--num-samples", "-n", help="How many images.", rich_help_panel=RUN),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Images per batch.", rich_help_panel=RUN),
    seed: int = typer.Option(0, "--seed", help="Run seed; sample i's noise is a function of (seed, i), whatever the batch.", rich_help_panel=RUN),
    out: Path = typer.Option(Path("samples"), "--out", "-o", help="Output folder.", rich_help_panel=OUTPUT),
    force: bool = typer.Option(False, "--force", help="Start over in a non-empty output folder (removes an earlier run's images).", rich_help_panel=OUTPUT),
    resume: bool = typer.Option(False, "--resume", help="Continue a run: keep the images on disk, make the rest.", rich_help_panel=OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars.", rich_help_panel=OUTPUT),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout (for scripts).", rich_help_panel=OUTPUT),
):
    from pdscli.sample import distributed
    from pdscli.sample import run as runner
    from pdscli.devices import set_tf32
    from pdscli.sample.run import ModelSpec, RunInterrupted

    set_tf32(tf32)
    if threads is not None:
        from pdscli.devices import set_threads

        set_threads(threads)
    # Under torchrun each rank joins the process group and takes its local GPU (or the CPU).
    dist, device = distributed.setup(device)
    spec = ModelSpec(
        checkpoint=checkpoint, config=config, preset=preset, engine=engine, backend=backend, model=model,
        image_size=image_size, channels=channels, trust_checkpoint=trust_checkpoint, precision=precision,
        device=device, overrides=dict(sigma_min=sigma_min, sigma_max=sigma_max, num_scales=num_scales, snr=snr),
    )
    make_job = lambda: runner.build_job(  # noqa: E731
        spec, out=out, masks=masks, freq_mask=freq_mask, space_mask=space_mask, alpha=alpha, sampler=sampler,
        steps=steps, speed_up=speed_up, schedule=schedule, snr=snr, per_sample_step=per_sample_step, num_samples=num_samples,
        batch_size=batch_size, seed=seed, force=force, resume=resume, step_graphs=step_graphs,
    )
    progress = runner.Progress() if quiet or not dist.is_main else runner.RichProgress()
    try:
        if dist.active:
            record = runner.run_distributed(make_job, dist, progress=progress)
        else:
            record = runner.run(make_job(), progress=progress)
    except RunInterrupted as e:
        err_console.print(str(e), highlight=False, soft_wrap=True, markup=False)
        raise typer.Exit(e.exit_code) from None
    finally:
        dist.close()
    if record is None:  # not rank 0
        return
    if as_json:
        typer.echo(json.dumps({"out": str(out), **record}))
    else:
        console.print(runner.summary_line(record, out), highlight=False, soft_wrap=True)
