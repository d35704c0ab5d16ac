"""What `pds bench` was asked: the backend and part names, the defaults (full and --quick), and
BenchConfig with its checks. Every flag is checked here, once, before any model is loaded; the
modules below trust a resolved BenchConfig."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from pdscli.bench.fid import check_fid_flags
from pdscli.bench.plot import PLOT_FORMATS, require_matplotlib
from pdscli import flag_rules
from pdscli.errors import PdsError, first_line
from pdscli.fsutil import prepare_out_file
from pdscli.images import image_files
from pdscli.sample.model import ANALYTIC_MODELS, ModelSpec, check_filter_flags, scale_count
from pdscli.samplers import sampler_info
from pdscli.samplers.plan import check_counts

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

    spec: ModelSpec = field(default_factory=ModelSpec)  # the model, as `pds sample` names it (checked there)
    backends: list[str] | None = None
    batch_sizes: list[int] | None = None
    warmup: int | None = None
    repeats: int | None = None
    threads: int | None = None
    full_steps: int | None = None
    speed_up: float | None = None
    steps: int | None = None
    alpha: str | None = None  # None: the pds sampler's default (pdscli.precondition.alpha), as in `pds sample`
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
        check_run_flags(cfg)
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
        fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()
                  if k not in ("is_resolved", "spec")}
        return {**self.spec.to_dict(), **fields}

    @property
    def default_model(self) -> str | None:
        """The --model to run: no model flag at all means the built-in digits network (what
        `pds sample` uses too)."""
        return "builtin" if self.spec.uses_builtin else self.spec.model


def parse_ints(text: str | None, flag: str) -> list[int] | None:
    """"1,8,32" -> [1, 8, 32]; each at least 1 (--nfe: a step count, as `pds sample --nfe`), no repeats."""
    if text is None:
        return None
    words = [v for v in str(text).replace(" ", "").split(",") if v]
    if not words:
        raise flag_rules.refusal(flag, "comma-separated whole numbers like 1,8,32", text)
    count = partial(scale_count, flag=flag) if flag == "--nfe" else partial(flag_rules.whole_number, flag, least=1)
    return sorted({count(v) for v in words})


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


# The bench's own counts and their least values (quality figures measure variances: 2 images at least).
_COUNTS = {"warmup": 0, "threads": 1, "repeats": 1, "e2e_repeats": 1, "e2e_batch": 1,
           "quality_samples": 2, "reference_limit": 2}


def check_run_flags(cfg: BenchConfig) -> None:
    """The flags `pds sample` has too, by its rules (pdscli.flag_rules), typed in place."""
    cfg.alpha = flag_rules.alpha(cfg.alpha)
    cfg.seed = flag_rules.seed(cfg.seed)
    if cfg.steps is not None:
        cfg.steps = scale_count(cfg.steps)
    if cfg.speed_up is not None:
        cfg.speed_up = flag_rules.speed_up(cfg.speed_up)
    check_counts(steps=cfg.steps, speed_up=cfg.speed_up)
    check_filter_flags(cfg.masks, None, None)


def check_config(cfg: BenchConfig) -> None:
    """The bench's own flags, cheap, before any model is loaded (the model's were checked when its
    ModelSpec was made, the shared ones by check_run_flags)."""
    for name in cfg.backends or []:
        flag_rules.one_of("--backends", name, KNOWN_BACKENDS)
    for name in cfg.skip:
        flag_rules.one_of("--skip", name, PARTS)
    if cfg.full_steps is not None:
        cfg.full_steps = scale_count(cfg.full_steps, "--full-steps")
    for name, least in _COUNTS.items():
        if getattr(cfg, name) is not None:
            setattr(cfg, name, flag_rules.whole_number("--" + name.replace("_", "-"), getattr(cfg, name), least))
    if cfg.e2e_backend is not None:
        flag_rules.one_of("--e2e-backend", cfg.e2e_backend, KNOWN_BACKENDS)
    for name in cfg.samplers or []:
        sampler_info(name, "--samplers")  # unknown names fail here, listing the choices
    if cfg.reference is not None:
        if cfg.spec.model in ANALYTIC_MODELS:
            raise PdsError("--reference is for network models: the analytic model's quality figure is exact already")
        image_files(cfg.reference)  # a missing or empty folder fails before the model load
    check_fid_flags(cfg.fid_ref, cfg.fid_features, cfg.spec.model)


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
