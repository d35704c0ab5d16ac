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
import hashlib
import importlib.util
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pdscli import __version__
from pdscli.errors import PdsError

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
QUICK = {"batch_sizes": [1, 4], "warmup": 1, "repeats": 3, "speed_up": 4.0, "e2e_repeats": 1,
         "quality_samples": 32, "nfe": [10, 20], "reference_limit": 200}
QUICK_FULL_STEPS = 20  # --quick's "full" step count: a smoke test, not the model's num_scales
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
        from pdscli.sampling import get_sampler

        for name in cfg.samplers:
            get_sampler(name)  # unknown names fail here, listing the choices
    from pdscli.alpha import resolve_alpha
    from pdscli.settings import SamplingSettings

    # The value is checked now; "auto" is resolved per step count later.
    resolve_alpha(cfg.alpha, SamplingSettings(0.01, 1.0, 10, 0.1, 2, 1), 10)
    if cfg.reference is not None:
        from pdscli.datasets import image_files

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
    if (cfg.image_size or cfg.channels) and cfg.model != "gaussian" and not cfg.engine and given:
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


def builtin_available() -> bool:
    try:
        from pdscli import builtin
    except ImportError:
        return False
    return builtin.WEIGHTS.is_file() and builtin.CONFIG.is_file()


def default_model_name(cfg: BenchConfig) -> str | None:
    """No model flag: the built-in digits network where this installation ships it, else gaussian."""
    if cfg.checkpoint or cfg.engine or cfg.random_weights or cfg.model:
        return cfg.model
    return "builtin" if builtin_available() else "gaussian"


def open_bench_model(cfg: BenchConfig, device: torch.device) -> BenchModel:
    model = default_model_name(cfg)
    if cfg.engine:
        return _open_engine(cfg, device)
    if model == "gaussian":
        return _open_gaussian(cfg, device)
    if model == "builtin":
        from pdscli import builtin

        if not builtin_available():
            raise PdsError("the built-in model's weights are not part of this installation; use --model gaussian")
        return _network_from_checkpoint(builtin.WEIGHTS, builtin.CONFIG, None, False, device, name=builtin.NAME)
    if cfg.random_weights:
        return _open_random(cfg, device)
    return _network_from_checkpoint(cfg.checkpoint, cfg.config, cfg.preset, cfg.trust_checkpoint, device)


def _open_gaussian(cfg: BenchConfig, device: torch.device) -> BenchModel:
    from pdscli.analytic import GaussianImageModel

    g = GaussianImageModel(cfg.image_size or 32, cfg.channels or 3, device=device)
    return BenchModel(ANALYTIC, g.score, g.settings, device, "gaussian", gaussian=g, identity="gaussian",
                      info={"description": g.describe()})


def _network_from_checkpoint(path, config, preset, trust, device, *, name=None) -> BenchModel:
    from pdscli.checkpoint import load_score_model
    from pdscli.engines.torch_engine import torch_score

    net = load_score_model(path, config, preset=preset, trust_checkpoint=trust, device=device)
    info = dict(net.checkpoint_info)
    return BenchModel("network", torch_score(net, device=device), net.settings, device,
                      name or f"checkpoint:{info['file']}", net=net, net_config=net.config,
                      identity=info["sha256"][:16],
                      info={"checkpoint": str(path), "sha256": info["sha256"], "preset": info.get("preset"),
                            "config": info.get("config"), "weights": info.get("weights"),
                            "num_params": info.get("num_params")})


def _open_random(cfg: BenchConfig, device: torch.device) -> BenchModel:
    from pdscli.engines.torch_engine import torch_score
    from pdscli.export import load_source

    source = load_source(config=cfg.config, preset=cfg.preset, random_weights=True, seed=cfg.seed)
    net = source.net.to(device).eval()
    digest = hashlib.sha256(json.dumps(net.config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    label = cfg.preset or Path(cfg.config).stem
    return BenchModel("network", torch_score(net, device=device), source.settings, device,
                      f"random:{label}", net=net, net_config=net.config, identity=f"random-{digest}-s{cfg.seed}",
                      info={"preset": cfg.preset, "config": str(cfg.config) if cfg.config else None,
                            "weights": f"random (seed {cfg.seed}): an architecture benchmark, not a trained model",
                            "num_params": sum(p.numel() for p in net.parameters())})


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
        if reason is None and default and cfg.quick and name not in QUICK_BACKENDS:
            reason = "not in --quick's default set (name it in --backends to measure it)"
        plan.append((name, reason))
    return plan


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
        from pdscli.export import export_metadata, export_onnx
        from pdscli.fsutil import atomic_write_bytes

        path = self.folder / f"{model.identity}-{precision}.onnx"
        if path.is_file():
            return path.read_bytes(), True
        # The parity check is skipped here: the bench measures every backend's error itself.
        meta = export_metadata(model.settings, precision=precision, preset=model.info.get("preset"),
                               checkpoint_sha256=model.info.get("sha256"))
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
    from pdscli.export import at_precision

    info = {"description": BACKEND_HELP[name]}
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
    from pdscli.engines.onnx_engine import OnnxScore, choose_providers

    data, reused = cache.onnx_bytes(model, "fp32")
    backend_flag = {"onnx-cpu": "cpu", "onnx-cuda": "cuda", "onnx-trt": "tensorrt"}[name]
    providers = choose_providers(model.device, backend_flag, cache_dir=cache.folder / "ort-trt-cache")
    session = ort_session(data, providers, threads, label=name)
    score = OnnxScore(session, model.device)
    return Backend(name, lambda b: score, {**info, "precision": "fp32", "provider": score.provider,
                                           "onnx_reused_from_cache": reused,
                                           "intra_op_threads": threads or "onnxruntime default"})


def ort_session(data: bytes, providers: list, threads: int | None, *, label: str):
    """An ONNX Runtime session with `threads` intra-op threads (the same budget as torch, so CPU
    backends compete fairly); refuses ORT's silent fallback to the CPU provider."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(data, opts, providers=providers)
    except Exception as e:  # ORT's own pybind exception types
        raise PdsError(f"ONNX Runtime cannot load the graph for {label}: {_one_line(e)}") from None
    if session.get_providers()[0] != providers[0][0]:
        raise PdsError(f"ONNX Runtime fell back to {session.get_providers()[0]} instead of {providers[0][0]}")
    return session


def _trt_backend(name, model, cache, batches, info) -> Backend:
    from pdscli.engines.tensorrt_engine import build_engine, open_trt
    from pdscli.export import export_metadata

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
    """Eager fp32 outputs on each batch's inputs: what every other backend is compared with."""
    if model.kind != "network":
        return {}
    refs = {}
    with torch.no_grad():
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
