"""`pds export`: a checkpoint (or a preset's architecture) -> a checked ONNX file or TensorRT engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pdscli.cli.app import app
from pdscli.console import console, err_console

MODEL, OUTPUT, BATCH = "Model", "Output", "Batch (TensorRT profile; ONNX files are always dynamic)"

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
    "export",
    help=(
        "Export a score network to ONNX (inputs x [B,C,H,W] and sigma [B], output score; sampling settings in "
        "the metadata) or build a TensorRT engine from it, at fp32, fp16 or bf16."
    ),
    epilog=EPILOG,
)
def export(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="score_sde / pds checkpoint (.pth, .safetensors), a diffusers folder, or hf:ORG/NAME\\[@REVISION].", rich_help_panel=MODEL),
    config: Optional[Path] = typer.Option(None, "--config", help="Config of the checkpoint (.json).", rich_help_panel=MODEL),
    preset: Optional[str] = typer.Option(None, "--preset", help="Named config, e.g. cifar10, bedroom.", rich_help_panel=MODEL),
    random_weights: bool = typer.Option(False, "--random-weights", help="No checkpoint: the --preset/--config architecture with random weights (for benchmarks).", rich_help_panel=MODEL),
    raw_weights: bool = typer.Option(False, "--raw-weights", help="Export the raw weights instead of the EMA ones.", rich_help_panel=MODEL),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="Allow a checkpoint that needs full pickle loading (runs code from the file).", rich_help_panel=MODEL),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | trt (TensorRT engine, needs `pip install \"pds\\[trt]\"` and a GPU) | diffusers (a ScoreSdeVePipeline folder: unet/ + scheduler/, safetensors).", rich_help_panel=OUTPUT),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16: written into the graph; the time embedding and normalisation stay fp32.", rich_help_panel=OUTPUT),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default engines/<checkpoint or preset>-<precision>.onnx|.plan).", rich_help_panel=OUTPUT),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file (a TensorRT engine that is up to date is kept anyway).", rich_help_panel=OUTPUT),
    device: str = typer.Option("cpu", "--device", help="Where the export and its check run: cpu | cuda | cuda:N (TensorRT builds on a GPU regardless).", rich_help_panel=OUTPUT),
    check_sigmas: int = typer.Option(4, "--check-sigmas", min=1, help="Noise levels of the parity check, log-spaced from sigma_min to sigma_max.", rich_help_panel=OUTPUT),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max relative error of the parity check (default 1e-4 fp32, 2e-2 fp16, 1e-1 bf16).", rich_help_panel=OUTPUT),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Fixed batch size.", rich_help_panel=BATCH),
    min_batch: Optional[int] = typer.Option(None, "--min-batch", help="Smallest batch (default 1).", rich_help_panel=BATCH),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", help="Batch TensorRT tunes for (default max).", rich_help_panel=BATCH),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch (default 16).", rich_help_panel=BATCH),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the result line."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout (for scripts)."),
):
    from pdscli.engines.export import BatchProfile, run_export

    if fmt.lower() == "diffusers":
        summary = _export_diffusers(checkpoint, config, preset, random_weights, raw_weights, trust_checkpoint,
                                    precision, out, force)
        if as_json:
            typer.echo(json.dumps(summary))
        else:
            console.print(f"wrote {summary['path']} ({summary['size_bytes'] / 2**20:.1f} MiB, diffusers pipeline)",
                          highlight=False, soft_wrap=True, markup=False)
        return
    profile = BatchProfile.from_flags(batch_size, min_batch, opt_batch, max_batch)

    def log(line: str) -> None:
        if not quiet:
            err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    summary = run_export(
        checkpoint=checkpoint, config=config, preset=preset, fmt=fmt, precision=precision, profile=profile,
        out=out, force=force, trust_checkpoint=trust_checkpoint, random_weights=random_weights,
        weights="raw" if raw_weights else "ema", device=device, sigmas=check_sigmas, tolerance=tolerance, log=log,
    )
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        size = summary["size_bytes"] / 2**20
        cached = " (up to date, not rebuilt)" if summary.get("cached") else ""
        console.print(f"wrote {summary['path']} ({size:.1f} MiB, {summary['precision']}){cached}", highlight=False,
                      soft_wrap=True, markup=False)


def _export_diffusers(checkpoint, config, preset, random_weights, raw_weights, trust_checkpoint, precision, out,
                      force) -> dict:
    """A diffusers pipeline folder, written only after pds read it back to the same tensors."""
    import torch

    from pdscli.engines.export import load_source, source_stem
    from pdscli.errors import PdsError
    from pdscli.models import diffusers
    from pdscli.models.checkpoint import load_score_model

    if precision.lower() != "fp32":
        raise PdsError("--format diffusers writes float32 weights (diffusers casts at load time); drop --precision")
    out = out or Path(f"{source_stem(checkpoint, config, preset, random_weights)}-diffusers")
    if out.exists() and not force:  # checked before the (slow) load too
        raise PdsError(f"{out} exists; pass --force to replace it")
    if config is not None or preset is not None:  # refused before the (slow) load when the config says so
        from pdscli.models.config import resolve_config

        why = diffusers.exportable(resolve_config(config, preset)[0])
        if why:
            raise PdsError(f"cannot export to diffusers: {why}")
    source = load_source(checkpoint, config, preset, random_weights=random_weights,
                         weights="raw" if raw_weights else "ema", trust_checkpoint=trust_checkpoint)
    expected = source.net.state_dict()

    def same_tensors(folder: Path) -> None:
        loaded = load_score_model(folder).state_dict()
        differ = [k for k, v in expected.items() if not torch.equal(loaded[k].to(v.device, v.dtype), v)]
        if differ:
            raise PdsError(f"the diffusers folder does not read back to the same weights ({differ[0]}); nothing written")

    return diffusers.write_pipeline(out, source.net, force=force, check=same_tensors)
