"""Exporting a score network: an ONNX file, a TensorRT engine or a diffusers pipeline folder.

`run_export` is the whole `pds export` flow. It checks everything cheap first (format,
precision, TensorRT, the output path), then opens the network (`pdscli.models.network`),
exports the graph (`engines.onnx_export`), and for TensorRT builds the engine
(`engines.tensorrt_engine`) and checks it (`engines.parity`). Nothing is written before an
export has passed its check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from pdscli import flag_rules
from pdscli.devices import PRECISIONS, resolve_device
from pdscli.engines.cache import manifest_path, why_not_reusable
from pdscli.engines.contract import BatchProfile
from pdscli.engines.files import onnx_properties
from pdscli.engines.onnx_export import export_metadata, export_onnx
from pdscli.engines.parity import TOLERANCES, check_parity_or_fail, trt_parity
from pdscli.engines.tensorrt_engine import build_engine, require_tensorrt
from pdscli.errors import PdsError
from pdscli.fsutil import prepare_out_file, sha256_file
from pdscli.models import diffusers
from pdscli.models.checkpoint import load_score_model
from pdscli.models.config import resolve_config
from pdscli.models.network import open_network

# What `--format` takes, and what each writes.
FORMATS = {
    "onnx": "an ONNX file (inputs x [B,C,H,W] and sigma [B], output score; sampling settings in the metadata)",
    "trt": "a TensorRT engine (needs `pip install \"pds[trt]\"` and a GPU)",
    "diffusers": "a ScoreSdeVePipeline folder: unet/ + scheduler/, safetensors",
}
FILE_SUFFIXES = {"onnx": (".onnx",), "trt": (".plan", ".engine")}
DEFAULT_PROFILE = BatchProfile(1, 16, 16)

Log = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


def default_out(stem: str, precision: str, fmt: str, folder: str | Path = "engines") -> Path:
    """Where an export goes when --out is not given."""
    if fmt == "diffusers":
        return Path(f"{stem}-diffusers")
    return Path(folder) / f"{stem}-{precision}.{'onnx' if fmt == 'onnx' else 'plan'}"


def source_stem(checkpoint=None, config=None, preset=None, random_weights=False) -> str:
    """The default file-name stem, known before the (slow) model load (`Network.stem` once loaded)."""
    if random_weights or checkpoint is None:
        return f"{preset or (Path(config).stem if config else 'model')}-random"
    return Path(checkpoint).stem


def open_source(checkpoint=None, config=None, preset=None, *, random_weights=False, weights="ema",
                trust_checkpoint=False, seed: int = 0):
    """The fp32 network to export and the `pds.*` metadata of its exports (pds.precision left empty)."""
    network = open_network(checkpoint, config, preset, random_weights=random_weights, seed=seed, weights=weights,
                           trust_checkpoint=trust_checkpoint)
    meta = export_metadata(network.settings, precision="", preset=network.preset or preset,
                           checkpoint_sha256=network.sha256, weights=network.weights)
    return network, meta


def onnx_for_engine(network, metadata: dict, onnx_path: Path, *, precision, force, device, batches, sigmas,
                    tolerance, log: Log) -> bytes:
    """The ONNX bytes a TensorRT engine is built from, kept beside it. An existing file with the
    same `pds.*` metadata (same checkpoint, precision, settings, pds version) is reused: the
    export is the slow part of a rebuild for another batch profile."""
    wanted = {**metadata, "pds.precision": precision}
    if onnx_path.exists():
        props = {k: v for k, v in onnx_properties(onnx_path).items() if k.startswith("pds.")}
        # Keys the file has and this export lacks differ too (None is never a property value).
        why = why_not_reusable(onnx_path, props, {**dict.fromkeys(props), **wanted})
        if why is None:
            log(f"reusing {onnx_path} (same checkpoint, precision and settings)")
            return onnx_path.read_bytes()
        if not force:
            raise PdsError(f"{onnx_path} exists and holds another export ({why}); pass --force to overwrite it")
    return export_onnx(network.net, network.settings, precision=precision, metadata=metadata, out=onnx_path,
                       device=device, batches=batches, sigmas=sigmas, tolerance=tolerance, log=log).data


def _remove_engine(engine: Path) -> None:
    for p in (engine, manifest_path(engine)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def check_format(fmt: str, precision: str) -> tuple[str, str]:
    """--format and --precision, lower-cased and checked."""
    fmt, precision = flag_rules.one_of("--format", fmt, FORMATS), flag_rules.one_of("--precision", precision, PRECISIONS)
    if fmt == "diffusers" and precision != "fp32":
        raise PdsError("--format diffusers writes float32 weights (diffusers casts at load time); drop --precision")
    return fmt, precision


def run_export(*, checkpoint=None, config=None, preset=None, fmt="onnx", precision="fp32", profile=None, out=None,
               force=False, trust_checkpoint=False, random_weights=False, weights="ema", device="auto", sigmas=4,
               tolerance=None, log: Log = _quiet) -> dict:
    """Export a network (checkpoint, or a preset's / config's architecture with random weights) and
    return a summary: {"format", "path", "size_bytes", ...}."""
    fmt, precision = check_format(fmt, precision)
    sigmas = flag_rules.whole_number("--check-sigmas", sigmas)
    tolerance = None if tolerance is None else flag_rules.positive_number("--tolerance", tolerance)
    if fmt == "diffusers":
        return export_diffusers(checkpoint, config, preset, random_weights=random_weights, weights=weights,
                                trust_checkpoint=trust_checkpoint, out=out, force=force, log=log)
    profile = profile or DEFAULT_PROFILE
    device = resolve_device(device)
    trt_device = device if device.type == "cuda" else torch.device("cuda")
    if fmt == "trt":
        require_tensorrt(trt_device)
    out = Path(out) if out is not None else default_out(
        source_stem(checkpoint, config, preset, random_weights), precision, fmt)
    suffixes = FILE_SUFFIXES[fmt]
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


def _same(key: str, loaded: torch.Tensor, written: torch.Tensor) -> bool:
    """Weights must come back bit for bit. The `sigmas` ladder is not stored in a diffusers folder
    but recomputed from the scheduler config with numpy's exp, whose last bit differs between numpy
    builds (1 ulp in ~4% of the levels), so it must agree to float64 rounding only."""
    if key == "sigmas":
        return loaded.shape == written.shape and torch.allclose(loaded, written, rtol=1e-14, atol=0.0)
    return torch.equal(loaded, written)


def export_diffusers(checkpoint=None, config=None, preset=None, *, random_weights=False, weights="ema",
                     trust_checkpoint=False, out=None, force=False, log: Callable[[str], None] = lambda s: None) -> dict:
    """A diffusers pipeline folder, written only after pds read it back to the same tensors."""
    out = Path(out) if out is not None else default_out(
        source_stem(checkpoint, config, preset, random_weights), "fp32", "diffusers")
    diffusers.check_pipeline_out(out, force=force)  # checked before the (slow) load too
    if config is not None or preset is not None:  # refused before the (slow) load when the config says so
        cfg = resolve_config(config, preset)[0]
        why = diffusers.exportable(cfg) or diffusers.unbuildable(cfg)
        if why:
            raise PdsError(f"cannot export to diffusers: {why}")
    network = open_network(checkpoint, config, preset, random_weights=random_weights, weights=weights,
                           trust_checkpoint=trust_checkpoint)
    why = diffusers.unbuildable(network.net.config)  # a folder or hf: source: known only now
    if why:
        raise PdsError(f"cannot export to diffusers: {why}")
    expected = network.net.state_dict()

    def same_tensors(folder: Path) -> None:
        # Quiet: its warnings would name the temporary folder; the summary carries them for --out.
        loaded = load_score_model(folder, warn=lambda message: None).state_dict()
        differ = [k for k, v in expected.items() if not _same(k, loaded[k].to(v.device, v.dtype), v)]
        if differ:
            raise PdsError(f"the diffusers folder does not read back to the same weights ({differ[0]}); nothing written")

    summary = {"format": "diffusers", **diffusers.write_pipeline(out, network.net, force=force, check=same_tensors)}
    for message in summary["warnings"]:
        log(f"warning: {message}")
    return summary
