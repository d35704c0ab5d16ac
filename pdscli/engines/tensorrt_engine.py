"""TensorRT engines: build one from the exported ONNX, load it, run it on torch's stream.

- Build: strongly typed network (the precision is the ONNX graph's own, casts included), one
  optimisation profile over the batch range, a timing cache kept in the engines folder, and a
  JSON manifest beside the engine (`pdscli.engines.cache`). Concurrent builders of the same
  engine serialise on `<engine>.lock`; the engine is written to a temp file and renamed.
- Load: the manifest must match this GPU and TensorRT version and the engine's sha256;
  otherwise it is refused with the reason, never loaded silently.
- Run: device buffers allocated once at the profile's max batch and bound by address once;
  `execute_async_v3` on the current torch stream; optional CUDA-graph capture of the call.

`tensorrt` is imported inside functions only: the rest of the toolkit never needs it.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pdscli.engines.contract import OUTPUT_NAME, BatchAdapter, check_io_signature, check_precision
from pdscli.engines.cache import (
    BuildEnv,
    BuildSpec,
    build_lock,
    cache_key,
    check_manifest,
    differences,
    is_up_to_date,
    make_manifest,
    read_manifest,
    timing_cache_path,
    write_manifest,
)
from pdscli.engines.onnx_engine import settings_from_props
from pdscli.errors import PdsError
from pdscli.fsutil import atomic_path, atomic_write_bytes
from pdscli.score import ScoreModel, as_inputs

INSTALL_HINT = 'TensorRT is not installed: pip install "pds[trt]" (TensorRT 10 or later, on a machine with an NVIDIA GPU)'
_LOGGER = None


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise PdsError(INSTALL_HINT) from None
    return tensorrt


def require_tensorrt(device="cuda"):
    """(tensorrt module, CUDA device) or a one-line PdsError saying what is missing."""
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise PdsError(f"TensorRT engines need an NVIDIA GPU, and torch {torch.__version__} sees none")
    device = torch.device(device)
    if device.type != "cuda":
        raise PdsError(f"TensorRT engines run on a GPU: pass --device cuda, not {device}")
    return trt, device


def _logger(trt):
    # TensorRT keeps a reference to the logger for the lifetime of its objects: one per process.
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def current_env(trt, device: torch.device) -> BuildEnv:
    props = torch.cuda.get_device_properties(device)
    return BuildEnv(trt.__version__, props.name, f"{props.major}.{props.minor}")


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings that change the engine, and so belong in the cache key."""

    opt_level: int = 3
    workspace_gib: float | None = None
    tf32: bool = False  # off: fp32 engines must match the fp32 model, not TF32's 10-bit mantissa

    def as_dict(self) -> dict:
        return asdict(self)


# --- build ------------------------------------------------------------------------------------


def _parse(trt, builder, onnx_bytes: bytes):
    flags = 0
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly is not None:  # later TensorRT releases may make strong typing the only mode
        flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, _logger(trt))
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise PdsError(f"TensorRT cannot parse the ONNX graph: {errors[0] if errors else 'unknown error'}")
    return network, parser


def _configure(trt, builder, options: BuildOptions, profile: tuple[int, int, int], chw, timing: bytes):
    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    if options.workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    if not options.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    opt = builder.create_optimization_profile()
    lo, mid, hi = profile
    opt.set_shape("x", (lo, *chw), (mid, *chw), (hi, *chw))
    opt.set_shape("sigma", (lo,), (mid,), (hi,))
    config.add_optimization_profile(opt)
    cache = config.create_timing_cache(timing)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config, cache


def _timing_cache_file(engine: Path, env: BuildEnv) -> Path:
    # Tactic timings are only valid on the GPU and TensorRT that measured them.
    tag = hashlib.sha256(f"{env.gpu_name}|{env.compute_capability}|{env.tensorrt_version}".encode()).hexdigest()[:12]
    base = timing_cache_path(engine)
    return base.with_name(f"{base.stem}-{tag}{base.suffix}")


def build_serialized(trt, onnx_bytes: bytes, *, profile, chw, options: BuildOptions, timing: bytes):
    """(engine bytes, updated timing cache bytes)."""
    builder = trt.Builder(_logger(trt))
    network, _parser = _parse(trt, builder, onnx_bytes)
    config, cache = _configure(trt, builder, options, profile, chw, timing)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise PdsError("TensorRT could not build the engine (its messages are above)")
    return bytes(serialized), bytes(cache.serialize())


def build_engine(
    onnx_bytes: bytes,
    engine: str | Path,
    *,
    precision: str,
    profile: tuple[int, int, int],
    chw: tuple[int, int, int],
    metadata: dict[str, str],
    device="cuda",
    options: BuildOptions = BuildOptions(),
    onnx_path=None,
    force: bool = False,
    log=lambda s: None,
) -> tuple[Path, bool]:
    """Build (or find up to date) the engine for `onnx_bytes`; returns (path, was_cached).

    An existing engine for another key is replaced only with `force`."""
    trt, device = require_tensorrt(device)
    engine = Path(engine)
    env = current_env(trt, device)
    spec = BuildSpec(hashlib.sha256(onnx_bytes).hexdigest(), precision, tuple(profile), options.as_dict())
    key = cache_key(spec, env)
    with build_lock(engine):
        # Checked under the lock: a concurrent builder of the same key may have just finished.
        if is_up_to_date(engine, key):
            log(f"{engine} is up to date (key {key[:12]})")
            return engine, True
        if engine.exists() and not force:
            raise PdsError(f"{engine} exists and was built from something else ({_why_different(engine, spec, env)}); "
                           "pass --force to rebuild it")
        timing_file = _timing_cache_file(engine, env)
        timing = timing_file.read_bytes() if timing_file.exists() else b""
        log(f"building TensorRT {env.tensorrt_version} engine on {env.gpu_name}, batch {profile[0]}..{profile[2]} ...")
        with torch.cuda.device(device):
            data, timing = build_serialized(trt, onnx_bytes, profile=profile, chw=chw, options=options, timing=timing)
        manifest = make_manifest(spec, env, engine_sha256=hashlib.sha256(data).hexdigest(),
                                 metadata=metadata, onnx_path=onnx_path)
        try:
            with atomic_path(engine) as tmp:
                tmp.write_bytes(data)
                # The manifest lands first: a reader that sees the new engine also sees its manifest,
                # and one that sees the new manifest with the old engine fails the sha256 check.
                write_manifest(engine, manifest)
            with build_lock(timing_file):
                atomic_write_bytes(timing_file, timing)
        except OSError as e:
            raise PdsError(f"cannot write {engine} or its manifest: {e.strerror}") from None
    return engine, False


def _why_different(engine: Path, spec: BuildSpec, env: BuildEnv) -> str:
    try:
        manifest = read_manifest(engine)
    except PdsError:
        return "no readable manifest"
    return "; ".join(differences(manifest, spec, env)) or "manifest key differs"


# --- run --------------------------------------------------------------------------------------


def _dtype_name(trt, dtype) -> str:
    return {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16"}.get(dtype, str(dtype))


def engine_io(trt, engine):
    """(inputs, outputs) as (name, dtype, shape) for check_io_signature; -1 dims are dynamic."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = [d if d >= 0 else None for d in engine.get_tensor_shape(name)]
        entry = (name, _dtype_name(trt, engine.get_tensor_dtype(name)), shape)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(entry)
    return inputs, outputs


class TrtScore:
    """`score(x, sigma)` through a TensorRT execution context.

    Buffers live at the profile's max batch and are bound once; a call copies its inputs in
    (device to device), runs, and returns a copy of the output rows (the buffer is reused)."""

    def __init__(self, engine, device: torch.device, chw, max_batch: int, *, cuda_graph: bool = False):
        self.engine, self.device, self.chw = engine, device, tuple(chw)
        self.context = engine.create_execution_context()
        if self.context is None:
            raise PdsError("TensorRT could not create an execution context (out of GPU memory?)")
        # Valid values in every row: a CUDA graph runs its whole captured batch, padding included.
        self.x = torch.zeros((max_batch, *self.chw), device=device)
        self.sigma = torch.ones((max_batch,), device=device)
        self.out = torch.empty_like(self.x)
        for name, t in (("x", self.x), ("sigma", self.sigma), (OUTPUT_NAME, self.out)):
            self.context.set_tensor_address(name, t.data_ptr())
        self.batch = None
        self.cuda_graph = cuda_graph
        self.graph = None
        self.graph_batch = None

    def _set_batch(self, b: int) -> None:
        if b != self.batch:
            self.context.set_input_shape("x", (b, *self.chw))
            self.context.set_input_shape("sigma", (b,))
            self.batch = b

    def _enqueue(self) -> None:
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self.context.execute_async_v3(stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see TensorRT's messages)")

    def _capture(self, b: int) -> None:
        self._set_batch(b)
        # TensorRT allocates lazily on the first run after a shape change; that run must not be captured.
        self._enqueue()
        torch.cuda.current_stream(self.device).synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._enqueue()
        self.graph, self.graph_batch = graph, b

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x, sigma = as_inputs(x, sigma, self.device)
        b = x.shape[0]
        if self.cuda_graph and self.graph_batch is not None and b > self.graph_batch:
            n = self.graph_batch
            return torch.cat([self(x[i : i + n], sigma[i : i + n]) for i in range(0, b, n)])
        self.x[:b].copy_(x)
        self.sigma[:b].copy_(sigma)
        if not self.cuda_graph:
            self._set_batch(b)
            self._enqueue()
            return self.out[:b].clone()
        if self.graph is None:
            self._capture(b)
        # Rows b..graph_batch hold earlier (valid) inputs: their results are dropped.
        self.graph.replay()
        return self.out[:b].clone()


def _load_engine(trt, path: Path, manifest: dict):
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("engine_sha256"):
        raise PdsError(f"{path} does not match its manifest's sha256 (changed or corrupt); rebuild it with `pds export --format trt --force`")
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise PdsError(f"TensorRT cannot load {path} (corrupt, or built by another TensorRT)")
    return engine, runtime


def open_trt(path, *, device, precision=None, overrides=None, cuda_graph: bool = False) -> ScoreModel:
    path = Path(path)
    trt, device = require_tensorrt(device)
    manifest = read_manifest(path)
    check_manifest(manifest, current_env(trt, device), path)
    check_precision(path, manifest.get("precision"), precision)
    with torch.cuda.device(device):
        engine, runtime = _load_engine(trt, path, manifest)
        chw, _ = check_io_signature(path, *engine_io(trt, engine))
        lo, _opt, hi = (s[0] for s in engine.get_tensor_profile_shape("x", 0))
        runner = TrtScore(engine, device, chw, hi, cuda_graph=cuda_graph)
    runner.runtime = runtime  # the runtime must outlive the engine
    settings = settings_from_props(path, manifest.get("metadata", {}), chw, overrides)
    info = {
        "backend": "tensorrt",
        "tensorrt_version": manifest.get("tensorrt_version"),
        "precision": manifest.get("precision"),
        "profile": manifest.get("profile"),
        "cuda_graph": cuda_graph,
        "file": str(path),
        "key": manifest.get("key"),
    }
    score = BatchAdapter(runner, lo, hi)
    # sha256 from the manifest: _load_engine has just checked the file against it.
    return ScoreModel(score, settings, f"trt:{path}", device, sha256=manifest["engine_sha256"], info=info)
