"""Export a score network to ONNX (the `score(x, sigma)` contract), checked before it is written.

The exported graph:
- inputs `x` [B, C, H, W] float32 and `sigma` [B] float32, output `score` [B, C, H, W]
  float32; the batch is dynamic, the resolution fixed;
- sampling settings and provenance as `pds.*` metadata properties;
- at fp16/bf16 the reduced precision is in the graph itself (explicit Casts, made by the
  model's `set_precision`), with the Fourier time embedding and normalisation statistics in
  fp32; inputs and output stay float32, so every engine keeps the same contract.

Before a file is written the graph passes `onnx.checker` and a parity check in ONNX Runtime
(`pdscli.engines.parity`) against the fp32 PyTorch model at sigmas across [sigma_min, sigma_max] and two batch sizes;
over tolerance the export fails and nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from pdscli import __version__
from pdscli.devices import PRECISIONS
from pdscli.engines.contract import INPUT_NAMES, OUTPUT_NAME, check_io_signature
from pdscli.engines.parity import TOLERANCES, ParityReport, check_parity_or_fail, format_parity, onnx_parity
from pdscli.errors import PdsError, first_line
from pdscli.fsutil import atomic_write_bytes
from pdscli.settings import SamplingSettings

# Conv / MatMul take bfloat16 only from opset 22; 18 keeps fp32/fp16 graphs loadable by older
# TensorRT 10.x parsers and ONNX Runtime builds.
OPSETS = {"fp32": 18, "fp16": 18, "bf16": 22}
MAX_DYNAMIC_BATCH = 4096


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
        with _noting_interrupts() as interrupts, _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                graph,
                (x, sigma),
                dynamo=True,
                verbose=False,
                input_names=list(INPUT_NAMES),
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"x": {0: batch}, "sigma": {0: batch}},
                opset_version=OPSETS[precision],
                external_data=False,
                optimize=True,
            )
    except Exception as e:  # the exporter's error types vary between torch releases
        if interrupts or _interrupted(e):
            # The exporter turned a Ctrl-C into its own error: it is an interruption, not a failure.
            raise KeyboardInterrupt from None
        first = first_line(e)
        raise PdsError(f"ONNX export failed ({type(e).__name__}): {first[:300]}") from None
    proto = program.model_proto
    if precision == "bf16":
        promote_unsupported(proto, TensorProto.BFLOAT16)
    return proto


@contextlib.contextmanager
def _noting_interrupts():
    """Note every Ctrl-C (SIGINT) while the exporter runs, then handle it as before.

    The exporter tries several capture strategies and reports the first one's error: a Ctrl-C
    that surfaces inside one of them as an ordinary exception would read as a failed export.
    """
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield seen
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed outside Python: Python's own handler is the best stand-in
        previous = signal.default_int_handler

    def note(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupted(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt is somewhere in `error`'s chain of causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


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
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        first = first_line(e)
        raise PdsError(f"the exported graph fails onnx.checker: {first[:300]}") from e
    check_io_signature(label, *graph_io(proto))


def graph_io(proto):
    """(name, dtype, shape) of a ModelProto's inputs and outputs (shape None = dynamic)."""
    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "undefined"
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out.append((v.name, dtype, dims))
        return out

    return describe(proto.graph.input), describe(proto.graph.output)


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
        try:
            atomic_write_bytes(out, data)
        except OSError as e:
            raise PdsError(f"cannot write {out}: {e.strerror}") from None
    return OnnxExport(data, meta, report)
