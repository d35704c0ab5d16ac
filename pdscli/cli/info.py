"""`pds info`: what a checkpoint is, which config it fits, and what the samplers will use."""

from __future__ import annotations

from pathlib import Path

import typer

from pdscli.cli import options
from pdscli.cli.app import Command, app
from pdscli.cli.output import print_json
from pdscli.console import console

EPILOG = (
    "Examples:\n\n"
    "  pds info checkpoint_24.pth --preset ffhq-1024\n\n"
    "  pds info checkpoint.pth --config my_config.json --json\n\n"
    "  pds info checkpoint.pth --preset cifar10 --raw-weights\n\n"
    "  pds info hf:google/ncsnpp-ffhq-256      (a diffusers pipeline from the Hugging Face Hub)\n\n"
    "Presets: {presets}. "
    "Without --config or --preset, the preset whose shapes and noise levels fit the file is used."
)


@app.command(
    "info", cls=Command,
    help="Show a score_sde checkpoint's config, parameter count, noise levels, steps, snr, weights and sha256.",
    epilog=EPILOG,
)
def info(
    checkpoint: Path = typer.Argument(..., help="score_sde checkpoint (.pth), a plain state_dict (.pth, .safetensors), a diffusers "
                                  "model or pipeline folder, or hf:ORG/NAME\\[@REVISION]."),
    config: options.Config = None,
    preset: options.Preset = None,
    as_json: options.Json = False,
    raw_weights: bool = typer.Option(False, "--raw-weights", help="Use the raw weights instead of the EMA.",
                                     rich_help_panel=options.MODEL),
    trust_checkpoint: options.TrustCheckpoint = False,
):
    from pdscli.models.checkpoint import checkpoint_report, load_score_model

    model = load_score_model(checkpoint, config, preset=preset, weights="raw" if raw_weights else "ema",
                             trust_checkpoint=trust_checkpoint)
    report = checkpoint_report(model)
    if as_json:
        print_json(report)
    else:
        console.print(_table(report))


_WEIGHTS = {
    "ema": "EMA (ema.shadow_params, as score_sde samples)",
    "raw": "raw (model state_dict)",
    "state_dict": "as stored (plain state_dict)",
}


def _table(report: dict):
    from rich.table import Table

    s, m = report["settings"], report["model"]
    weights = _WEIGHTS[report["weights"]]
    if report["layout"].startswith("diffusers"):
        weights = "as stored (diffusers keeps one set: the EMA weights in score_sde's conversions)"
    elif report["weights_requested"] == "ema" and not report["ema_available"]:
        weights += ", the file has no EMA"
    rows = [
        ("checkpoint", report["checkpoint"]),
        ("sha256", report["sha256"]),
        ("layout", report["layout"] + (f", step {report['step']}" if report["step"] is not None else "")),
        *([("hub", f"{report['hub']['repo']}@{report['hub']['revision'] or 'main'} ({report['hub']['snapshot']})")]
          if report.get("hub") else []),
        *([("weights file", report["weights_file"])] if report.get("weights_file") else []),
        ("config", report["config"]),
        ("weights", weights),
        ("parameters", f"{report['num_params']:,}"),
        ("image", f"{m['num_channels']} x {m['image_size']} x {m['image_size']}"
                  + (f" ({m['dataset']})" if m.get("dataset") else "")),
        ("sigma", f"{s['sigma_min']:g} .. {s['sigma_max']:g}"),
        ("steps (num_scales)", str(s["num_scales"])),
        ("snr", f"{s['snr']:g}"),
        ("network", f"NCSN++ nf {m['nf']}, ch_mult {m['ch_mult']}, {m['num_res_blocks']} res blocks, "
                    f"{m['resblock_type']}, attention at {m['attn_resolutions']}, "
                    f"{m['embedding_type']} embedding, progressive {m['progressive']}/{m['progressive_input']}"),
    ]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    return table
