"""What `pds bench` was asked: the backend and part names, the defaults (full and --quick), and
BenchConfig with its checks. Every flag is checked here, once, before any model is loaded; the
modules below trust a resolved BenchConfig."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pdscli.bench.fid import check_fid_flags
from pdscli.bench.plot import PLOT_FORMATS, require_matplotlib
from pdscli.errors import PdsError, first_line
from pdscli.fsutil import prepare_out_file
from pdscli.images import image_files
from pdscli.precondition.alpha import ALPHA_REFERENCE, resolve_alpha
from pdscli.sample.model import check_filter_flags
from pdscli.samplers import get_sampler
from pdscli.settings import SamplingSettings

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
MODELS = ("gaussian", "mixture", "builtin")
EXACT_MODELS = ("gaussian", "mixture")  # analytic scores

# Full runs are sized for a GPU; --quick is a smoke test of a minute or less on a CPU.
DEFAULTS = {"batch_sizes": [1, 8, 32], "warmup": 3, "repeats": 20, "speed_up": 10.0, "e2e_repeats": 3,
            "quality_samples": 256, "nfe": [20, 50, 100], "reference_limit": 2000}
QUICK = {"batch_sizes": [1, 8], "warmup": 1, "repeats": 3, "speed_up": 2.0, "e2e_repeats": 1,
         "quality_samples": 16, "nfe": [10, 20], "reference_limit": 200}
QUICK_FULL_STEPS = 40  # --quick's "full" step count: a smoke test, not the model's num_scales
QUICK_BACKENDS = ("eager", ANALYTIC, ENGINE)


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
    alpha: str = f"{ALPHA_REFERENCE:g}"
    masks: Path | None = None
    samplers: list[str] | None = None
    nfe: list[int] | None = None
    e2e_backend: str | None = None
    e2e_batch: int | None = None
    e2e_repeats: int | None = None
    quality_samples: int | None = None
    reference: Path | None = None
    reference_limit: int | None = None
    fid_ref: Path | None = None
    fid_features: Path | None = None
    skip: list[str] = field(default_factory=list)
    seed: int = 0
    quick: bool = False
    cache_dir: Path | None = None
    command: str = ""
    is_resolved: bool = field(default=False, repr=False)

    def resolved(self) -> "BenchConfig":
        """A copy with the defaults filled in (--quick's where --quick is on) and every flag
        checked; a config resolved already is returned as it is (its flags are checked once)."""
        if self.is_resolved:
            return self
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
        cfg.is_resolved = True
        return cfg

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k != "is_resolved"}

    @property
    def default_model(self) -> str | None:
        """The --model to run: no model flag at all means the built-in digits network (what
        `pds sample` uses too)."""
        if self.checkpoint or self.engine or self.random_weights or self.model:
            return self.model
        return "builtin"


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


def parse_names(text: str | None, flag: str, every: tuple[str, ...] | None = None) -> list[str] | None:
    """"eager,onnx-cpu" -> ["eager", "onnx-cpu"] in the given order; `all` = every name of `every`.
    Whether the names exist is check_config's question."""
    if text is None:
        return None
    names = [v.strip().lower() for v in str(text).split(",") if v.strip()]
    if not names:
        raise PdsError(f"{flag} needs at least one name")
    if every is not None and names == ["all"]:
        return list(every)
    return list(dict.fromkeys(names))


def _check_known(names: list[str] | None, flag: str, known: tuple[str, ...]) -> None:
    unknown = [n for n in names or [] if n not in known]
    if unknown:
        raise PdsError(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(known)}")


def check_config(cfg: BenchConfig) -> None:
    """The cheap checks, before any model is loaded. (--threads, --image-size and --channels
    are ranges the command line checks.)"""
    _check_model_flags(cfg)
    _check_known(cfg.backends, "--backends", KNOWN_BACKENDS)
    _check_known(cfg.skip, "--skip", PARTS)
    if cfg.warmup < 0 or cfg.repeats < 1 or cfg.e2e_repeats < 1:
        raise PdsError(f"--warmup must be >= 0 and --repeats/--e2e-repeats >= 1, got {cfg.warmup}, {cfg.repeats}, {cfg.e2e_repeats}")
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
    if cfg.e2e_backend is not None and cfg.e2e_backend not in KNOWN_BACKENDS:
        raise PdsError(f"--e2e-backend must be one of {', '.join(KNOWN_BACKENDS)}, not {cfg.e2e_backend!r}")
    for name in cfg.samplers or []:
        get_sampler(name)  # unknown names fail here, listing the choices
    # The value is checked now; "auto" is resolved per step count later.
    resolve_alpha(cfg.alpha, SamplingSettings(0.01, 1.0, 10, 0.1, 2, 1), 10)
    if cfg.reference is not None:
        image_files(cfg.reference)  # a missing or empty folder fails before the model load
    check_filter_flags(cfg.masks, None, None)
    check_fid_flags(cfg.fid_ref, cfg.fid_features, cfg.model)


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
    if (cfg.image_size or cfg.channels) and cfg.model not in EXACT_MODELS and not cfg.engine:
        raise PdsError("--image-size / --channels apply to --model gaussian / mixture (or an --engine without metadata)")
    if cfg.reference is not None and cfg.model in EXACT_MODELS:
        raise PdsError("--reference is for network models: the analytic model's quality figure is exact already")


def check_outputs(out: Path | None, plot: Path | None, force: bool) -> None:
    """--out and --plot, before the (long) run: a file name (an existing folder is refused even
    with --force), in a writable folder, not overwritten without --force; matplotlib present
    for --plot."""
    for flag, path in (("--out", out), ("--plot", plot)):
        if path is not None and Path(path).is_dir():
            example = Path(path) / ("bench.json" if flag == "--out" else "bench.png")
            raise PdsError(f"{flag} {path} is a folder; give a file name, e.g. {example}")
    if out is not None:
        prepare_out_file(Path(out), force=force)
    if plot is not None:
        if Path(plot).suffix.lower() not in PLOT_FORMATS:
            raise PdsError(f"--plot writes {', '.join(PLOT_FORMATS)} files, not {Path(plot).name}")
        require_matplotlib()
        prepare_out_file(Path(plot), force=force)


def error_line(e: BaseException) -> str:
    """An exception as one line of a report (a backend that failed, a model that could not be traced)."""
    text = first_line(e)
    return type(e).__name__ if text == type(e).__name__ else f"{type(e).__name__}: {text}"
