"""`pds train`: flags -> pdscli.train.loop.run_training. The logic lives in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pdscli.cli import options
from pdscli.cli.app import Command, app, interruptible
from pdscli.cli.output import print_json, print_line
from pdscli.errors import PdsError

EPILOG = (
    "Examples:\n\n"
    "  pds train digits --out runs/digits      (the built-in model's recipe: its config is the default for digits)\n\n"
    "  pds train ~/data/faces --preset cifar10 --image-size 32 --iters 20000 --out runs/faces\n\n"
    "  pds train digits --config my.json --sigma-max auto --iters 500 --out runs/try --force\n\n"
    "  pds train digits --out runs/digits --resume --iters 8000      (continue to step 8000)\n\n"
    "Writes DIR/config.json (the whole recipe), DIR/checkpoint.pth (score_sde layout, atomically replaced "
    "every --save-every steps), DIR/ema.safetensors (the EMA weights with their config), DIR/log.jsonl (the loss) and DIR/train.json. Sample from it with "
    "`pds sample --checkpoint DIR/checkpoint.pth --config DIR/config.json`."
)


@app.command(
    "train", cls=Command,
    help=(
        "Train an NCSN++ score model with score_sde's continuous VE denoising score matching, on a folder of "
        "images or the built-in `digits` data set (scikit-learn's, no download). Small and CPU-friendly; "
        "see the Examples below."
    ),
    epilog=EPILOG,
)
def train(
    source: str = typer.Argument(..., metavar="IMAGE_DIR_OR_DATASET", help="A folder of images, or `digits`."),
    config: options.Config = None,
    preset: options.Preset = None,
    out: Path = typer.Option(Path("train-out"), "--out", "-o", help="Output folder for the run."),
    iters: Optional[int] = typer.Option(None, "--iters", help="Total optimisation steps (default: training.n_iters)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per step (default: training.batch_size)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate after warm-up (default: optim.lr)."),
    sigma_max: Optional[str] = typer.Option(None, "--sigma-max", help="model.sigma_max, or `auto`: the data's largest pairwise distance."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Train at this size (data.image_size)."),
    channels: Optional[int] = typer.Option(None, "--channels", help="1 (grey) or 3 (RGB) (data.num_channels)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the weights, batches and noise (default 0)."),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="Steps between checkpoints (default: training.snapshot_freq_for_preemption)."),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="Steps between loss records (default: training.log_freq)."),
    device: options.Device = "auto",
    threads: options.Threads = None,
    force: options.Force = False,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint.",
                                rich_help_panel=options.OUTPUT),
    trust_checkpoint: options.TrustCheckpoint = False,
    quiet: options.Quiet = False,
    as_json: options.Json = False,
):
    from pdscli.cli.progress import Progress
    from pdscli.train.loop import TrainOptions, default_config, run_training

    if threads is not None:
        from pdscli.devices import set_threads

        set_threads(threads)
    opts = TrainOptions(
        iters=iters, batch_size=batch_size, lr=lr, sigma_max=_sigma_max(sigma_max), image_size=image_size,
        channels=channels, seed=seed, save_every=save_every, log_every=log_every, device=device, force=force,
        resume=resume, trust_checkpoint=trust_checkpoint,
    )
    opts.validate()
    if resume and (config or preset):
        raise PdsError(f"--config / --preset: a resumed run keeps its own config ({out / 'config.json'})")
    cfg = None if resume else default_config(source, config, preset)
    with interruptible(f"continue from the last checkpoint with --resume --out {out}"), \
            Progress(enabled=not quiet, log_lines=True) as bars:
        result = run_training(source, cfg, out, opts, progress=_train_lane(bars))
    if as_json:
        print_json(summary(result))
        return
    loss = f", loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    print_line(
        f"trained steps {result.start_step}..{result.step} in {result.seconds:.1f} s{loss}: {out}/checkpoint.pth\n"
        f"sample: pds sample --checkpoint {out}/checkpoint.pth --config {out}/config.json --steps 50"
    )


def summary(result) -> dict:
    """--json: what the run did and where its files are."""
    out = Path(result.out_dir)
    return {"out": str(out), "start_step": result.start_step, "step": result.step,
            "seconds": round(result.seconds, 3), "final_loss": result.final_loss,
            "files": {name: str(out / name) for name in ("checkpoint.pth", "config.json", "ema.safetensors",
                                                          "log.jsonl", "train.json")}}


def _sigma_max(value: str | None):
    if value is None or value == "auto":
        return value
    from pdscli.flag_rules import refusal

    try:
        return float(value)
    except ValueError:
        raise refusal("--sigma-max", "a positive number or auto", value) from None



def _train_lane(bars):
    """run_training's progress(step, total, loss, seconds) as one bar with the loss and it/s."""
    lane, first = None, None

    def update(step: int, total: int, loss: float, seconds: float) -> None:
        nonlocal lane, first
        if lane is None:
            first, lane = step - 1, bars.lane("train", total, step - 1)
        rate = (step - first) / max(seconds, 1e-9)
        lane.update(completed=step, total=total, text=f"loss {loss:.4f} {rate:.2f} it/s")

    return update
