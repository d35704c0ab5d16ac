"""Opening what a run samples from: the ONE opener of a score model and the ONE opener of filters.

`open_model(ModelSpec(...))` gives a `pdscli.score.ScoreModel` from a checkpoint, an exported
engine, the analytic Gaussian model or the built-in digits model, with flag overrides
(sigma_min, sigma_max, num_scales, snr) applied to its settings. `open_filters(...)` gives the
PDS filters from a `pds filters` .npz, the reference's .npy pair or the built-in model's own,
checked against the model's image shape. `pds sample` and `pds bench` both open models here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from pdscli import flag_rules
from pdscli.devices import resolve_device, resolve_precision
from pdscli.engines import open_engine
from pdscli.errors import PdsError
from pdscli.evaluate import analytic
from pdscli.evaluate.mixture import MixtureImageModel, mixture_score_model
from pdscli.fsutil import sha256_file
from pdscli.models import builtin
from pdscli.models.checkpoint import open_checkpoint
from pdscli.models.config import MAX_SCALES
from pdscli.precondition import Filters, load_filters, load_reference_npy
from pdscli.samplers.teleport import DataGaussian
from pdscli.score import ScoreModel
from pdscli.settings import SamplingSettings

MODEL_NAMES = ("gaussian", "mixture", "builtin")
ANALYTIC_MODELS = ("gaussian", "mixture")  # exact scores, no network
GAUSSIAN_SIZE, GAUSSIAN_CHANNELS = 32, 3  # the analytic model's shape when no flag gives one
_ZIP_MAGIC = b"PK\x03\x04"  # an .npz is a zip archive; an .npy starts with b"\x93NUMPY"


@dataclass(frozen=True)
class ModelSpec:
    """Where the score comes from: at most one of checkpoint / engine / model / random_weights
    (none = the built-in model). `pds sample` and `pds bench` both describe their model with one.

    The sigma/snr fields override the model's own settings when not None. A ModelSpec is checked
    when it is made (`check_spec`): whoever holds one can trust its fields.
    """

    checkpoint: Path | None = None
    config: Path | None = None
    preset: str | None = None
    engine: Path | None = None
    engine_backend: str | None = None
    model: str | None = None  # "gaussian" | "mixture" | "builtin"
    random_weights: bool = False  # the --preset / --config architecture with seeded random weights (pds bench)
    image_size: int | None = None
    channels: int | None = None
    trust_checkpoint: bool = False
    precision: str | None = None  # None: fp32, or an engine's own
    device: str = "auto"
    sigma_min: float | None = None
    sigma_max: float | None = None
    num_scales: int | None = None
    snr: float | None = None

    def __post_init__(self):
        typed = {"device": flag_rules.device(self.device)}
        if self.model is not None:
            typed["model"] = flag_rules.one_of("--model", self.model, MODEL_NAMES)
        for name, rule in _NUMBER_RULES.items():
            if getattr(self, name) is not None:
                typed[name] = rule(getattr(self, name))
        for name, value in typed.items():
            object.__setattr__(self, name, value)
        check_spec(self)

    @property
    def uses_builtin(self) -> bool:
        """No model flag (or --model builtin) means the built-in model."""
        return self.model == "builtin" or not (self.checkpoint or self.engine or self.model or self.random_weights)

    def overrides(self) -> dict:
        """The settings flags that were given (for SamplingSettings.replace / engine metadata)."""
        given = {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "num_scales": self.num_scales, "snr": self.snr}
        return {k: v for k, v in given.items() if v is not None}

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def scale_count(value, flag: str = "--steps") -> int:
    """A count of steps or noise levels (--steps, --nfe, --num-scales, bench's --full-steps): 1 to
    MAX_SCALES, since a grid of 10^9 steps would take 8 GB before the first step."""
    return flag_rules.whole_number(flag, value, 1, MAX_SCALES + 1)


# The numbers a ModelSpec holds, each by its flag's rule (pdscli.flag_rules).
_NUMBER_RULES = {
    "image_size": partial(flag_rules.whole_number, "--image-size"),
    "channels": partial(flag_rules.whole_number, "--channels"),
    "num_scales": partial(scale_count, flag="--num-scales"),
    "sigma_min": partial(flag_rules.positive_number, "--sigma-min"),
    "sigma_max": partial(flag_rules.positive_number, "--sigma-max"),
    "snr": partial(flag_rules.positive_number, "--snr"),
}


def check_spec(spec: ModelSpec) -> None:
    """The model flags' rules that join several flags, all cheap (no file is opened): one source,
    and the flags that go with it."""
    sources = [flag for flag, given in (("--checkpoint", spec.checkpoint), ("--engine", spec.engine),
                                        ("--model", spec.model), ("--random-weights", spec.random_weights)) if given]
    if len(sources) > 1:
        raise PdsError(f"choose one model: {' and '.join(sources)} exclude each other")
    if spec.model is not None:
        flag_rules.one_of("--model", spec.model, MODEL_NAMES)
    if spec.random_weights and not (spec.preset or spec.config):
        raise PdsError("--random-weights builds an architecture: pass --preset NAME or --config FILE")
    if (spec.config or spec.preset) and not (spec.checkpoint or spec.random_weights):
        raise PdsError("--config / --preset describe a --checkpoint (or an architecture with --random-weights); "
                       "an engine carries its own settings")
    if spec.engine_backend and not spec.engine:
        raise PdsError("--engine-backend applies to --engine files only")
    if spec.precision:
        resolve_precision(spec.precision)
    if spec.model in ANALYTIC_MODELS and spec.precision and spec.precision.lower() != "fp32":
        raise PdsError(f"the analytic {spec.model} model has no network: --precision {spec.precision} does not apply")


def open_model(spec: ModelSpec) -> ScoreModel:
    """The ScoreModel a spec names, with the flag overrides applied to its settings."""
    device = resolve_device(spec.device)
    overrides = spec.overrides()
    if spec.engine:
        # Engines may lack metadata: the shape flags fill it in, like the sigma flags.
        shape = {"image_size": spec.image_size, "num_channels": spec.channels}
        return open_engine(spec.engine, device=device, backend=spec.engine_backend, precision=spec.precision,
                           overrides={**overrides, **{k: v for k, v in shape.items() if v is not None}})
    if spec.checkpoint:
        model = open_checkpoint(spec.checkpoint, spec.config, spec.preset, device=device,
                                precision=spec.precision or "fp32", trust_checkpoint=spec.trust_checkpoint)
        check_shape_flags(spec, model.settings, model.name)
    elif spec.random_weights:
        raise PdsError("--random-weights makes noise, not images: sample from a --checkpoint (pds bench and pds "
                       "export take random weights)")
    elif spec.model == "gaussian":
        model = analytic.gaussian_score_model(spec.image_size or GAUSSIAN_SIZE, spec.channels or GAUSSIAN_CHANNELS,
                                              device=device)
    elif spec.model == "mixture":
        # The exact non-Gaussian model: a mixture of stationary Gaussians (pdscli.evaluate.mixture).
        model = mixture_score_model(spec.image_size or GAUSSIAN_SIZE, spec.channels or GAUSSIAN_CHANNELS, device=device)
    else:
        model = builtin.default_score_model(device)
        check_shape_flags(spec, model.settings, model.name)
    if overrides:
        model = dataclasses.replace(model, settings=model.settings.replace(**overrides))
    return model


def check_shape_flags(spec: ModelSpec, settings: SamplingSettings, name: str) -> None:
    """--image-size / --channels set an analytic model's shape and fill in an engine's missing
    metadata; for a network they must match what it makes."""
    for flag, given, actual in (("--image-size", spec.image_size, settings.image_size),
                                ("--channels", spec.channels, settings.num_channels)):
        if given is not None and given != actual:
            raise PdsError(f"{flag} {given} does not match the model ({name} makes "
                           f"{settings.num_channels}x{settings.image_size}x{settings.image_size} images)")


# ----------------------------------------------------------------------------------------
# Filters.


@dataclass(frozen=True)
class FiltersInfo:
    """Where filters came from, for run.json; `sha256` (of the files) is part of a run's fingerprint."""

    files: tuple[str, ...]
    sha256: str
    source: str
    kinds: str
    count: int
    size: int
    channels: int

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "files": list(self.files)}


def check_filter_flags(masks: Path | None, freq_mask: Path | None, space_mask: Path | None) -> None:
    """The cheap checks of the filter flags: one source, files that exist and have the right format."""
    if masks and (freq_mask or space_mask):
        raise PdsError("--masks excludes --freq-mask / --space-mask: give the .npz or the .npy files")
    for flag, path in (("--masks", masks), ("--freq-mask", freq_mask), ("--space-mask", space_mask)):
        if not path:
            continue
        path = Path(path)
        if not path.is_file():
            raise PdsError(f"filter file {path} does not exist")
        if flag != "--masks" and _is_zip(path):
            raise PdsError(f"{flag} {path} is an .npz (filters from `pds filters`): pass it with --masks")


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    except OSError:
        return False


def open_filters(masks: Path | None = None, freq_mask: Path | None = None, space_mask: Path | None = None, *,
                 settings: SamplingSettings, use_builtin: bool = False) -> tuple[Filters | None, FiltersInfo | None]:
    """Filters from a `pds filters` .npz, the reference's .npy pair or (use_builtin) the built-in
    model's own, checked against the model's shape; (None, None) if none. The flags were checked
    when their holder was made (check_filter_flags)."""
    if masks:
        filters, files = load_filters(masks), [masks]
    elif freq_mask or space_mask:
        filters = load_reference_npy(freq_mask, space_mask, channels=settings.num_channels, size=settings.image_size)
        files = [p for p in (freq_mask, space_mask) if p]
    elif use_builtin:
        filters, files = builtin.default_filters(), [builtin.FILTERS]
    else:
        return None, None
    check_filters_fit(filters, settings)
    info = FiltersInfo(
        files=tuple(str(p) for p in files),
        sha256="+".join(sha256_file(p)[:16] for p in files),
        source=filters.source, kinds=filters.kinds, count=filters.count, size=filters.size, channels=filters.channels,
    )
    return filters, info


def check_filters_fit(filters: Filters, settings: SamplingSettings) -> None:
    """Filters made for other images cannot precondition this model: say so in one line."""
    want, got = tuple(settings.shape), tuple(filters.shape)
    if got != want:
        raise PdsError(
            f"the filters are {'x'.join(map(str, got))} (C x H x W) but the model makes "
            f"{'x'.join(map(str, want))} images; make filters at this size with `pds filters DIR --size {settings.image_size}`"
        )


# ----------------------------------------------------------------------------------------
# The data's statistics for teleportation.


def data_gaussian(spec: ModelSpec, settings: SamplingSettings, filters: Filters | None) -> DataGaussian | None:
    """The data's Gaussian approximation (pdscli.samplers.teleport): from the filters when they hold
    the moments, else an exact model's own (the Gaussian's spectrum, the mixture's moment-matched
    one); None when neither is at hand."""
    if filters is not None and filters.has_moments:
        return DataGaussian(filters.mean, filters.spectrum)
    size, channels = settings.image_size, settings.num_channels
    if spec.model == "gaussian":
        exact = analytic.GaussianImageModel(size, channels)
    elif spec.model == "mixture":
        exact = MixtureImageModel(size, channels).moment_matched()
    else:
        return None
    return DataGaussian(torch.full(exact.shape, exact.mean, dtype=torch.float64), exact.lam)


def refresh_hint(filters: Filters | None, path) -> str | None:
    """The one line an older filters file gets when teleportation would use it: how to remake it."""
    if filters is None or filters.has_moments:
        return None
    where = path or "the filters file"
    return (f"{where} lacks the data mean and spectrum that --teleport needs (made by an older pds); remake it with "
            f"`pds filters DIR --size {filters.size} --channels {filters.channels} --force` to teleport")
