"""`pds filters`: an image folder -> PDS filter statistics (.npz, preview PNG, optionally the reference's .npy files)."""

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
    "  pds filters ~/data/ffhq --size 256                 (writes masks/ffhq-256.npz and masks/ffhq-256.png)\n\n"
    "  pds filters ~/data/cifar10-png --preset cifar10 --limit 5000 --npy\n\n"
    "  pds filters ~/data/church --engine engines/church.onnx --out masks/church.npz --force\n\n"
    "Then: pds sample ... --masks masks/ffhq-256.npz. The .npz holds the raw statistics "
    "freq = log(1 + mean|fft2 x|^2) and space = mean x^2 ([C,H,W]); --alpha is applied at sampling time."
)


@app.command(
    "filters", cls=Command,
    help=(
        "Compute PDS filters (frequency and space statistics) from a folder of images "
        "(PNG, JPEG, WebP, BMP, TIFF; recursive), resized and centre-cropped to the model's size."
    ),
    epilog=EPILOG,
)
def filters(
    image_dir: Path = typer.Argument(..., help="Folder of training-like images (searched recursively).", show_default=False),
    size: Optional[int] = typer.Option(None, "--size", help="Image side; default: from --preset / --engine."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Take --size and --channels from a named model config."),
    engine: Optional[Path] = typer.Option(None, "--engine", help="Take --size and --channels from an exported engine's metadata."),
    channels: Optional[int] = typer.Option(None, "--channels", help="1 (grey) or 3 (RGB); default 3, or the model's."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N images (sorted by path)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Decoding threads (default: CPU count, at most 8)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .npz (default masks/<folder>-<size>.npz)."),
    npy: bool = typer.Option(False, "--npy", help="Also write the reference's freq_mask.npy and space_mask.npy (in a folder named after --out)."),
    force: options.Force = False,
    quiet: options.Quiet = False,
    as_json: options.Json = False,
):
    from pdscli.api import filters as statistics
    from pdscli.cli.progress import Progress
    from pdscli.precondition import filters as lib

    size, channels = resolve_shape(size=size, channels=channels, preset=preset, engine=engine)
    out = out or lib.default_out_path(image_dir, size)
    lib.check_outputs(out, npy=npy, force=force)  # before reading a large folder, not after
    with interruptible(), Progress(enabled=not quiet) as bars:
        stats = statistics(image_dir, size, channels=channels, limit=limit, workers=workers,
                           progress=bars.counter("images"))
    with interruptible():  # the set is renamed into place whole, or not at all
        paths = lib.write_filters(stats, out, npy=npy, force=force)
    if as_json:
        print_json({"filters": stats.describe(), "count": stats.count, "size": stats.size,
                    "channels": stats.channels, "files": {k: str(v) for k, v in paths.items()}})
    else:
        written = ", ".join(str(p) for p in paths.values())
        print_line(f"{stats.describe()} -> {written}")


def resolve_shape(*, size: int | None, channels: int | None, preset: str | None = None, engine=None) -> tuple[int, int]:
    """(size, channels): the flags, else the model's (--preset / --engine); a flag that contradicts the model is an error."""
    if preset and engine:
        raise PdsError("--preset and --engine exclude each other: the size comes from one model")
    model = None
    if preset:
        model = (f"preset {preset}", *preset_shape(preset))
    elif engine:
        from pdscli.engines.files import engine_shape

        model = (Path(engine).name, *engine_shape(engine))
    if model:
        name, model_size, model_channels = model
        for flag, given, actual in (("--size", size, model_size), ("--channels", channels, model_channels)):
            if given is not None and given != actual:
                raise PdsError(f"{flag} {given} contradicts {name} ({model_channels}x{model_size}x{model_size} images); drop {flag}")
        size, channels = model_size, model_channels
    if size is None:
        raise PdsError("give the image size: --size N, or --preset NAME / --engine FILE to take it from the model")
    return int(size), int(channels if channels is not None else 3)


def preset_shape(name: str) -> tuple[int, int]:
    """(image_size, num_channels) of a named model config (pdscli.models.checkpoint's presets)."""
    from pdscli.models.config import get_preset, settings_from_config

    settings = settings_from_config(get_preset(name))
    return settings.image_size, settings.num_channels
