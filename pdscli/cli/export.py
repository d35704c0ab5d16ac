"""`pds export`: a checkpoint (or a preset's architecture) -> a checked ONNX file or TensorRT engine.

The flow: check everything cheap first (format, precision, TensorRT, the output path), then open
the network (`pdscli.models.network.open_network`), export the graph (`engines.onnx_export`),
and for TensorRT build the engine (`engines.tensorrt_engine`) and check it (`engines.parity`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from pdscli.cli import options
from pdscli.cli.app import app, interruptible
from pdscli.console import console, err_console
from pdscli.errors import PdsError

BATCH = "Batch (TensorRT profile; ONNX files are always dynamic)"
FORMATS = ("onnx", "trt")

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
    checkpoint: options.Checkpoint = None,
    config: options.Config = None,
    preset: options.Preset = None,
    random_weights: options.RandomWeights = False,
    raw_weights: bool = typer.Option(False, "--raw-weights", help="Export the raw weights instead of the EMA ones.",
                                     rich_help_panel=options.MODEL),
    trust_checkpoint: options.TrustCheckpoint = False,
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | trt (TensorRT engine, needs `pip install \"pds\\[trt]\"` and a GPU) | diffusers (a ScoreSdeVePipeline folder: unet/ + scheduler/, safetensors).", rich_help_panel=options.OUTPUT),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | fp16 | bf16: written into the graph; the time embedding and normalisation stay fp32.", rich_help_panel=options.OUTPUT),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default engines/<checkpoint or preset>-<precision>.onnx|.plan).", rich_help_panel=options.OUTPUT),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file (a TensorRT engine that is up to date is kept anyway).", rich_help_panel=options.OUTPUT),
    device: str = typer.Option("cpu", "--device", help="Where the export and its check run: cpu | cuda | cuda:N (TensorRT builds on a GPU regardless).", rich_help_panel=options.OUTPUT),
    check_sigmas: int = typer.Option(4, "--check-sigmas", min=1, help="Noise levels of the parity check, log-spaced from sigma_min to sigma_max.", rich_help_panel=options.OUTPUT),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max relative error of the parity check (default 1e-4 fp32, 2e-2 fp16, 1e-1 bf16).", rich_help_panel=options.OUTPUT),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Fixed batch size.", rich_help_panel=BATCH),
    min_batch: Optional[int] = typer.Option(None, "--min-batch", help="Smallest batch (default 1).", rich_help_panel=BATCH),
    opt_batch: Optional[int] = typer.Option(None, "--opt-batch", help="Batch TensorRT tunes for (default max).", rich_help_panel=BATCH),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Largest batch (default 16).", rich_help_panel=BATCH),
    quiet: options.Quiet = False,
    as_json: options.Json = False,
):
    from pdscli.engines.contract import BatchProfile

    if fmt.lower() == "diffusers":
        with interruptible():
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

    with interruptible():  # nothing is written before the export and its check are done
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


def default_out(stem: str, precision: str, fmt: str, folder: str | Path = "engines") -> Path:
    return Path(folder) / f"{stem}-{precision}.{'onnx' if fmt == 'onnx' else 'plan'}"


def source_stem(checkpoint=None, config=None, preset=None, random_weights=False) -> str:
    """The default file-name stem, known before the (slow) model load (`Network.stem` once loaded)."""
    if random_weights or checkpoint is None:
        return f"{preset or (Path(config).stem if config else 'model')}-random"
    return Path(checkpoint).stem


def open_source(checkpoint=None, config=None, preset=None, *, random_weights=False, weights="ema",
                trust_checkpoint=False, seed: int = 0):
    """The fp32 network to export and the `pds.*` metadata of its exports (pds.precision left empty)."""
    from pdscli.engines.onnx_export import export_metadata
    from pdscli.models.network import open_network

    network = open_network(checkpoint, config, preset, random_weights=random_weights, seed=seed, weights=weights,
                           trust_checkpoint=trust_checkpoint)
    meta = export_metadata(network.settings, precision="", preset=network.preset or preset,
                           checkpoint_sha256=network.sha256, weights=network.weights)
    return network, meta


def onnx_for_engine(network, metadata: dict, onnx_path: Path, *, precision, force, device, batches, sigmas,
                    tolerance, log) -> bytes:
    """The ONNX bytes a TensorRT engine is built from, kept beside it. An existing file with the
    same `pds.*` metadata (same checkpoint, precision, settings, pds version) is reused: the
    export is the slow part of a rebuild for another batch profile."""
    from pdscli.engines.files import onnx_properties
    from pdscli.engines.onnx_export import export_onnx

    wanted = {**metadata, "pds.precision": precision}
    if onnx_path.exists():
        props = {k: v for k, v in onnx_properties(onnx_path).items() if k.startswith("pds.")}
        if props == wanted:
            log(f"reusing {onnx_path} (same checkpoint, precision and settings)")
            return onnx_path.read_bytes()
        if not force:
            differ = sorted(k for k in set(props) | set(wanted) if props.get(k) != wanted.get(k))
            raise PdsError(f"{onnx_path} exists and holds another export (differs in {', '.join(differ)}); "
                           "pass --force to overwrite it")
    return export_onnx(network.net, network.settings, precision=precision, metadata=metadata, out=onnx_path,
                       device=device, batches=batches, sigmas=sigmas, tolerance=tolerance, log=log).data


def _remove_engine(engine: Path) -> None:
    from pdscli.engines.cache import manifest_path

    for p in (engine, manifest_path(engine)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def run_export(*, checkpoint=None, config=None, preset=None, fmt="onnx", precision="fp32", profile=None, out=None,
               force=False, trust_checkpoint=False, random_weights=False, weights="ema", device="cpu", sigmas=4,
               tolerance=None, log: Callable[[str], None] = lambda s: None) -> dict:
    """`pds export`: checks everything cheap first (format, TensorRT, output path), then exports."""
    import torch

    from pdscli.devices import PRECISIONS, resolve_device
    from pdscli.engines.contract import BatchProfile
    from pdscli.engines.onnx_export import export_onnx
    from pdscli.engines.parity import TOLERANCES, check_parity_or_fail, trt_parity
    from pdscli.engines.tensorrt_engine import build_engine, require_tensorrt
    from pdscli.fsutil import prepare_out_file, sha256_file

    fmt, precision = fmt.lower(), precision.lower()
    profile = profile or BatchProfile(1, 16, 16)
    if fmt not in FORMATS:
        raise PdsError(f"--format must be onnx or trt, not {fmt!r}")
    if precision not in PRECISIONS:
        raise PdsError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = resolve_device(device)
    trt_device = device if device.type == "cuda" else torch.device("cuda")
    if fmt == "trt":
        require_tensorrt(trt_device)
    out = Path(out) if out is not None else default_out(
        source_stem(checkpoint, config, preset, random_weights), precision, fmt)
    suffixes = (".onnx",) if fmt == "onnx" else (".plan", ".engine")
    if out.suffix.lower() not in suffixes:
        # open_engine tells the engine type from the suffix: a misnamed file could not be opened.
        raise PdsError(f"--out for --format {fmt} must end in {' or '.join(suffixes)}, not {out.name!r}")
    # An existing engine may be a cache hit: whether it needs --force is decided at build time.
    prepare_out_file(out, force=force or fmt == "trt")
    batches, tol = profile.parity_batches(), TOLERANCES[precision] if tolerance is None else tolerance
    network, meta = open_source(checkpoint, config, preset, random_weights=random_weights, weights=weights,
                                trust_checkpoint=trust_checkpoint)
    log(f"exporting {network.stem} ({network.num_params:,} parameters) at {precision}")
    summary = {"format": fmt, "precision": precision, "settings": network.settings.to_dict()}
    if fmt == "onnx":
        export_onnx(network.net, network.settings, precision=precision, metadata=meta, out=out,
                    device=device, batches=batches, sigmas=sigmas, tolerance=tol, log=log)
        return {**summary, "path": str(out), "sha256": sha256_file(out), "size_bytes": out.stat().st_size}

    onnx_path = out.with_suffix(".onnx")
    data = onnx_for_engine(network, meta, onnx_path, precision=precision, force=force, device=device,
                           batches=batches, sigmas=sigmas, tolerance=tol, log=log)
    _, cached = build_engine(data, out, precision=precision, profile=profile.as_tuple(), chw=network.settings.shape,
                             metadata={**meta, "pds.precision": precision}, device=trt_device,
                             onnx_path=onnx_path, force=force, log=log)
    if not cached:
        report = trt_parity(network.net, network.settings, out, device=trt_device, batches=batches, sigmas=sigmas,
                            tolerance=tol, log=log)
        if not report.ok:
            _remove_engine(out)
            check_parity_or_fail(report, f"the {precision} TensorRT engine")
    return {**summary, "path": str(out), "onnx": str(onnx_path), "cached": cached,
            "profile": dict(zip(("min", "opt", "max"), profile.as_tuple())), "size_bytes": out.stat().st_size}


def _export_diffusers(checkpoint, config, preset, random_weights, raw_weights, trust_checkpoint, precision, out,
                      force) -> dict:
    """A diffusers pipeline folder, written only after pds read it back to the same tensors."""
    import torch

    from pdscli.models import diffusers
    from pdscli.models.checkpoint import load_score_model
    from pdscli.models.network import open_network

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
    network = open_network(checkpoint, config, preset, random_weights=random_weights,
                           weights="raw" if raw_weights else "ema", trust_checkpoint=trust_checkpoint)
    expected = network.net.state_dict()

    def same_tensors(folder: Path) -> None:
        loaded = load_score_model(folder).state_dict()
        differ = [k for k, v in expected.items() if not torch.equal(loaded[k].to(v.device, v.dtype), v)]
        if differ:
            raise PdsError(f"the diffusers folder does not read back to the same weights ({differ[0]}); nothing written")

    return diffusers.write_pipeline(out, network.net, force=force, check=same_tensors)
