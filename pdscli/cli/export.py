"""`pds export`: flags -> pdscli.engines.export.run_export. The flow lives in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pdscli.cli import options
from pdscli.cli.app import Command, app, interruptible
from pdscli.cli.output import print_json, print_line, stderr_log

BATCH = "Batch (TensorRT profile; ONNX files are always dynamic)"

EPILOG = (
    "Examples:\n\n"
    "  pds export --checkpoint checkpoint_26.pth --preset cifar10                 (engines/checkpoint_26-fp32.onnx)\n\n"
    "  pds export --checkpoint ckpt.pth --config config.json --precision fp16 --out engines/ffhq-fp16.onnx\n\n"
    "  pds export --preset bedroom --random-weights --format trt --precision fp16 --min-batch 1 --max-batch 8\n\n"
    "  pds sample --engine engines/checkpoint_26-fp32.onnx --steps 100\n\n"
    "  pds export --checkpoint ckpt.pth --config config.json --format diffusers --out ncsnpp-diffusers/\n\n"
    "Every export is checked before it is written: onnx.checker, then the graph (and a TensorRT engine "
    "after its build) against the PyTorch model at sigmas from sigma_min to sigma_max and two batch sizes. "
    "Over tolerance the export fails and leaves no file. TensorRT engines get a manifest (<engine>.json) "
    "and are rebuilt only when their inputs change."
)


@app.command(
    "export", cls=Command,
    help=(
        "Export a score network to ONNX (inputs x [B,C,H,W] and sigma [B], output score; sampling settings in "
        "the metadata) or build a TensorRT engine from it, at fp32, fp16 or bf16."
    ),
    epilog=EPILOG,
)
def export(
    checkpoint: options.Checkpoint = None,
    config: options.Config = None,
    preset: options.Preset = None,
    random_weights: options.RandomWeights = False,
    raw_weights: bool = typer.Option(False, "--raw-weights", help="Export the raw weights instead of the EMA ones.",
                                     rich_help_panel=options.MODEL),
    trust_checkpoint: options.TrustCheckpoint = False,
    fmt: str = typer.Option("onnx", "--format", "-f", help="{formats}.", rich_help_panel=options.OUTPUT),
    precision: str = typer.Option("fp32", "--precision", help="{precisions}: written into the graph; the time embedding and normalisation stay fp32.", rich_help_panel=options.OUTPUT),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default engines/<checkpoint or preset>-<precision>.onnx|.plan).", rich_help_panel=options.OUTPUT),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file (a TensorRT engine that is up to date is kept anyway).", rich_help_panel=options.OUTPUT),
    device: options.Device = "auto",
    check_sigmas: str = typer.Option("4", "--check-sigmas", metavar="N", help="Noise levels of the parity check, log-spaced from sigma_min to sigma_max.", rich_help_panel=options.OUTPUT),
    tolerance: Optional[str] = typer.Option(None, "--tolerance", metavar="X", help="Max relative error of the parity check (default 1e-4 fp32, 2e-2 fp16, 1e-1 bf16).", rich_help_panel=options.OUTPUT),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Fixed batch size.", rich_help_panel=BATCH),
    min_batch: Optional[int] = typer.Option(None, "--min-batch", help="Smallest batch (default 1).", rich_help_panel=BATCH),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", help="Batch TensorRT tunes for (default max).", rich_help_panel=BATCH),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch (default 16).", rich_help_panel=BATCH),
    quiet: options.Quiet = False,
    as_json: options.Json = False,
):
    from pdscli.engines.contract import BatchProfile
    from pdscli.engines.export import run_export

    profile = BatchProfile.from_flags(batch_size, min_batch, opt_batch, max_batch)
    with interruptible():  # nothing is written before the export and its check are done
        summary = run_export(
            checkpoint=checkpoint, config=config, preset=preset, fmt=fmt, precision=precision, profile=profile,
            out=out, force=force, trust_checkpoint=trust_checkpoint, random_weights=random_weights,
            weights="raw" if raw_weights else "ema", device=device, sigmas=check_sigmas, tolerance=tolerance,
            log=stderr_log(quiet),
        )
    if as_json:
        print_json(summary)
    else:
        print_line(summary_line(summary))


def summary_line(summary: dict) -> str:
    size = summary["size_bytes"] / 2**20
    if summary["format"] == "diffusers":
        return f"wrote {summary['path']} ({size:.1f} MiB, diffusers pipeline)"
    cached = " (up to date, not rebuilt)" if summary.get("cached") else ""
    return f"wrote {summary['path']} ({size:.1f} MiB, {summary['precision']}){cached}"
