"""ONNX Runtime engine: an exported `.onnx` file as a `score(x, sigma)` callable.

On CPU the tensors go through numpy (zero-copy for contiguous float32). On CUDA the inputs and
the output are bound to torch's device memory by address (IO binding), so a sampling step
copies nothing through the host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pdscli.engines.contract import OUTPUT_NAME, BatchAdapter, check_io_signature, check_precision
from pdscli.errors import PdsError, first_line
from pdscli.fsutil import sha256_file
from pdscli.score import ScoreModel, as_inputs
from pdscli.settings import SamplingSettings

BACKENDS = ("auto", "cpu", "cuda", "tensorrt")
_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


def _ort():
    import onnxruntime

    return onnxruntime


def choose_providers(device: torch.device, backend: str | None, cache_dir: Path | None = None) -> list:
    """ONNX Runtime execution providers (with options) for a torch device and --engine-backend."""
    backend = (backend or "auto").lower()
    if backend not in BACKENDS:
        raise PdsError(f"--engine-backend must be one of {', '.join(BACKENDS)} for an ONNX model, not {backend!r}")
    if device.type == "cpu":
        if backend not in ("auto", "cpu"):
            raise PdsError(f"--engine-backend {backend} runs on a GPU: pass --device cuda (or drop --engine-backend)")
        return [("CPUExecutionProvider", {})]
    if device.type != "cuda":
        raise PdsError(f"ONNX Runtime engines run on cpu or cuda, not {device}")
    if backend == "cpu":
        raise PdsError("--engine-backend cpu runs on the CPU: pass --device cpu")
    index = device.index if device.index is not None else torch.cuda.current_device()
    # Run on torch's stream, so ORT's kernels are ordered after the ops that made the inputs.
    stream = str(torch.cuda.current_stream(index).cuda_stream)
    cuda = ("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": stream})
    if backend == "tensorrt":
        trt_opts = {"device_id": index, "user_compute_stream": stream, "trt_timing_cache_enable": True}
        if cache_dir is not None:
            trt_opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir))
        return [("TensorrtExecutionProvider", trt_opts), cuda]
    return [cuda]


def create_session(model: bytes | str | Path, providers: list, *, threads: int | None = None, label: str):
    """The one way `pds` makes an ONNX Runtime session: from a file or the model's bytes, with the
    execution `providers` (`choose_providers`), `threads` intra-op threads (None: ORT's default;
    the bench gives ORT the same budget as torch), and a one-line error naming `label` when the
    model cannot be loaded or ORT silently falls back from the provider asked for to the CPU."""
    ort = _ort()
    have = ort.get_available_providers()
    wanted = providers[0][0]
    if wanted not in have:
        hint = ' (pip install "onnxruntime-gpu")' if wanted != "CPUExecutionProvider" else ""
        raise PdsError(f"this onnxruntime ({ort.__version__}) has no {wanted}{hint}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: ORT's warnings are about its own internals
    if threads is not None:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=providers)
    except Exception as e:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        first = first_line(e)
        raise PdsError(f"cannot load {label} as an ONNX model: {first[:400]}") from None
    if session.get_providers()[0] != wanted:
        # ORT silently falls back to the CPU when the CUDA / TensorRT libraries fail to load.
        raise PdsError(
            f"ONNX Runtime could not start {wanted} for {label} (got {session.get_providers()[0]}); "
            "check the CUDA / cuDNN / TensorRT libraries onnxruntime-gpu needs"
        )
    return session


def session_io(session):
    """(name, dtype, shape) of a session's inputs and outputs, in check_io_signature's terms."""

    def describe(args):
        return [(a.name, _ORT_TYPES.get(a.type, a.type), [d if isinstance(d, int) else None for d in a.shape]) for a in args]

    return describe(session.get_inputs()), describe(session.get_outputs())


def settings_from_props(path, props: dict, chw, overrides: dict | None) -> SamplingSettings:
    """Sampling settings from `pds.*` metadata, flags winning; the image shape may come from the graph."""
    props = dict(props)
    props.setdefault("pds.num_channels", str(chw[0]))
    props.setdefault("pds.image_size", str(chw[1]))
    settings = SamplingSettings.from_metadata(props, **(overrides or {}))
    if settings.shape != tuple(chw):
        raise PdsError(
            f"{Path(path).name} takes images {list(chw)}, but the settings say "
            f"{settings.num_channels} channels of {settings.image_size}px"
        )
    return settings


class OnnxScore:
    """`score(x, sigma)` through an ONNX Runtime session."""

    def __init__(self, session, device: torch.device, label: str = "the ONNX model"):
        self.session = session
        self.device = device
        self.label = label
        self.provider = session.get_providers()[0]
        if device.type == "cuda":
            self.device_id = device.index if device.index is not None else torch.cuda.current_device()
            self.stream = torch.cuda.current_stream(self.device_id).cuda_stream

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x, sigma = as_inputs(x, sigma, self.device)
        try:
            if self.device.type != "cpu":
                return self._run_bound(x, sigma)
            out = self.session.run([OUTPUT_NAME], {"x": x.numpy(), "sigma": sigma.numpy()})[0]
        except Exception as e:  # ORT's own pybind exception types (Fail, RuntimeException, ...)
            first = first_line(e)
            raise PdsError(f"ONNX Runtime failed running {self.label} on x {list(x.shape)}: {first[:300]}") from None
        if tuple(out.shape) != tuple(x.shape):
            # The declared signature was checked at load; a graph can still compute another shape.
            raise PdsError(f"{self.label} returned score {list(out.shape)} for x {list(x.shape)}: "
                           "it breaks the score contract (the score has the shape of x)")
        return torch.from_numpy(out)

    def _run_bound(self, x, sigma):
        out = torch.empty_like(x)
        current = torch.cuda.current_stream(self.device_id)
        if current.cuda_stream != self.stream:
            # The session runs on the stream it was made on; make the inputs visible to it.
            current.synchronize()
        binding = self.session.io_binding()
        for name, t in (("x", x), ("sigma", sigma)):
            binding.bind_input(name, "cuda", self.device_id, np.float32, tuple(t.shape), t.data_ptr())
        binding.bind_output(OUTPUT_NAME, "cuda", self.device_id, np.float32, tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)  # returns when the outputs are written
        return out


def open_onnx(path, *, device: torch.device, backend=None, precision=None, overrides=None) -> ScoreModel:
    path = Path(path)
    providers = choose_providers(device, backend, cache_dir=path.parent / ".ort-trt-cache")
    session = create_session(path, providers, label=path.name)
    inputs, outputs = session_io(session)
    chw, fixed_batch = check_io_signature(path, inputs, outputs)
    props = dict(session.get_modelmeta().custom_metadata_map)
    check_precision(path, props.get("pds.precision"), precision)
    settings = settings_from_props(path, props, chw, overrides)
    engine = OnnxScore(session, device, label=path.name)
    score = BatchAdapter(engine, fixed_batch, fixed_batch) if fixed_batch else engine
    info = {
        "backend": "onnxruntime",
        "provider": engine.provider,
        "precision": props.get("pds.precision", "unknown"),
        "file": str(path),
        "exported_by": props.get("pds.version"),
        "fixed_batch": fixed_batch,
    }
    return ScoreModel(score, settings, f"onnx:{path}", device, sha256=sha256_file(path), info=info)
