"""Export a score network to ONNX (the `score(x, sigma)` contract) and prove it against PyTorch.

The exported graph:
- inputs `x` [B, C, H, W] float32 and `sigma` [B] float32, output `score` [B, C, H, W]
  float32; the batch is dynamic, the resolution fixed;
- sampling settings and provenance as `pds.*` metadata properties;
- at fp16/bf16 the reduced precision is in the graph itself (explicit Casts, made by the
  model's `set_precision`), with the Fourier time embedding and normalisation statistics in
  fp32; inputs and output stay float32, so every engine keeps the same contract.

Before a file is written the graph passes `onnx.checker` and a parity check in ONNX Runtime
against the fp32 PyTorch model at sigmas across [sigma_min, sigma_max] and two batch sizes;
over tolerance the export fails and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pdscli import __version__
from pdscli.devices import PRECISIONS
from pdscli.errors import PdsError
from pdscli.engines.onnx_engine import OnnxScore, choose_providers, create_session
from pdscli.models.checkpoint import open_network
from pdscli.settings import SamplingSettings

# Conv / MatMul take bfloat16 only from opset 22; 18 keeps fp32/fp16 graphs loadable by older
# TensorRT 10.x parsers and ONNX Runtime builds.
OPSETS = {"fp32": 18, "fp16": 18, "bf16": 22}
# Per-sample relative error: max|onnx - torch| / max|torch| over the sample's pixels, against
# the fp32 PyTorch model. fp32 is a reimplementation check; the reduced-precision bounds are
# only meant to catch a broken graph (overflow, a dropped cast), not to grade accuracy.
TOLERANCES = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}
MAX_DYNAMIC_BATCH = 4096


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine is built for (TensorRT optimisation profile)."""

    min: int
    opt: int
    max: int

    @classmethod
    def from_flags(cls, batch_size=None, min_batch=None, opt_batch=None, max_batch=None) -> "BatchProfile":
        """--batch-size B (fixed) or --min/--opt/--max-batch; default a fixed batch of 1..16."""
        ranged = (min_batch, opt_batch, max_batch)
        if batch_size is not None:
            if any(v is not None for v in ranged):
                raise PdsError("--batch-size excludes --min-batch/--opt-batch/--max-batch")
            profile = cls(batch_size, batch_size, batch_size)
        else:
            lo = min_batch if min_batch is not None else 1
            hi = max_batch if max_batch is not None else max(lo, opt_batch or 0, 16)
            profile = cls(lo, opt_batch if opt_batch is not None else hi, hi)
        if not 1 <= profile.min <= profile.opt <= profile.max:
            raise PdsError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {profile.min}, {profile.opt}, {profile.max}")
        return profile

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.min, self.opt, self.max)

    def parity_batches(self) -> tuple[int, ...]:
        """Two batch sizes inside the profile (one when it is fixed)."""
        return tuple(sorted({self.min, min(self.max, max(self.min, 4))}))


@dataclass
class ParityReport:
    rows: list[tuple[int, float, float, float]] = field(default_factory=list)  # batch, sigma, abs, rel
    tolerance: float = 0.0
    checked_on: str = ""

    @property
    def max_abs(self) -> float:
        return max((r[2] for r in self.rows), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((r[3] for r in self.rows), default=0.0)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and self.max_rel <= self.tolerance


# --- the graph ---------------------------------------------------------------------------


class ScoreGraph(nn.Module):
    """What is exported: the network with the float32 output the contract promises."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.net(x, sigma).to(torch.float32)


def at_precision(net: nn.Module, precision: str) -> nn.Module:
    """A copy of `net` computing at `precision`, via the model's `set_precision` (which keeps
    the time embedding and normalisation statistics in fp32). The original stays fp32: it is
    the reference of the parity check."""
    if precision == "fp32":
        return net
    if not hasattr(net, "set_precision"):
        raise PdsError(f"this model cannot run at {precision} (it has no set_precision); export at fp32")
    low = copy.deepcopy(net)
    low.set_precision(PRECISIONS[precision])
    return low.eval()


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs about optional torchvision ops and deprecations: not the user's business."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(old)


def to_onnx(net: nn.Module, settings: SamplingSettings, precision: str):
    """The ONNX ModelProto of `net` at `precision`, dynamic in the batch."""
    graph = ScoreGraph(at_precision(net, precision)).eval()
    device = next(net.parameters()).device
    # Batch 2 in the example: a batch of 1 invites the tracer to specialise the batch dimension.
    x = torch.rand(2, *settings.shape, device=device)
    sigma = torch.tensor([settings.sigma_min, settings.sigma_max], device=device, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)
    try:
        with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                graph,
                (x, sigma),
                dynamo=True,
                verbose=False,
                input_names=["x", "sigma"],
                output_names=["score"],
                dynamic_shapes={"x": {0: batch}, "sigma": {0: batch}},
                opset_version=OPSETS[precision],
                external_data=False,
                optimize=True,
            )
    except Exception as e:  # the exporter's error types vary between torch releases
        first = (str(e).strip().splitlines() or [""])[0]
        raise PdsError(f"ONNX export failed ({type(e).__name__}): {first[:300]}") from e
    proto = program.model_proto
    if precision == "bf16":
        from onnx import TensorProto

        promote_unsupported(proto, TensorProto.BFLOAT16)
    return proto


def _accepts(schema, index: int, type_str: str, is_input: bool = True) -> bool:
    """Whether `schema`'s input (or output) `index` may have type `type_str`."""
    formals = schema.inputs if is_input else schema.outputs
    if not formals:
        return True
    formal = formals[min(index, len(formals) - 1)]  # variadic inputs repeat the last formal
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    return type_str in allowed.get(formal.type_str, {formal.type_str})


def promote_unsupported(proto, elem_type: int) -> int:
    """Run nodes whose ONNX schema does not accept `elem_type` in float32 instead.

    The exporter writes e.g. Einsum (attention) with bfloat16 inputs, which no ONNX opset
    allows; such nodes get Casts to float32 around them (explicit, so TensorRT's strongly
    typed build sees them). Returns how many nodes were wrapped.
    """
    import onnx
    from onnx import TensorProto, helper

    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 18)
    type_str = f"tensor({helper.tensor_dtype_to_string(elem_type).split('.')[-1].lower()})"
    types = {v.name: v.type.tensor_type.elem_type for v in [*proto.graph.value_info, *proto.graph.input, *proto.graph.output]}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    nodes, wrapped = [], 0
    for node in proto.graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        except Exception:  # custom domains: leave alone
            nodes.append(node)
            continue
        bad = [i for i, name in enumerate(node.input) if name and types.get(name) == elem_type and not _accepts(schema, i, type_str)]
        if not bad:
            nodes.append(node)
            continue
        wrapped += 1
        for i in bad:
            cast_name = f"{node.name or node.op_type}_in{i}_fp32"
            nodes.append(helper.make_node("Cast", [node.input[i]], [cast_name], to=TensorProto.FLOAT, name=cast_name))
            node.input[i] = cast_name
        tails = []
        for j, out in enumerate(node.output):
            if types.get(out) == elem_type:
                inner = f"{out}_fp32"
                node.output[j] = inner
                tails.append(helper.make_node("Cast", [inner], [out], to=elem_type, name=f"{inner}_back"))
        nodes.append(node)
        nodes.extend(tails)
    if wrapped:
        # The old value_info would now lie about the renamed outputs; let the checker infer them.
        del proto.graph.value_info[:]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    return wrapped


def export_metadata(settings: SamplingSettings, *, precision: str, preset=None, checkpoint_sha256=None,
                    weights: str = "ema", extra: dict | None = None) -> dict[str, str]:
    """The `pds.*` properties an exported file carries: settings plus provenance."""
    meta = settings.to_metadata()
    meta.update({
        "pds.precision": precision,
        "pds.preset": preset or "",
        "pds.checkpoint_sha256": checkpoint_sha256 or "",
        "pds.weights": weights,
        "pds.version": __version__,
    })
    meta.update(extra or {})
    return meta


def set_metadata(proto, metadata: dict[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.producer_name, proto.producer_version = "pds", __version__


def check_graph(proto, label: str) -> None:
    """onnx.checker plus the score contract on the graph's declared inputs and outputs."""
    import onnx

    from pdscli.engines import check_io_signature

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PdsError(f"the exported graph fails onnx.checker: {first[:300]}") from e
    check_io_signature(label, *graph_io(proto))


def graph_io(proto):
    """(name, dtype, shape) of a ModelProto's inputs and outputs (shape None = dynamic)."""
    import onnx

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "undefined"
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out.append((v.name, dtype, dims))
        return out

    return describe(proto.graph.input), describe(proto.graph.output)


# --- parity --------------------------------------------------------------------------------


def parity_sigmas(settings: SamplingSettings, count: int) -> list[float]:
    """`count` sigmas spaced evenly in log sigma, both ends included."""
    if count == 1:
        return [settings.sigma_max]
    lo, hi = math.log(settings.sigma_min), math.log(settings.sigma_max)
    return [math.exp(lo + (hi - lo) * i / (count - 1)) for i in range(count)]


def parity_plan(levels: list[float], batches) -> list[list[float]]:
    """The sigmas of each parity batch: the largest batch size covers every level (in as many
    batches as it takes), each smaller size runs once, from the high-sigma end."""
    *small, big = sorted(set(batches))
    plan = [[levels[::-1][i % len(levels)] for i in range(b)] for b in small]
    for start in range(0, len(levels), big):
        plan.append([levels[(start + i) % len(levels)] for i in range(big)])
    return plan


def parity_cases(settings: SamplingSettings, *, sigmas: int = 4, batches=(1, 4), seed: int = 0, device="cpu"):
    """(x, sigma) batches as a sampler sees them: x = data in [0, 1] + sigma * noise, at sigmas
    log-spaced over [sigma_min, sigma_max] and at each of `batches` (the dynamic batch dimension)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for row in parity_plan(parity_sigmas(settings, sigmas), batches):
        sig = torch.tensor(row, dtype=torch.float32)
        x0 = torch.rand(len(row), *settings.shape, generator=g)
        x = x0 + sig[:, None, None, None] * torch.randn(len(row), *settings.shape, generator=g)
        cases.append((x.to(device), sig.to(device)))
    return cases


@contextlib.contextmanager
def exact_fp32():
    """TF32 off while the reference runs: it would be the larger error on Ampere and later."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def measure_parity(reference: Callable, candidate: Callable, cases, *, tolerance: float, checked_on: str) -> ParityReport:
    """Per-sample max abs and relative error of `candidate` against `reference` on `cases`."""
    report = ParityReport(tolerance=tolerance, checked_on=checked_on)
    with torch.no_grad(), exact_fp32():
        for x, sigma in cases:
            ref = reference(x, sigma).float()
            got = candidate(x, sigma).float().to(ref.device)
            for b in range(x.shape[0]):
                err = (got[b] - ref[b]).abs().max().item()
                if not math.isfinite(err):
                    err = math.inf
                scale = ref[b].abs().max().item()
                rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
                report.rows.append((x.shape[0], float(sigma[b]), err, rel))
    return report


def format_parity(report: ParityReport) -> list[str]:
    lines = [f"parity vs PyTorch fp32 ({report.checked_on}):  batch  sigma  max-abs  rel"]
    for b, s, a, r in report.rows:
        lines.append(f"  {b:5d}  {s:10.4g}  {a:9.3g}  {r:9.3g}")
    verdict = "ok" if report.ok else "FAILED"
    lines.append(f"max abs {report.max_abs:.3g}, max rel {report.max_rel:.3g} (tolerance {report.tolerance:g}): {verdict}")
    return lines


def check_parity_or_fail(report: ParityReport, what: str) -> None:
    if not report.ok:
        worst = max(report.rows, key=lambda r: r[3])
        raise PdsError(
            f"{what} does not match the PyTorch model: relative error {worst[3]:.3g} at sigma {worst[1]:.4g} "
            f"(batch {worst[0]}) exceeds {report.tolerance:g}; nothing was written"
        )


def onnx_parity(net, data: bytes, settings, *, precision, device, batches, sigmas, tolerance, log) -> ParityReport | None:
    """Run the serialized graph in ONNX Runtime against `net`; None if ORT cannot run it here."""
    device = torch.device(device)
    try:
        session = create_session(data, choose_providers(device, None), label="the exported graph")
    except PdsError as e:
        if precision == "bf16":
            # ONNX Runtime's CPU provider has no bf16 Conv kernel (its CUDA one: not checked here).
            log(f"warning: bf16 graph not parity-checked: {e} (TensorRT engines are checked after the build)")
            return None
        raise
    candidate = OnnxScore(session, device)
    cases = parity_cases(settings, sigmas=sigmas, batches=batches, device=device)
    return measure_parity(net, candidate, cases, tolerance=tolerance, checked_on=f"ONNX Runtime {candidate.provider}")


# --- the whole export ------------------------------------------------------------------------


@dataclass
class OnnxExport:
    data: bytes
    metadata: dict[str, str]
    parity: ParityReport | None


def export_onnx(
    net: nn.Module,
    settings: SamplingSettings,
    *,
    precision: str = "fp32",
    metadata: dict[str, str] | None = None,
    out: str | Path | None = None,
    check: bool = True,
    device="cpu",
    batches=(1, 4),
    sigmas: int = 4,
    tolerance: float | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> OnnxExport:
    """Export `net` (fp32, eval mode) to ONNX bytes; check them; write `out` atomically if given."""
    if precision not in PRECISIONS:
        raise PdsError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    net = net.eval().to(device)
    meta = {**(metadata or export_metadata(settings, precision=precision)), "pds.precision": precision}
    proto = to_onnx(net, settings, precision)
    set_metadata(proto, meta)
    check_graph(proto, "the exported graph")
    data = proto.SerializeToString()
    report = None
    if check:
        tol = TOLERANCES[precision] if tolerance is None else tolerance
        report = onnx_parity(net, data, settings, precision=precision, device=device, batches=batches,
                             sigmas=sigmas, tolerance=tol, log=log)
        if report is not None:
            for line in format_parity(report):
                log(line)
            check_parity_or_fail(report, f"the {precision} ONNX graph")
    if out is not None:
        from pdscli.fsutil import atomic_write_bytes

        try:
            atomic_write_bytes(out, data)
        except OSError as e:
            raise PdsError(f"cannot write {out}: {e.strerror}") from None
    return OnnxExport(data, meta, report)


# --- the model to export -----------------------------------------------------------------------

@dataclass
class ExportSource:
    net: nn.Module
    settings: SamplingSettings
    metadata: dict[str, str]  # everything but pds.precision
    stem: str  # default file name stem


def load_source(checkpoint=None, config=None, preset=None, *, random_weights=False, weights="ema",
                trust_checkpoint=False, seed: int = 0) -> ExportSource:
    """The fp32 network to export, its settings and provenance metadata."""
    network = open_network(checkpoint, config, preset, random_weights=random_weights, seed=seed, weights=weights,
                           trust_checkpoint=trust_checkpoint)
    meta = export_metadata(network.settings, precision="", preset=network.preset or preset,
                           checkpoint_sha256=network.sha256, weights=network.weights)
    return ExportSource(network.net, network.settings, meta, network.stem)


def default_out(stem: str, precision: str, fmt: str, folder: str | Path = "engines") -> Path:
    return Path(folder) / f"{stem}-{precision}.{'onnx' if fmt == 'onnx' else 'plan'}"


# --- pds export ------------------------------------------------------------------------------------

FORMATS = ("onnx", "trt")


def source_stem(checkpoint=None, config=None, preset=None, random_weights=False) -> str:
    """The default file-name stem, known before the (slow) model load."""
    if random_weights or checkpoint is None:
        return f"{preset or (Path(config).stem if config else 'model')}-random"
    return Path(checkpoint).stem


def onnx_properties(path: Path) -> dict[str, str]:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise PdsError(f"cannot read {path} as an ONNX model ({type(e).__name__})") from None
    return {p.key: p.value for p in proto.metadata_props}


def onnx_for_engine(source: ExportSource, onnx_path: Path, *, precision, force, device, batches, sigmas,
                    tolerance, log) -> bytes:
    """The ONNX bytes a TensorRT engine is built from, kept beside it. An existing file with the
    same `pds.*` metadata (same checkpoint, precision, settings, pds version) is reused: the
    export is the slow part of a rebuild for another batch profile."""
    wanted = {**source.metadata, "pds.precision": precision}
    if onnx_path.exists():
        props = {k: v for k, v in onnx_properties(onnx_path).items() if k.startswith("pds.")}
        if props == wanted:
            log(f"reusing {onnx_path} (same checkpoint, precision and settings)")
            return onnx_path.read_bytes()
        if not force:
            differ = sorted(k for k in set(props) | set(wanted) if props.get(k) != wanted.get(k))
            raise PdsError(f"{onnx_path} exists and holds another export (differs in {', '.join(differ)}); "
                           "pass --force to overwrite it")
    return export_onnx(source.net, source.settings, precision=precision, metadata=source.metadata, out=onnx_path,
                       device=device, batches=batches, sigmas=sigmas, tolerance=tolerance, log=log).data


def engine_parity(source: ExportSource, engine_path: Path, *, precision, device, batches, sigmas, tolerance, log):
    """Load the built engine and compare it with the fp32 PyTorch model on the GPU."""
    from pdscli.engines.tensorrt_engine import open_trt

    model = open_trt(engine_path, device=device)
    net = source.net.to(device)
    cases = parity_cases(source.settings, sigmas=sigmas, batches=batches, device=device)
    report = measure_parity(net, model.score, cases, tolerance=tolerance, checked_on="TensorRT")
    for line in format_parity(report):
        log(line)
    return report


def _remove_engine(engine: Path) -> None:
    from pdscli.engines.cache import manifest_path

    for p in (engine, manifest_path(engine)):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def run_export(*, checkpoint=None, config=None, preset=None, fmt="onnx", precision="fp32",
               profile: BatchProfile = BatchProfile(1, 16, 16), out=None, force=False, trust_checkpoint=False,
               random_weights=False, weights="ema", device="cpu", sigmas=4, tolerance=None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """`pds export`: checks everything cheap first (format, TensorRT, output path), then exports."""
    from pdscli.devices import resolve_device
    from pdscli.fsutil import prepare_out_file, sha256_file

    fmt, precision = fmt.lower(), precision.lower()
    if fmt not in FORMATS:
        raise PdsError(f"--format must be onnx or trt, not {fmt!r}")
    if precision not in PRECISIONS:
        raise PdsError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = resolve_device(device)
    trt_device = device if device.type == "cuda" else torch.device("cuda")
    if fmt == "trt":
        from pdscli.engines.tensorrt_engine import require_tensorrt

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
    source = load_source(checkpoint, config, preset, random_weights=random_weights, weights=weights,
                         trust_checkpoint=trust_checkpoint)
    log(f"exporting {source.stem} ({sum(p.numel() for p in source.net.parameters()):,} parameters) at {precision}")
    summary = {"format": fmt, "precision": precision, "settings": source.settings.to_dict()}
    if fmt == "onnx":
        export_onnx(source.net, source.settings, precision=precision, metadata=source.metadata, out=out,
                    device=device, batches=batches, sigmas=sigmas, tolerance=tol, log=log)
        return {**summary, "path": str(out), "sha256": sha256_file(out), "size_bytes": out.stat().st_size}

    from pdscli.engines.tensorrt_engine import build_engine

    onnx_path = out.with_suffix(".onnx")
    data = onnx_for_engine(source, onnx_path, precision=precision, force=force, device=device,
                           batches=batches, sigmas=sigmas, tolerance=tol, log=log)
    _, cached = build_engine(data, out, precision=precision, profile=profile.as_tuple(), chw=source.settings.shape,
                             metadata={**source.metadata, "pds.precision": precision}, device=trt_device,
                             onnx_path=onnx_path, force=force, log=log)
    if not cached:
        report = engine_parity(source, out, precision=precision, device=trt_device, batches=batches,
                               sigmas=sigmas, tolerance=tol, log=log)
        if not report.ok:
            _remove_engine(out)
            check_parity_or_fail(report, f"the {precision} TensorRT engine")
    return {**summary, "path": str(out), "onnx": str(onnx_path), "cached": cached,
            "profile": dict(zip(("min", "opt", "max"), profile.as_tuple())), "size_bytes": out.stat().st_size}
