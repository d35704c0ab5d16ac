"""`pds bench`: what PDS and the engines buy on this model and this machine, measured in one run.

A report has up to four parts, all timed in the same process on the same inputs:

    nfe       per network call (NFE): latency and throughput per backend and batch size
              (warm-up, repeated timed calls, median and IQR / min-max; CUDA events on a GPU,
              perf_counter on the CPU), FLOPs per call (torch FlopCounterMode) and FLOP/s
    overhead  the PDS preconditioner per score evaluation (one M z and one M M^T g) as a
              fraction of one NFE
    e2e       vanilla PC at the full step count against PDS at 1/k of it: wall time, images/s,
              the speedup ratio, and the quality of both (the exact spectral KL on the analytic
              model, or the reference statistic with --reference)
    samplers  every --samplers entry at equal NFE budgets (--nfe), time and quality side by side

Honesty rules the code keeps: every figure is a measurement of this run (nothing is estimated
or copied), a backend that cannot run here is listed with the reason, a speedup is never shown
without the quality it costs when a quality figure exists, and the machine (CPU, load, GPU,
driver, versions) is part of every report. See docs/benchmarks.md for what the figures mean.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pdscli import __version__
from pdscli.errors import PdsError
from pdscli.score import CountingScore

FORMAT = "pds-bench/1"

NETWORK_BACKENDS = (
    "eager", "bf16", "fp16", "compile", "cuda-graph",
    "onnx-cpu", "onnx-cuda", "onnx-trt", "trt-fp32", "trt-fp16", "trt-bf16",
)
ANALYTIC, ENGINE = "analytic", "engine"
KNOWN_BACKENDS = (*NETWORK_BACKENDS, ANALYTIC, ENGINE)
BACKEND_HELP = {
    "eager": "PyTorch eager, fp32",
    "bf16": "PyTorch eager, body in bfloat16 (embedding and GroupNorm fp32)",
    "fp16": "PyTorch eager, body in float16 (embedding and GroupNorm fp32)",
    "compile": "torch.compile (inductor, fixed shapes), fp32",
    "cuda-graph": "PyTorch eager fp32 replayed from a CUDA graph per batch size",
    "onnx-cpu": "ONNX Runtime, CPUExecutionProvider, fp32 graph",
    "onnx-cuda": "ONNX Runtime, CUDAExecutionProvider, fp32 graph",
    "onnx-trt": "ONNX Runtime, TensorrtExecutionProvider, fp32 graph",
    "trt-fp32": "TensorRT engine, fp32", "trt-fp16": "TensorRT engine, fp16", "trt-bf16": "TensorRT engine, bf16",
    ANALYTIC: "the analytic Gaussian model's closed-form score (FFTs, no network)",
    ENGINE: "the --engine file on its own backend",
}
PARTS = ("nfe", "overhead", "e2e", "samplers")
MODELS = ("gaussian", "builtin")

# Full runs are sized for a GPU; --quick is a smoke test of a minute or less on a CPU.
DEFAULTS = {"batch_sizes": [1, 8, 32], "warmup": 3, "repeats": 20, "speed_up": 10.0, "e2e_repeats": 3,
            "quality_samples": 256, "nfe": [20, 50, 100], "reference_limit": 2000}
QUICK = {"batch_sizes": [1, 8], "warmup": 1, "repeats": 3, "speed_up": 2.0, "e2e_repeats": 1,
         "quality_samples": 16, "nfe": [10, 20], "reference_limit": 200}
QUICK_FULL_STEPS = 40  # --quick's "full" step count: a smoke test, not the model's num_scales
QUICK_BACKENDS = ("eager", ANALYTIC, ENGINE)
# An end-to-end run may not be faster than its network calls by more than timing noise.
CONSISTENCY_SLACK = 1.25


# ----------------------------------------------------------------------------------------
# Settings: flags -> a checked, fully resolved BenchConfig.


@dataclass
class BenchConfig:
    """Everything `pds bench` was asked; None = the default (full or --quick)."""

    model: str | None = None
    checkpoint: Path | None = None
    config: Path | None = None
    preset: str | None = None
    random_weights: bool = False
    engine: Path | None = None
    engine_backend: str | None = None
    image_size: int | None = None
    channels: int | None = None
    trust_checkpoint: bool = False
    device: str = "auto"
    backends: list[str] | None = None
    batch_sizes: list[int] | None = None
    warmup: int | None = None
    repeats: int | None = None
    threads: int | None = None
    full_steps: int | None = None
    speed_up: float | None = None
    steps: int | None = None
    alpha: str = "5"
    masks: Path | None = None
    samplers: list[str] | None = None
    nfe: list[int] | None = None
    e2e_backend: str | None = None
    e2e_batch: int | None = None
    e2e_repeats: int | None = None
    quality_samples: int | None = None
    reference: Path | None = None
    reference_limit: int | None = None
    skip: list[str] = field(default_factory=list)
    seed: int = 0
    quick: bool = False
    cache_dir: Path | None = None
    command: str = ""

    def resolved(self) -> "BenchConfig":
        """A copy with the defaults filled in (--quick's where --quick is on) and every flag checked."""
        cfg = copy.copy(self)
        if cfg.steps is not None and cfg.speed_up is not None:
            raise PdsError("--steps and --speed-up exclude each other: give PDS's step count or the speed-up")
        table = QUICK if cfg.quick else DEFAULTS
        for name, value in table.items():
            if getattr(cfg, name) is None:
                setattr(cfg, name, copy.copy(value))
        if cfg.steps is not None:
            cfg.speed_up = None  # --steps names the PDS step count itself
        check_config(cfg)
        if cfg.e2e_batch is None:
            cfg.e2e_batch = max(cfg.batch_sizes)
        if cfg.e2e_batch not in cfg.batch_sizes:
            # The end-to-end run is checked against the per-NFE time at its own batch size.
            cfg.batch_sizes = sorted({*cfg.batch_sizes, cfg.e2e_batch})
        return cfg

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


def parse_ints(text: str | None, flag: str) -> list[int] | None:
    """"1,8,32" -> [1, 8, 32]; each at least 1, no repeats."""
    if text is None:
        return None
    try:
        values = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise PdsError(f"{flag} takes comma-separated whole numbers like 1,8,32, not {text!r}") from None
    if not values or min(values) < 1:
        raise PdsError(f"{flag} needs numbers of at least 1, got {text!r}")
    return sorted(set(values))


def parse_names(text: str | None, flag: str, known=None) -> list[str] | None:
    """"eager,onnx-cpu" -> ["eager", "onnx-cpu"] in the given order; `all` = every known name."""
    if text is None:
        return None
    names = [v.strip().lower() for v in str(text).split(",") if v.strip()]
    if not names:
        raise PdsError(f"{flag} needs at least one name")
    if known is not None:
        if names == ["all"]:
            return list(known)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise PdsError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def check_config(cfg: BenchConfig) -> None:
    """The cheap checks, before any model is loaded."""
    _check_model_flags(cfg)
    if cfg.warmup < 0 or cfg.repeats < 1 or cfg.e2e_repeats < 1:
        raise PdsError(f"--warmup must be >= 0 and --repeats/--e2e-repeats >= 1, got {cfg.warmup}, {cfg.repeats}, {cfg.e2e_repeats}")
    if cfg.threads is not None and cfg.threads < 1:
        raise PdsError(f"--threads must be at least 1, got {cfg.threads}")
    if cfg.steps is not None and cfg.steps < 1:
        raise PdsError(f"--steps must be at least 1, got {cfg.steps}")
    if cfg.speed_up is not None and not (math.isfinite(cfg.speed_up) and cfg.speed_up >= 1):
        raise PdsError(f"--speed-up must be at least 1, got {cfg.speed_up:g}")
    if cfg.full_steps is not None and cfg.full_steps < 1:
        raise PdsError(f"--full-steps must be at least 1, got {cfg.full_steps}")
    if cfg.e2e_batch is not None and cfg.e2e_batch < 1:
        raise PdsError(f"--e2e-batch must be at least 1, got {cfg.e2e_batch}")
    if cfg.quality_samples < 2 or cfg.reference_limit < 2:
        raise PdsError("--quality-samples and --reference-limit need at least 2 images (variances are measured)")
    bad = [p for p in cfg.skip if p not in PARTS]
    if bad:
        raise PdsError(f"--skip: unknown part {', '.join(map(repr, bad))}; choose from {', '.join(PARTS)}")
    if cfg.e2e_backend is not None and cfg.e2e_backend not in KNOWN_BACKENDS:
        raise PdsError(f"--e2e-backend must be one of {', '.join(KNOWN_BACKENDS)}, not {cfg.e2e_backend!r}")
    if cfg.samplers:
        from pdscli.samplers import get_sampler

        for name in cfg.samplers:
            get_sampler(name)  # unknown names fail here, listing the choices
    from pdscli.precondition.alpha import resolve_alpha
    from pdscli.settings import SamplingSettings

    # The value is checked now; "auto" is resolved per step count later.
    resolve_alpha(cfg.alpha, SamplingSettings(0.01, 1.0, 10, 0.1, 2, 1), 10)
    if cfg.reference is not None:
        from pdscli.images import image_files

        image_files(cfg.reference)  # a missing or empty folder fails before the model load
    if cfg.masks is not None and not Path(cfg.masks).is_file():
        raise PdsError(f"filter file {cfg.masks} does not exist")


def _check_model_flags(cfg: BenchConfig) -> None:
    given = [f for f, v in (("--checkpoint", cfg.checkpoint), ("--engine", cfg.engine), ("--model", cfg.model),
                            ("--random-weights", cfg.random_weights)) if v]
    if len(given) > 1:
        raise PdsError(f"choose one model: {' and '.join(given)} exclude each other")
    if cfg.model is not None and cfg.model not in MODELS:
        raise PdsError(f"--model must be one of {', '.join(MODELS)}, not {cfg.model!r}")
    if cfg.random_weights and not (cfg.preset or cfg.config):
        raise PdsError("--random-weights builds an architecture: pass --preset NAME or --config FILE")
    if (cfg.preset or cfg.config) and not (cfg.checkpoint or cfg.random_weights):
        raise PdsError("--config / --preset describe a --checkpoint, or an architecture with --random-weights")
    if cfg.engine_backend and not cfg.engine:
        raise PdsError("--engine-backend applies to --engine files only")
    if (cfg.image_size or cfg.channels) and cfg.model != "gaussian" and not cfg.engine:
        raise PdsError("--image-size / --channels apply to --model gaussian (or an --engine without metadata)")
    if cfg.reference is not None and cfg.model == "gaussian":
        raise PdsError("--reference is for network models: the analytic model's quality figure is exact already")


# ----------------------------------------------------------------------------------------
# Timing.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times: list[float]) -> dict:
    """Median, quartiles, IQR, min, max and mean of a list of seconds."""
    a = np.asarray(times, dtype=np.float64)
    q1, med, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {"median_s": med, "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "min_s": float(a.min()),
            "max_s": float(a.max()), "mean_s": float(a.mean()), "count": int(a.size)}


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> dict:
    """Warm up, then time `repeats` calls of fn one by one.

    CPU: perf_counter around each call (the result is ready when it returns). CUDA: an event
    pair on the current stream around each call, read after one synchronise at the end, so
    the host never stalls the queue; `wall_mean_s` (synchronised wall clock over all calls / n)
    is recorded beside it as a cross-check. The first warm-up call is timed on its own: it
    holds compilation, graph capture and lazy allocation, which the steady state does not."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    if device.type == "cuda":
        with torch.cuda.device(device):  # the events must live on the stream the calls run on
            times, wall = _time_cuda(fn, repeats, device)
        clock = "cuda-events"
    else:
        times, wall, clock = _time_cpu(fn, repeats), None, "perf_counter"
    out = {**summarize(times), "times_s": times, "clock": clock, "warmup": warmup, "first_call_s": first}
    if wall is not None:
        out["wall_mean_s"] = wall
    return out


def _time_cpu(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _time_cuda(fn, repeats: int, device: torch.device) -> tuple[list[float], float]:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    _sync(device)
    t0 = time.perf_counter()
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    _sync(device)
    wall = (time.perf_counter() - t0) / repeats
    return [start.elapsed_time(end) / 1e3 for start, end in pairs], wall


@contextlib.contextmanager
def torch_threads(n: int | None):
    """--threads for the run only (the process's setting is restored: tests share a process)."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def _finite_or_none(v):
    return float(v) if v is not None and math.isfinite(float(v)) else None


# ----------------------------------------------------------------------------------------
# The model under test.


@dataclass
class BenchModel:
    """What is benchmarked: `score` is the fp32 reference callable (eager, analytic or engine)."""

    kind: str  # "analytic" | "network" | "engine"
    score: Callable
    settings: object  # SamplingSettings
    device: torch.device
    name: str
    net: torch.nn.Module | None = None  # the fp32 NCSN++ (network kind)
    net_config: dict | None = None
    gaussian: object | None = None  # GaussianImageModel (analytic kind)
    identity: str = ""  # what cached exports are keyed on
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.settings.shape)


def default_model_name(cfg: BenchConfig) -> str | None:
    """No model flag: the built-in digits network (what `pds sample` uses too)."""
    if cfg.checkpoint or cfg.engine or cfg.random_weights or cfg.model:
        return cfg.model
    return "builtin"


def open_bench_model(cfg: BenchConfig, device: torch.device) -> BenchModel:
    model = default_model_name(cfg)
    if cfg.engine:
        return _open_engine(cfg, device)
    if model == "gaussian":
        return _open_gaussian(cfg, device)
    if model == "builtin":
        from pdscli.models import builtin

        return _network_from_checkpoint(builtin.WEIGHTS, builtin.CONFIG, None, False, device, name=builtin.NAME)
    if cfg.random_weights:
        return _open_random(cfg, device)
    return _network_from_checkpoint(cfg.checkpoint, cfg.config, cfg.preset, cfg.trust_checkpoint, device)


def _open_gaussian(cfg: BenchConfig, device: torch.device) -> BenchModel:
    from pdscli.evaluate.analytic import GaussianImageModel

    g = GaussianImageModel(cfg.image_size or 32, cfg.channels or 3, device=device)
    return BenchModel(ANALYTIC, g.score, g.settings, device, "gaussian", gaussian=g, identity="gaussian",
                      info={"description": g.describe()})


def _network_from_checkpoint(path, config, preset, trust, device, *, name=None) -> BenchModel:
    from pdscli.models.checkpoint import open_network

    return _network_model(open_network(path, config, preset, trust_checkpoint=trust, device=device), device, name)


def _open_random(cfg: BenchConfig, device: torch.device) -> BenchModel:
    from pdscli.models.checkpoint import open_network

    return _network_model(open_network(config=cfg.config, preset=cfg.preset, random_weights=True, seed=cfg.seed,
                                       device=device), device)


def _network_model(network, device: torch.device, name: str | None = None) -> BenchModel:
    """A BenchModel of a `pdscli.models.checkpoint.Network` (fp32, eager)."""
    from pdscli.engines.torch_engine import torch_score

    if network.checkpoint is not None:
        name = name or f"checkpoint:{network.checkpoint.name}"
        info = {"checkpoint": str(network.checkpoint), "sha256": network.sha256, "preset": network.preset,
                "config": network.config_label, "weights": network.weights}
    else:
        name = name or f"random:{network.stem.removesuffix('-random')}"
        info = {"preset": network.preset, "config": network.config_label,
                "weights": f"random (seed {network.seed}): an architecture benchmark, not a trained model"}
    return BenchModel("network", torch_score(network.net, device=device), network.settings, device, name,
                      net=network.net, net_config=network.config, identity=network.identity,
                      info={**info, "num_params": network.num_params})


def _open_engine(cfg: BenchConfig, device: torch.device) -> BenchModel:
    from pdscli.engines import open_engine

    shape = {"image_size": cfg.image_size, "num_channels": cfg.channels}
    sm = open_engine(cfg.engine, device=device, backend=cfg.engine_backend,
                     overrides={k: v for k, v in shape.items() if v is not None})
    return BenchModel(ENGINE, sm.score, sm.settings, device, sm.name, identity=(sm.sha256 or "")[:16],
                      info={"engine": str(cfg.engine), "sha256": sm.sha256, **sm.info})


# ----------------------------------------------------------------------------------------
# FLOPs.


def count_flops(model: BenchModel, batches: list[int]) -> dict:
    """Model FLOPs per network call at each batch size, counted by torch's FlopCounterMode on
    the meta device (no memory, no compute). It counts matmuls, convolutions and attention
    (2 FLOPs per multiply-add), not elementwise ops or normalisation: a slight undercount."""
    if model.net_config is None:
        why = ("the analytic score is FFTs, which FlopCounterMode does not count" if model.kind == ANALYTIC
               else "an engine file's FLOPs are not counted; bench its --checkpoint or --preset --random-weights")
        return {"per_call": None, "note": why}
    from torch.utils.flop_counter import FlopCounterMode

    from pdscli.models import build_model

    per_call, method = {}, "FlopCounterMode on the meta device"
    try:
        meta = build_model(model.net_config, device="meta").eval()
        for b in batches:
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                meta(torch.empty((b, *model.shape), device="meta"), torch.ones(b, device="meta"))
            per_call[b] = int(counter.get_total_flops())
    except Exception as e:  # a model the meta device cannot trace: count batch 1 for real and scale
        per_call, method = _flops_by_running(model, batches), f"FlopCounterMode at batch 1 on {model.device}, scaled ({_one_line(e)})"
    return {"per_call": per_call, "per_image": per_call[min(batches)] / min(batches), "method": method,
            "counts": "matmul, convolution and attention FLOPs (2 per multiply-add); elementwise ops not counted"}


def _flops_by_running(model: BenchModel, batches: list[int]) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    x, sigma = nfe_inputs(model.settings, 1, model.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.net(x, sigma)
    one = int(counter.get_total_flops())
    return {b: one * b for b in batches}


# ----------------------------------------------------------------------------------------
# Backends: which can run here, and the score callable of each.


def backend_plan(cfg: BenchConfig, model: BenchModel) -> list[tuple[str, str | None]]:
    """(name, None) for each backend to measure, (name, reason) for each one skipped.

    Default: every backend of the model's kind (the analytic model and an engine file have
    exactly one); --quick measures only the first of them and lists the rest as skipped."""
    default = cfg.backends is None
    names = cfg.backends if not default else {ANALYTIC: [ANALYTIC], ENGINE: [ENGINE]}.get(model.kind, list(NETWORK_BACKENDS))
    plan = []
    for name in names:
        reason = unavailable_reason(name, model)
        if reason is None and default:
            reason = _default_set_reason(name, model, cfg.quick)
        plan.append((name, reason))
    return plan


def _default_set_reason(name: str, model: BenchModel, quick: bool) -> str | None:
    """Why an available backend is still left out of the default set (naming it measures it)."""
    if quick and name not in QUICK_BACKENDS:
        return "not in --quick's default set (name it in --backends to measure it)"
    if name == "fp16" and model.device.type == "cpu":
        return ("fp16 is not a CPU deployment target: PyTorch runs its CPU convolutions on slow fallback "
                "kernels (name it in --backends to measure it anyway)")
    return None


def unavailable_reason(name: str, model: BenchModel) -> str | None:
    """Why backend `name` cannot run for this model on this device; None if it can."""
    if model.kind == ANALYTIC:
        return None if name == ANALYTIC else "the analytic model has no network"
    if model.kind == ENGINE:
        return None if name == ENGINE else ("an --engine file runs on its own backend; bench the network's "
                                             "--checkpoint (or --preset --random-weights) to compare backends")
    if name in (ANALYTIC, ENGINE):
        return f"`{name}` applies to {'--model gaussian' if name == ANALYTIC else '--engine'} only"
    return _device_reason(name, model.device)


def _device_reason(name: str, device: torch.device) -> str | None:
    cuda = device.type == "cuda"
    if name in ("eager", "fp16"):
        return None
    if name == "bf16":
        return None if not cuda or torch.cuda.is_bf16_supported() else "this GPU has no bfloat16 support"
    if name == "compile":
        if cuda:
            return None if importlib.util.find_spec("triton") else "torch.compile on CUDA needs triton (not installed)"
        return None if (shutil.which("cc") or shutil.which("g++") or shutil.which("clang")) else \
            "torch.compile on the CPU needs a C++ compiler (none found)"
    if name == "cuda-graph":
        return None if cuda else f"CUDA graphs need --device cuda (this run is on {device})"
    if name.startswith("onnx-"):
        return _onnx_reason(name, device)
    if name.startswith("trt-"):
        if not cuda:
            return f"TensorRT engines need --device cuda (this run is on {device})"
        return None if importlib.util.find_spec("tensorrt") else 'TensorRT is not installed (pip install "pds[trt]")'
    return f"unknown backend {name!r}"


ORT_PROVIDERS = {"onnx-cpu": "CPUExecutionProvider", "onnx-cuda": "CUDAExecutionProvider",
                 "onnx-trt": "TensorrtExecutionProvider"}


def _onnx_reason(name: str, device: torch.device) -> str | None:
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed"
    want_cpu = name == "onnx-cpu"
    if want_cpu != (device.type == "cpu"):
        return f"{name} runs on the {'CPU' if want_cpu else 'GPU'}; this run is on {device}"
    import onnxruntime

    if ORT_PROVIDERS[name] not in onnxruntime.get_available_providers():
        return f"this onnxruntime ({onnxruntime.__version__}) has no {ORT_PROVIDERS[name]}"
    return None


class ExportCache:
    """Where exported ONNX files and TensorRT engines live: --cache-dir (kept, reused by the next
    bench of the same model), else a temporary folder removed at the end."""

    def __init__(self, folder: Path | None):
        self._tmp = None
        if folder is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pds-bench-")
            folder = Path(self._tmp.name)
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PdsError(f"cannot create --cache-dir {self.folder}: {e.strerror}") from None

    def onnx_bytes(self, model: BenchModel, precision: str) -> tuple[bytes, bool]:
        """The model's ONNX graph at `precision` (exported once per identity); (bytes, reused)."""
        from pdscli.engines.onnx_export import export_metadata, export_onnx
        from pdscli.fsutil import atomic_write_bytes

        path = self.folder / f"{model.identity}-{precision}.onnx"
        if path.is_file():
            return path.read_bytes(), True
        # The parity check is skipped here: the bench measures every backend's error itself.
        meta = export_metadata(model.settings, precision=precision, preset=model.info.get("preset"),
                               checkpoint_sha256=model.info.get("sha256"))
        # A copy, exported on the CPU: export_onnx moves the module it is given, and the original
        # must stay where the other backends run it.
        data = export_onnx(copy.deepcopy(model.net).cpu().eval(), model.settings, precision=precision,
                           metadata=meta, check=False).data
        atomic_write_bytes(path, data)
        return data, False

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


class Backend:
    """One backend's score callable(s). Most serve every batch size with one callable; a CUDA
    graph is captured per batch size."""

    def __init__(self, name: str, make: Callable[[int], Callable], info: dict, per_batch: bool = False):
        self.name, self.info, self._make, self._per_batch = name, info, make, per_batch
        self._scores: dict[int, Callable] = {}

    def score_for(self, batch: int) -> Callable:
        key = batch if self._per_batch else 0
        if key not in self._scores:
            self._scores[key] = self._make(batch)
        return self._scores[key]


def make_backend(name: str, model: BenchModel, cache: ExportCache, threads: int | None, batches: list[int]) -> Backend:
    """The backend called `name` (availability was checked by `unavailable_reason`)."""
    from pdscli.engines.torch_engine import torch_score
    from pdscli.engines.onnx_export import at_precision

    info = {"description": BACKEND_HELP[name]}
    if name == ENGINE and str(model.info.get("engine", "")).lower().endswith(".onnx"):
        # open_engine makes its own session: --threads sets torch's threads, not this one's.
        info["intra_op_threads"] = "onnxruntime default (--threads does not reach an --engine session)"
    if name in (ANALYTIC, ENGINE, "eager"):
        return Backend(name, lambda b: model.score, {**info, "precision": "fp32" if name != ENGINE else model.info.get("precision")})
    if name in ("bf16", "fp16"):
        low = at_precision(model.net, name)
        score = torch_score(low, device=model.device)
        return Backend(name, lambda b: score, {**info, "precision": name})
    if name == "compile":
        score = torch_score(model.net, device=model.device, compile=True)
        return Backend(name, lambda b: score, {**info, "precision": "fp32", "note": "first call per batch size compiles"})
    if name == "cuda-graph":
        def make(b):
            return torch_score(model.net, device=model.device, cuda_graph=True, batch_size=b, shape=model.shape)
        return Backend(name, make, {**info, "precision": "fp32"}, per_batch=True)
    if name.startswith("onnx-"):
        return _onnx_backend(name, model, cache, threads, info)
    return _trt_backend(name, model, cache, batches, info)


def _onnx_backend(name, model, cache, threads, info) -> Backend:
    from pdscli.engines.onnx_engine import OnnxScore, choose_providers, create_session

    data, reused = cache.onnx_bytes(model, "fp32")
    backend_flag = {"onnx-cpu": "cpu", "onnx-cuda": "cuda", "onnx-trt": "tensorrt"}[name]
    providers = choose_providers(model.device, backend_flag, cache_dir=cache.folder / "ort-trt-cache")
    session = create_session(data, providers, threads=threads, label=f"the {name} graph")
    score = OnnxScore(session, model.device)
    return Backend(name, lambda b: score, {**info, "precision": "fp32", "provider": score.provider,
                                           "onnx_reused_from_cache": reused,
                                           "intra_op_threads": threads or "onnxruntime default"})


def _trt_backend(name, model, cache, batches, info) -> Backend:
    from pdscli.engines.tensorrt_engine import build_engine, open_trt
    from pdscli.engines.onnx_export import export_metadata

    precision = name.split("-", 1)[1]
    data, _ = cache.onnx_bytes(model, precision)
    profile = (min(batches), max(batches), max(batches))
    path = cache.folder / f"{model.identity}-{precision}-b{profile[0]}-{profile[2]}.plan"
    meta = export_metadata(model.settings, precision=precision, preset=model.info.get("preset"),
                           checkpoint_sha256=model.info.get("sha256"))
    _, cached = build_engine(data, path, precision=precision, profile=profile, chw=model.shape, metadata=meta,
                             device=model.device, force=True)
    sm = open_trt(path, device=model.device, precision=precision)
    return Backend(name, lambda b: sm.score, {**info, "precision": precision, "profile": list(profile),
                                              "engine_reused_from_cache": cached})


# ----------------------------------------------------------------------------------------
# Part 1: per-NFE latency.


def nfe_inputs(settings, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as a sampler sees it: x = data-like [0, 1] values + sigma z, sigmas log-spaced
    from sigma_min to sigma_max across the batch (a network's cost does not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(settings.sigma_min), math.log(settings.sigma_max)
    sigma = torch.exp(torch.linspace(hi, lo, batch, dtype=torch.float64)).float()
    x = torch.rand((batch, *settings.shape), generator=g) + sigma[:, None, None, None] * torch.randn(
        (batch, *settings.shape), generator=g)
    return x.to(device), sigma.to(device)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| over the batch: how far a backend is from eager fp32."""
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu()
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    return err / scale if scale > 0 else err


def measure_backend(backend: Backend, model: BenchModel, cfg: BenchConfig, flops: dict, refs: dict) -> list[dict]:
    rows = []
    for b in cfg.batch_sizes:
        x, sigma = nfe_inputs(model.settings, b, model.device, cfg.seed)
        score = backend.score_for(b)
        with torch.no_grad():
            stats = time_calls(lambda: score(x, sigma), warmup=cfg.warmup, repeats=cfg.repeats, device=model.device)
            out = score(x, sigma)
        row = {"batch": b, **stats, "per_image_s": stats["median_s"] / b, "images_per_s": b / stats["median_s"],
               "nfe_per_s": 1.0 / stats["median_s"], "finite": bool(torch.isfinite(out).all())}
        if model.kind == "network" and b in refs:
            row["max_rel_err_vs_eager_fp32"] = relative_error(out, refs[b])
        per_call = (flops.get("per_call") or {}).get(b)
        if per_call:
            row["flops_per_call"] = per_call
            row["achieved_flops_per_s"] = per_call / stats["median_s"]
        rows.append(row)
    return rows


def reference_outputs(model: BenchModel, cfg: BenchConfig) -> dict:
    """Eager fp32 outputs on each batch's inputs: what every backend is compared with. TF32 is
    off here (on a GPU it is on by default for convolutions): the reference is true fp32, so
    eager's own TF32 error shows in its row instead of hiding in everyone else's."""
    from pdscli.engines.parity import exact_fp32

    if model.kind != "network":
        return {}
    refs = {}
    with torch.no_grad(), exact_fp32():
        for b in cfg.batch_sizes:
            x, sigma = nfe_inputs(model.settings, b, model.device, cfg.seed)
            refs[b] = model.score(x, sigma).cpu()
    return refs


def run_backends(cfg: BenchConfig, model: BenchModel, flops: dict, cache: ExportCache, log) -> tuple[list[dict], dict]:
    """Measure every planned backend; returns (report entries, {name: Backend} kept for the e2e run)."""
    entries, kept = [], {}
    refs = reference_outputs(model, cfg)
    keep = e2e_backend_name(cfg, model, [n for n, r in backend_plan(cfg, model) if r is None])
    for name, reason in backend_plan(cfg, model):
        if reason is not None:
            entries.append({"name": name, "status": "skipped", "reason": reason})
            continue
        log(f"measuring {name} at batch {', '.join(map(str, cfg.batch_sizes))} ...")
        entry = _measure_one(name, cfg, model, flops, cache, refs)
        entries.append(entry.pop("_entry"))
        if entry.get("backend") is not None and name == keep:
            kept[name] = entry["backend"]
        _release(model.device)
    return entries, kept


def _measure_one(name, cfg, model, flops, cache, refs) -> dict:
    t0 = time.perf_counter()
    try:
        backend = make_backend(name, model, cache, cfg.threads, cfg.batch_sizes)
        setup = time.perf_counter() - t0
        rows = measure_backend(backend, model, cfg, flops, refs)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # one backend failing (a missing library, a compiler error) must not end the bench
        return {"_entry": {"name": name, "status": "failed", "reason": _one_line(e)}}
    entry = {"name": name, "status": "ok", **backend.info, "setup_s": setup, "batches": rows}
    return {"_entry": entry, "backend": backend}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def add_speed_ratios(entries: list[dict]) -> None:
    """Each row's speed against eager fp32 (or the analytic / engine baseline) at the same batch."""
    ok = [e for e in entries if e["status"] == "ok"]
    base = next((e for e in ok if e["name"] in ("eager", ANALYTIC, ENGINE)), None)
    if base is None:
        return
    base_rows = {r["batch"]: r["median_s"] for r in base["batches"]}
    for e in ok:
        for r in e["batches"]:
            if r["batch"] in base_rows:
                r[f"speedup_vs_{base['name']}"] = base_rows[r["batch"]] / r["median_s"]


def nfe_median(entries: list[dict], backend: str, batch: int) -> float | None:
    for e in entries:
        if e["name"] == backend and e["status"] == "ok":
            for r in e["batches"]:
                if r["batch"] == batch:
                    return r["median_s"]
    return None


def fastest_nfe(entries: list[dict], batch: int) -> tuple[str, float] | None:
    best = [(e["name"], r["median_s"]) for e in entries if e["status"] == "ok" for r in e["batches"]
            if r["batch"] == batch]
    return min(best, key=lambda t: t[1]) if best else None


# ----------------------------------------------------------------------------------------
# The preconditioner PDS runs with, and part 2: its cost per score evaluation.


def load_reference(cfg: BenchConfig, model: BenchModel) -> torch.Tensor:
    """Up to --reference-limit images of --reference at the model's size: float64 [N, C, H, W]
    in [0, 1], read as `pds filters` reads them (centre square crop, resize)."""
    from pdscli.images import image_files
    from pdscli.images import load_image

    files = image_files(cfg.reference)[: cfg.reference_limit]
    c, size, _ = model.shape
    if c not in (1, 3):
        raise PdsError(f"--reference needs a 1- or 3-channel model, this one has {c} channels")
    images = []
    for path in files:
        try:
            images.append(load_image(path, size=size, channels=c))
        except Exception as e:  # Pillow raises many types for a broken file
            raise PdsError(f"cannot read reference image {path}: {_one_line(e)}") from None
    if len(images) < 2:
        raise PdsError(f"--reference {cfg.reference} holds {len(images)} image; the statistic needs at least 2")
    return torch.from_numpy(np.stack(images)).double()


def reference_images(cfg: BenchConfig, model: BenchModel) -> tuple[torch.Tensor | None, str | None]:
    """(images, where from): --reference; for the built-in model, the digits it was trained on
    (scikit-learn's, shipped with it: no download); else (None, None)."""
    if cfg.reference is not None:
        return load_reference(cfg, model), f"--reference {cfg.reference}"
    if not _is_builtin(model):
        return None, None
    from pdscli.train.datasets import load_digits

    try:
        images = load_digits(size=model.shape[1], channels=model.shape[0])
    except PdsError:  # scikit-learn missing: no quality figure rather than no bench
        return None, None
    return images[: cfg.reference_limit].double(), "the built-in model's training data (scikit-learn digits)"


def bench_filters(cfg: BenchConfig, model: BenchModel, reference: torch.Tensor | None):
    """(Filters, info): --masks; the analytic model's exact spectrum; the built-in model's own;
    statistics of --reference; else a synthetic natural-image spectrum, which times PDS
    exactly as real filters would (the cost does not depend on the values) but makes no
    meaningful images."""
    from pdscli.precondition import compute_statistics, load_filters
    from pdscli.sample.run import check_filters_fit

    c, size, _ = model.shape
    if cfg.masks is not None:
        filters, source, meaningful = load_filters(cfg.masks), f"--masks {cfg.masks}", True
    elif model.kind == ANALYTIC:
        filters, source, meaningful = _spectrum_filters(model.gaussian), "the analytic model's exact spectrum", True
    elif _is_builtin(model):
        from pdscli.models import builtin

        filters, source, meaningful = builtin.default_filters(), "the built-in model's own filters", True
    elif reference is not None:
        filters = compute_statistics([reference.clamp(0, 1)], source=str(cfg.reference))
        source, meaningful = f"statistics of {len(reference)} --reference images", True
    else:
        from pdscli.evaluate.analytic import GaussianImageModel

        filters = _spectrum_filters(GaussianImageModel(size, c))
        source, meaningful = "synthetic 1/f^2 spectrum (no --masks or --reference): right cost, images not meaningful", False
    check_filters_fit(filters, model.settings)
    return filters, {"source": source, "kinds": filters.kinds, "images_meaningful": meaningful}


def _is_builtin(model: BenchModel) -> bool:
    try:
        from pdscli.models import builtin
    except ImportError:
        return False
    return model.name == builtin.NAME and builtin.FILTERS.is_file()


def _spectrum_filters(g):
    """Frequency and space statistics of a stationary Gaussian model, exactly: the frequency
    one from its spectrum, the space one flat (mean^2 + std^2 in every pixel), which gives the
    identity space filter the data calls for, while PDS still pays for applying it."""
    from pdscli.precondition.alpha import expected_freq_statistic
    from pdscli.precondition import Filters

    freq = expected_freq_statistic(g).astype(np.float32)
    space = np.full(g.shape, g.mean**2 + g.std**2, dtype=np.float32)
    return Filters(freq, space, size=g.image_size, channels=g.channels, source="exact spectrum of the analytic model")


class PreconditionerCache:
    """One Preconditioner per alpha (--alpha auto gives each step count its own)."""

    def __init__(self, filters, alpha_flag: str, settings, device):
        self.filters, self.alpha_flag, self.settings, self.device = filters, alpha_flag, settings, device
        self._made: dict[float, object] = {}

    def alpha(self, n_steps: int) -> float:
        from pdscli.precondition.alpha import resolve_alpha

        return resolve_alpha(self.alpha_flag, self.settings, n_steps)

    def for_steps(self, n_steps: int):
        from pdscli.precondition import Preconditioner

        a = self.alpha(n_steps)
        if a not in self._made:
            self._made[a] = Preconditioner.from_filters(self.filters, a, self.device)
        return self._made[a]


def measure_overhead(cfg: BenchConfig, model: BenchModel, precond, entries: list[dict], e2e_name: str | None) -> dict:
    """The preconditioner's cost per score evaluation, against one NFE of each backend.

    Each PC / PDS update (corrector or predictor) evaluates the score once and applies
    M M^T to it and M to one fresh draw, so (noise + grad) per NFE is exactly what PDS adds."""
    rows = []
    for b in cfg.batch_sizes:
        z = torch.randn((b, *model.shape), generator=torch.Generator().manual_seed(cfg.seed)).to(model.device)
        with torch.no_grad():
            noise = time_calls(lambda: precond.noise(z), warmup=cfg.warmup, repeats=cfg.repeats, device=model.device)
            grad = time_calls(lambda: precond.grad(z), warmup=cfg.warmup, repeats=cfg.repeats, device=model.device)
        per_nfe = noise["median_s"] + grad["median_s"]
        fractions = {e["name"]: per_nfe / m for e in entries if (m := nfe_median(entries, e["name"], b))}
        fastest = fastest_nfe(entries, b)
        rows.append({"batch": b, "noise": noise, "grad": grad, "per_nfe_s": per_nfe, "per_pc_step_s": 2 * per_nfe,
                     "fraction_of_nfe": fractions,
                     "fraction_of_e2e_backend_nfe": fractions.get(e2e_name),
                     "fraction_of_fastest_nfe": per_nfe / fastest[1] if fastest else None,
                     "fastest_backend": fastest[0] if fastest else None})
    return {"status": "ok", "preconditioner": precond.describe(), "batches": rows,
            "what": "per NFE: one M z (noise) and one M M^T g (grad); a PC/PDS step makes 2 NFEs and 2 of each"}


# ----------------------------------------------------------------------------------------
# Quality: the exact figure on the analytic model, the reference statistic on a network.


class ExactQuality:
    """Spectral KL to the analytic model's exact spectrum (pdscli.evaluate.analytic, docs/exactness.md)."""

    metric = "spectral_kl"
    description = ("mean over all Fourier coefficients of KL(N(0, v_hat) || N(0, lam)): the samples' per-frequency "
                   "variance against the exact one (0 = exact; the floor is what exact samples of the same count score)")

    def __init__(self, gaussian, seed: int = 0):
        self.g, self.seed, self._floors = gaussian, seed, {}

    def measure(self, x: torch.Tensor) -> dict:
        x = x.to(torch.float32)
        value = self.g.spectral_kl(x)
        high = float(self.g.variance_ratio_by_band(x, 4)[-1])
        return {"metric": self.metric, "value": _finite_or_none(value), "high_band_variance_ratio": _finite_or_none(high),
                "samples": int(x.shape[0]), "floor": self.floor(int(x.shape[0]))}

    def floor(self, n: int) -> float:
        if n not in self._floors:
            exact = self.g.sample(n, torch.Generator(device=self.g.device).manual_seed(10_000 + self.seed))
            self._floors[n] = float(self.g.spectral_kl(exact))
        return self._floors[n]


class ReferenceQuality:
    """Spectral KL against a folder of reference images, in radial frequency bands.

    With mu the reference's mean image and F the orthonormal 2-D DFT, the power of a set of
    images in band b of channel c is P[c, b] = mean over images and coefficients of band b of
    |F(x - mu)|^2. The statistic is the mean over (c, b) of 1/2 (r - 1 - ln r), r = P_gen / P_ref:
    the analytic model's exactness figure with the reference's measured spectrum in place of
    the exact one. It sees second-order statistics only (too much or too little energy per
    frequency band, a brightness or colour shift through the DC band): the leftover noise or
    over-smoothing of too few steps. It is blind to structure, phase and content."""

    metric = "spectral_kl_vs_reference"
    description = ("mean over channels and 8 radial frequency bands of KL between the generated and the reference "
                   "power per band (second-order statistics only; not FID); the floor is what as many held-out "
                   "reference images score against the rest")
    BANDS = 8

    def __init__(self, images: torch.Tensor, seed: int = 0):
        self.images, self.seed, self._floors = images, seed, {}
        self.mean = images.mean(dim=0)
        size = images.shape[-1]
        f = torch.fft.fftfreq(size, dtype=torch.float64)
        radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
        self.band = torch.clamp((radius / 0.5 * self.BANDS).floor().long(), max=self.BANDS - 1)
        self.ref_power = self.band_power(images)

    def band_power(self, x: torch.Tensor) -> torch.Tensor:
        """[C, BANDS] mean power of x - mu per radial band."""
        coeff = torch.fft.fft2(x.double() - self.mean, norm="ortho")
        power = (coeff.abs() ** 2).mean(dim=0)  # [C, H, W]
        flat_band = self.band.reshape(-1)
        out = torch.zeros(power.shape[0], self.BANDS, dtype=torch.float64)
        out.index_add_(1, flat_band, power.reshape(power.shape[0], -1))
        return out / torch.bincount(flat_band, minlength=self.BANDS).double()

    def _kl(self, power: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
        r = power / ref
        return float((0.5 * (r - 1 - torch.log(r))).mean()), float(r[:, -1].mean())

    def measure(self, x: torch.Tensor) -> dict:
        # Clipped to [0, 1] as saved images are: the reference images live there too.
        value, high = self._kl(self.band_power(x.detach().cpu().clamp(0, 1)), self.ref_power)
        return {"metric": self.metric, "value": _finite_or_none(value), "high_band_variance_ratio": _finite_or_none(high),
                "samples": int(x.shape[0]), "floor": self.floor(int(x.shape[0]))}

    def floor(self, n: int) -> float | None:
        """n held-out reference images against the rest (None when there are too few to split)."""
        if n not in self._floors:
            total = self.images.shape[0]
            if total < n + 2:
                self._floors[n] = None
            else:
                order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))
                held, rest = self.images[order[:n]], self.images[order[n:]]
                self._floors[n] = self._kl(self.band_power(held), self.band_power(rest))[0]
        return self._floors[n]


def make_quality(model: BenchModel, reference: torch.Tensor | None, seed: int):
    if model.kind == ANALYTIC:
        return ExactQuality(model.gaussian, seed)
    if reference is not None:
        return ReferenceQuality(reference, seed)
    return None


# ----------------------------------------------------------------------------------------
# Sampling runs: part 3 (end to end) and part 4 (samplers at equal NFE).


class SamplingRun:
    """One sampler configuration, run batch by batch: samples of indices 0..count-1 (so every
    configuration sees the same noise), each full batch timed (synchronised wall clock around
    the sampler call: network, sampler arithmetic and noise draws together)."""

    def __init__(self, score, sampler: str, steps, precond, *, cfg: BenchConfig, model: BenchModel):
        from pdscli.samplers import get_sampler

        self.fn, self.counting, self.steps, self.precond = get_sampler(sampler), CountingScore(score), steps, precond
        self.cfg, self.model = cfg, model
        self.times, self.outs, self.batches = [], [], 0

    def run_batch(self, start: int, count: int) -> None:
        from pdscli.noise import SampleNoise

        batch, model = self.cfg.e2e_batch, self.model
        noise = SampleNoise(self.cfg.seed, range(start, min(count, start + batch)), model.shape, model.device)
        _sync(model.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = self.fn(self.counting, noise, self.steps, precond=self.precond, snr=model.settings.snr)
        _sync(model.device)
        if len(noise) == batch:
            self.times.append(time.perf_counter() - t0)
        self.outs.append(x.detach().cpu())
        self.batches += 1

    def result(self) -> dict:
        samples = torch.cat(self.outs)
        return {"timing": {**summarize(self.times), "times_s": self.times}, "nfe": self.counting.calls // self.batches,
                "samples": samples, "finite": bool(torch.isfinite(samples).all())}


def run_interleaved(runs: list[SamplingRun], count: int, batch: int) -> list[dict]:
    """Batch k of every run, then batch k + 1 of every run, ...: a change in the machine's load
    (a shared machine) then falls on all the runs compared, not on whichever ran last."""
    for start in range(0, count, batch):
        for run in runs:
            run.run_batch(start, count)
    return [run.result() for run in runs]


def _run_record(label: str, sampler: str, steps, schedule: str, result: dict, cfg: BenchConfig, quality,
                alpha: float | None) -> dict:
    t = result["timing"]
    return {"label": label, "sampler": sampler, "steps": len(steps), "schedule": schedule, "nfe": result["nfe"],
            "alpha": alpha, "batch": cfg.e2e_batch, "timing": t, "per_image_s": t["median_s"] / cfg.e2e_batch,
            "images_per_s": cfg.e2e_batch / t["median_s"], "finite": result["finite"],
            "quality": quality.measure(result["samples"]) if quality is not None else None}


def full_and_pds_steps(cfg: BenchConfig, settings) -> tuple[int, int]:
    """(vanilla steps, PDS steps): the model's num_scales (--quick: at most 20) and 1/k of it, or --steps."""
    full = cfg.full_steps or (min(settings.num_scales, QUICK_FULL_STEPS) if cfg.quick else settings.num_scales)
    pds = cfg.steps if cfg.steps is not None else int(full / cfg.speed_up)
    if pds < 1:
        raise PdsError(f"--speed-up {cfg.speed_up:g} leaves no step of {full}")
    return full, pds


def sample_count(cfg: BenchConfig, quality) -> int:
    return max(cfg.e2e_batch * cfg.e2e_repeats, cfg.quality_samples if quality is not None else 0)


def run_end_to_end(cfg: BenchConfig, model: BenchModel, score, preconds: PreconditionerCache, quality, log) -> dict:
    """Vanilla PC at the full step count and PDS at 1/k of it, same backend, batch and noise."""
    from pdscli.samplers import pc_steps

    full, n_pds = full_and_pds_steps(cfg, model.settings)
    count = sample_count(cfg, quality)
    grids = {"vanilla": pc_steps(model.settings, full), "pds": pc_steps(model.settings, n_pds)}
    runs = [SamplingRun(score, "pc", grids["vanilla"], None, cfg=cfg, model=model),
            SamplingRun(score, "pds", grids["pds"], preconds.for_steps(n_pds), cfg=cfg, model=model)]
    log(f"end to end: vanilla pc at {full} steps and PDS at {n_pds}, {count} images each in batches of "
        f"{cfg.e2e_batch}, interleaved ...")
    results = run_interleaved(runs, count, cfg.e2e_batch)
    vanilla = _run_record("vanilla", "pc", grids["vanilla"], "pc", results[0], cfg, quality, None)
    pds = _run_record("pds", "pds", grids["pds"], "pc", results[1], cfg, quality, preconds.alpha(n_pds))
    runs = [vanilla, pds]
    return {"status": "ok", "batch": cfg.e2e_batch, "samples": count, "runs": runs,
            "speedup": vanilla["timing"]["median_s"] / pds["timing"]["median_s"],
            "nfe_ratio": vanilla["nfe"] / pds["nfe"], "full_steps": full, "pds_steps": n_pds}


def steps_for_budget(sampler: str, budget: int) -> int:
    """The most steps whose NFE count fits `budget` (1 NFE per step when the sampler does not say)."""
    from pdscli.samplers import nfe_count

    n = budget
    while n > 1 and (nfe_count(sampler, n) or n) > budget:
        n -= 1
    return n


def run_samplers(cfg: BenchConfig, model: BenchModel, score, preconds: PreconditionerCache, quality, log) -> dict:
    """Each --samplers entry at each --nfe budget: steps = the most that fit the budget, on the
    sampler's own default grid (pc for the PC family, geometric for the accelerated ones); all
    configurations interleaved batch by batch."""
    from pdscli.sample.run import build_steps

    count, rows, planned = sample_count(cfg, quality), [], []
    for name in cfg.samplers:
        for budget in cfg.nfe:
            n = steps_for_budget(name, budget)
            try:
                steps, schedule = build_steps(model.settings, steps=n, speed_up=None, sampler=name)
            except PdsError as e:
                rows.append({"sampler": name, "nfe_budget": budget, "steps": n, "status": "skipped", "reason": str(e)})
                continue
            precond, alpha = (preconds.for_steps(n), preconds.alpha(n)) if name == "pds" else (None, None)
            rows.append({"sampler": name, "nfe_budget": budget, "status": "ok"})
            planned.append((rows[-1], steps, schedule, alpha, SamplingRun(score, name, steps, precond, cfg=cfg, model=model)))
    log(f"samplers: {len(planned)} configurations, {count} images each in batches of {cfg.e2e_batch}, interleaved ...")
    results = run_interleaved([p[-1] for p in planned], count, cfg.e2e_batch)
    for (row, steps, schedule, alpha, _), result in zip(planned, results):
        row.update(_run_record(row["sampler"], row["sampler"], steps, schedule, result, cfg, quality, alpha))
    return {"status": "ok", "batch": cfg.e2e_batch, "samples": count, "rows": rows}


# ----------------------------------------------------------------------------------------
# The whole run.


def e2e_backend_name(cfg: BenchConfig, model: BenchModel, ok: list[str]) -> str | None:
    """--e2e-backend, else the baseline (eager / analytic / engine) when it ran, else the first that ran."""
    if cfg.e2e_backend is not None:
        return cfg.e2e_backend
    base = {ANALYTIC: ANALYTIC, ENGINE: ENGINE}.get(model.kind, "eager")
    return base if base in ok or not ok else ok[0]


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda s: None) -> dict:
    """Run every requested part; returns the report (JSON-ready: plain dicts, lists, numbers)."""
    from pdscli.devices import resolve_device

    cfg = cfg.resolved()
    device = resolve_device(cfg.device)
    cache = ExportCache(cfg.cache_dir)
    try:
        with torch_threads(cfg.threads):
            return _run(cfg, device, cache, log)
    finally:
        cache.close()


def _run(cfg: BenchConfig, device: torch.device, cache: ExportCache, log) -> dict:
    from pdscli.machine import describe_machine, load_average

    started = time.perf_counter()
    machine = describe_machine(device)
    log("loading the model ...")
    model = open_bench_model(cfg, device)
    reference, reference_source = reference_images(cfg, model)
    quality = make_quality(model, reference, cfg.seed)
    flops = count_flops(model, cfg.batch_sizes)
    report = _report_head(cfg, model, machine, flops, quality)
    report["quality"]["reference"] = reference_source

    entries, kept = run_backends(cfg, model, flops, cache, log) if "nfe" not in cfg.skip else ([], {})
    add_speed_ratios(entries)
    report["backends"] = entries
    ok = [e["name"] for e in entries if e["status"] == "ok"]
    e2e_name = e2e_backend_name(cfg, model, ok)
    filters, filters_info = bench_filters(cfg, model, reference)
    preconds = PreconditionerCache(filters, cfg.alpha, model.settings, device)
    report["filters"] = filters_info

    report["pds_overhead"] = _part("overhead", cfg, lambda: measure_overhead(
        cfg, model, preconds.for_steps(full_and_pds_steps(cfg, model.settings)[1]), entries, e2e_name))
    sampling = "e2e" not in cfg.skip or (cfg.samplers and "samplers" not in cfg.skip)
    score, why = _e2e_score(cfg, model, e2e_name, kept, cache) if sampling else (None, "")
    for key, part, fn in (("end_to_end", "e2e", run_end_to_end), ("samplers", "samplers", run_samplers)):
        if part == "samplers" and not cfg.samplers:
            report[key] = {"status": "skipped", "reason": "no --samplers given"}
        elif score is None and part not in cfg.skip:
            report[key] = {"status": "skipped", "reason": why}
        else:
            report[key] = _part(part, cfg, lambda fn=fn: {"backend": e2e_name, **fn(cfg, model, score, preconds, quality, log)})
    machine["load_average_end"] = load_average()
    report["warnings"] = consistency_warnings(report)
    report["elapsed_s"] = time.perf_counter() - started
    return report


def _part(name: str, cfg: BenchConfig, fn: Callable[[], dict]) -> dict:
    return {"status": "skipped", "reason": f"--skip {name}"} if name in cfg.skip else fn()


def _e2e_score(cfg, model, name, kept, cache) -> tuple[Callable | None, str]:
    """The score callable the sampling runs use: the measured backend object when it was kept
    (already warm), else a fresh one. (None, why) when there is none."""
    if name is None:
        return None, "no backend ran"
    if name in kept:
        return kept[name].score_for(cfg.e2e_batch), ""
    reason = unavailable_reason(name, model)
    if reason is not None:
        return None, f"--e2e-backend {name}: {reason}"
    try:
        backend = make_backend(name, model, cache, cfg.threads, cfg.batch_sizes)
        score = backend.score_for(cfg.e2e_batch)
        x, sigma = nfe_inputs(model.settings, cfg.e2e_batch, model.device, cfg.seed)
        with torch.no_grad():
            score(x, sigma)  # warm: compilation or capture must not land in the first timed run
    except KeyboardInterrupt:
        raise
    except Exception as e:
        return None, f"backend {name} failed: {_one_line(e)}"
    return score, ""


def _report_head(cfg: BenchConfig, model: BenchModel, machine: dict, flops: dict, quality) -> dict:
    return {
        "format": FORMAT,
        "pds_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": cfg.command,
        "machine": machine,
        "settings": {**cfg.to_dict(), "device": str(model.device), "torch_threads": torch.get_num_threads(),
                     "per_sample_step": False, "snr": model.settings.snr, **_precision_flags(model.device)},
        "model": {"name": model.name, "kind": model.kind, "shape": list(model.shape),
                  "sampling_settings": model.settings.to_dict(), **model.info},
        "flops": {k: ({str(b): v for b, v in val.items()} if isinstance(val, dict) else val) for k, val in flops.items()},
        "quality": {"metric": quality.metric, "description": quality.description} if quality is not None else
                   {"metric": None, "description": "no quality figure: a network model needs --reference DIR"},
    }


def _precision_flags(device: torch.device) -> dict:
    """TF32 silently changes what "fp32" means on Ampere and later: record it."""
    if device.type != "cuda":
        return {}
    return {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32, "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def consistency_warnings(report: dict) -> list[str]:
    """What a reader must know before trusting the figures: a loaded machine, a backend that
    computes something else, a run faster than its own network calls (timing noise)."""
    from pdscli.engines.parity import TOLERANCES

    warnings = []
    load, cores = report["machine"].get("load_average"), report["machine"].get("usable_cores") or 1
    timed = any(e["status"] == "ok" for e in report.get("backends", [])) or any(
        report.get(k, {}).get("status") == "ok" for k in ("pds_overhead", "end_to_end", "samplers"))
    if timed and load and load[0] > 0.75 * cores:
        warnings.append(f"the machine was busy (load average {load[0]:g} on {cores} cores): CPU timings are slower "
                        "and noisier than on an idle machine")
    for e in report.get("backends", []):
        for r in e.get("batches", []):
            err = r.get("max_rel_err_vs_eager_fp32")
            tol = TOLERANCES.get(e.get("precision") or "fp32", 1e-4) * 10
            if err is not None and err > tol:
                warnings.append(f"{e['name']} at batch {r['batch']} differs from eager fp32 by {err:.2g} (relative)")
            if not r.get("finite", True):
                warnings.append(f"{e['name']} at batch {r['batch']} returned NaN/Inf")
    warnings += _e2e_warnings(report)
    return warnings


def _e2e_warnings(report: dict) -> list[str]:
    e2e, out = report.get("end_to_end", {}), []
    if e2e.get("status") != "ok":
        return out
    per_nfe = nfe_median(report.get("backends", []), e2e["backend"], e2e["batch"])
    for run in e2e["runs"]:
        if per_nfe:
            run["network_s"] = run["nfe"] * per_nfe
            run["network_share"] = run["network_s"] / run["timing"]["median_s"]
            if run["network_share"] > CONSISTENCY_SLACK:
                out.append(f"end-to-end {run['label']} took {run['timing']['median_s']:.3g} s, less than its "
                           f"{run['nfe']} network calls at {per_nfe:.3g} s each: timing noise, treat both with care")
        if not run["finite"]:
            out.append(f"end-to-end {run['label']} produced NaN/Inf samples")
    if report["filters"].get("images_meaningful") is False:
        out.append("PDS ran with synthetic filters (no --masks or --reference): its timing is right, its images are not")
    return out


# ----------------------------------------------------------------------------------------
# Reports: Rich tables, JSON, a plot.


def _ms(seconds) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _num(v, fmt: str = ".3g") -> str:
    return "—" if v is None else format(v, fmt)


def _pct(fraction) -> str:
    if fraction is None:
        return "—"
    v = fraction * 100
    return f"{v:.0f}" if v >= 10 else f"{v:.2g}"


def _quality_text(q: dict | None) -> str:
    if not q or q.get("value") is None:
        return "—" if not q else "NaN"
    floor = f" (floor {q['floor']:.2g})" if q.get("floor") is not None else ""
    return f"{q['value']:.3g}{floor}"


def render(report: dict) -> list:
    """The report as Rich renderables: a header, then one table per part that ran."""
    from rich.text import Text

    from pdscli.machine import machine_summary

    m, s = report["model"], report["settings"]
    head = Text()
    head.append(f"pds bench: {m['name']} ({m['kind']}, {'x'.join(map(str, m['shape']))})", style="bold")
    head.append(f" on {s['device']}\nmachine: {machine_summary(report['machine'])}")
    per_image = report["flops"].get("per_image")
    if per_image:
        head.append(f"\nmodel FLOPs per image per call: {per_image / 1e9:.3g} GFLOP ({report['flops']['method']})")
    q = report["quality"]
    if q["metric"]:
        against = f", against {q['reference']}" if q.get("reference") else ""
        head.append(f"\nquality: {q['metric']}{against} = {q['description']}")
    out = [head]
    for part in (_nfe_table, _skipped_table, _overhead_table, _e2e_table, _samplers_table):
        table = part(report)
        if table is not None:
            out.append(table)
    for w in report.get("warnings", []):
        out.append(Text(f"warning: {w}", style="yellow"))
    return out


class _Table:
    """A Rich table whose cells are plain text: reasons quote `pip install "pds[trt]"`, which
    Rich would otherwise read as markup."""

    def __init__(self, title: str, *columns: str, numbers: bool = True):
        from rich.table import Table

        self.table = Table(title=title, title_justify="left", title_style="bold")
        for i, c in enumerate(columns):
            self.table.add_column(c, justify="right" if numbers and i > 0 else "left")

    def add_row(self, *cells: str) -> None:
        from rich.text import Text

        self.table.add_row(*(Text(str(c)) for c in cells))


def _table(title: str, *columns: str, numbers: bool = True) -> _Table:
    return _Table(title, *columns, numbers=numbers)


def _nfe_table(report: dict):
    ok = [e for e in report.get("backends", []) if e["status"] == "ok"]
    if not ok:
        return None
    base = next((k for k in ok[0]["batches"][0] if k.startswith("speedup_vs_")), "speedup_vs_eager")
    table = _table(f"Network call (NFE) latency, {report['settings']['repeats']} timed calls after "
                   f"{report['settings']['warmup']} warm-up", "backend", "batch", "median ms", "IQR ms", "min-max ms",
                   "images/s", f"vs {base.removeprefix('speedup_vs_')}", "GFLOP/s", "rel err")
    for e in ok:
        for r in e["batches"]:
            table.add_row(f"{e['name']} ({e.get('precision') or '?'})", str(r["batch"]), _ms(r["median_s"]),
                          _ms(r["iqr_s"]), f"{_ms(r['min_s'])}-{_ms(r['max_s'])}", _num(r["images_per_s"], ".4g"),
                          _num(r.get(base), ".2f") + ("x" if r.get(base) else ""),
                          _num(r["achieved_flops_per_s"] / 1e9 if r.get("achieved_flops_per_s") else None),
                          _num(r.get("max_rel_err_vs_eager_fp32"), ".1e"))
    return table.table


def _skipped_table(report: dict):
    rest = [e for e in report.get("backends", []) if e["status"] != "ok"]
    if not rest:
        return None
    table = _table("Backends not measured", "backend", "status", "reason", numbers=False)
    for e in rest:
        table.add_row(e["name"], e["status"], e["reason"])
    return table.table


def _overhead_table(report: dict):
    part = report.get("pds_overhead", {})
    if part.get("status") != "ok":
        return None
    table = _table("PDS overhead per NFE (one M z + one M M^T g)", "batch", "M z ms", "M M^T g ms", "per NFE ms",
                   "% of e2e-backend NFE", "% of fastest NFE")
    for r in part["batches"]:
        e2e, fastest = r.get("fraction_of_e2e_backend_nfe"), r.get("fraction_of_fastest_nfe")
        table.add_row(str(r["batch"]), _ms(r["noise"]["median_s"]), _ms(r["grad"]["median_s"]), _ms(r["per_nfe_s"]),
                      _pct(e2e), _pct(fastest) +
                      (f" ({r['fastest_backend']})" if r.get("fastest_backend") else ""))
    return table.table


def _e2e_table(report: dict):
    part = report.get("end_to_end", {})
    if part.get("status") != "ok":
        return None
    table = _table(f"End to end on {part['backend']}, batch {part['batch']}: PDS speedup {part['speedup']:.2f}x "
                   f"(NFE ratio {part['nfe_ratio']:.2f}x)", "run", "steps", "NFE", "median s", "IQR s", "images/s",
                   "quality")
    for r in part["runs"]:
        alpha = f", alpha {r['alpha']:.3g}" if r.get("alpha") is not None else ""
        table.add_row(f"{r['label']} ({r['sampler']}{alpha})", str(r["steps"]), str(r["nfe"]),
                      _num(r["timing"]["median_s"], ".4g"), _num(r["timing"]["iqr_s"], ".2g"),
                      _num(r["images_per_s"], ".4g"), _quality_text(r["quality"]))
    return table.table


def _samplers_table(report: dict):
    part = report.get("samplers", {})
    if part.get("status") != "ok":
        return None
    table = _table(f"Samplers at equal NFE budgets, batch {part['batch']}", "sampler", "NFE budget", "steps", "NFE",
                   "s/image", "images/s", "quality")
    for r in part["rows"]:
        if r["status"] != "ok":
            table.add_row(r["sampler"], str(r["nfe_budget"]), str(r["steps"]), "—", "—", "—", f"skipped: {r['reason']}")
            continue
        alpha = f" (alpha {r['alpha']:.3g})" if r.get("alpha") is not None else ""
        table.add_row(r["sampler"] + alpha, str(r["nfe_budget"]), str(r["steps"]), str(r["nfe"]),
                      _num(r["per_image_s"], ".3g"), _num(r["images_per_s"], ".4g"), _quality_text(r["quality"]))
    return table.table


PLOT_FORMATS = (".png", ".pdf", ".svg")


def check_outputs(json_path: str | None, plot: Path | None, force: bool) -> None:
    """Output files are checked before the (long) run: writable, not overwritten without --force,
    and matplotlib present for --plot."""
    from pdscli.fsutil import prepare_out_file

    if json_path not in (None, "-"):
        prepare_out_file(Path(json_path), force=force)
    if plot is not None:
        if Path(plot).suffix.lower() not in PLOT_FORMATS:
            raise PdsError(f"--plot writes {', '.join(PLOT_FORMATS)} files, not {Path(plot).name}")
        _matplotlib()
        prepare_out_file(Path(plot), force=force)


def _matplotlib():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PdsError('--plot needs matplotlib: pip install "pds[plot]" (or pip install matplotlib)') from None
    return Figure


def to_json(report: dict) -> str:
    """Strict JSON: NaN / Inf never appear (they are None in the report)."""
    return json.dumps(report, indent=2, default=str, allow_nan=False) + "\n"


def write_json(report: dict, path: str) -> None:
    from pdscli.fsutil import atomic_write_text

    atomic_write_text(path, to_json(report))


def write_plot(report: dict, path: Path) -> None:
    """Time per image and quality against NFE (one line per sampler), and per-call time per
    image against batch size (one line per backend)."""
    import io

    from pdscli.fsutil import atomic_write_bytes

    figure = _matplotlib()(figsize=(15, 4.5), layout="constrained")
    series = _sampler_series(report)
    axes = figure.subplots(1, 3)
    _plot_lines(axes[0], series, "per_image_s", "seconds per image (end to end)")
    _plot_lines(axes[1], series, "quality", report["quality"]["metric"] or "quality (none measured)")
    _plot_backends(axes[2], report)
    gpu = report["machine"].get("gpu")
    figure.suptitle(f"pds bench: {report['model']['name']} on {report['settings']['device']} "
                    f"({gpu['name'] if gpu else report['machine']['cpu']})")
    buf = io.BytesIO()
    figure.savefig(buf, format=Path(path).suffix.lstrip(".").lower(), dpi=120)
    atomic_write_bytes(path, buf.getvalue())


def _sampler_series(report: dict) -> dict[str, list[tuple[int, float | None, float | None]]]:
    """label -> [(NFE, seconds per image, quality)] from the samplers and end-to-end parts."""
    series: dict[str, list] = {}
    for r in report.get("samplers", {}).get("rows", []):
        if r.get("status") == "ok":
            series.setdefault(r["sampler"], []).append((r["nfe"], r["per_image_s"], (r["quality"] or {}).get("value")))
    for r in report.get("end_to_end", {}).get("runs", []):
        series.setdefault(f"end to end: {r['label']}", []).append(
            (r["nfe"], r["per_image_s"], (r["quality"] or {}).get("value")))
    return {k: sorted(v) for k, v in series.items()}


def _plot_lines(ax, series: dict, what: str, ylabel: str) -> None:
    index = 1 if what == "per_image_s" else 2
    for label, points in series.items():
        pts = [(p[0], p[index]) for p in points if p[index] is not None and p[index] > 0]
        if pts:
            # The end-to-end runs are single points (full steps, 1/k of them): stars, no line.
            single = label.startswith("end to end")
            ax.plot(*zip(*pts), marker="*" if single else "o", markersize=12 if single else 6,
                    linestyle="none" if single else "-", label=label)
    ax.set_xlabel("NFE per image")
    ax.set_ylabel(ylabel)
    _log_axes(ax)


def _plot_backends(ax, report: dict) -> None:
    for e in report.get("backends", []):
        if e["status"] == "ok":
            ax.plot([r["batch"] for r in e["batches"]], [r["per_image_s"] for r in e["batches"]], marker="o", label=e["name"])
    ax.set_xlabel("batch size")
    ax.set_ylabel("seconds per image per network call")
    _log_axes(ax)


def _log_axes(ax) -> None:
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if ax.lines:
        ax.set_xscale("log")
        ax.set_yscale("log")
        # Plain numbers (20, 50, 100) rather than 2x10^1 on the NFE and batch axes.
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({float(x) for line in ax.lines for x in line.get_xdata()}))
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, which="both", alpha=0.3)
