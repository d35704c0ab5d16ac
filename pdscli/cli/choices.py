"""The choices the flags take, read from the registries that define them, so that no help text
lists a stale set. A help text names a set as {samplers}, {formats}, ...; `fill` writes the set in
when a command's help is shown (cli.app.Command), and only then are the registries imported:
`pds --help` and every command's start stay fast."""

from __future__ import annotations

from collections.abc import Callable

from rich.markup import escape


def _samplers() -> str:
    from pdscli.samplers import REGISTRY

    return ", ".join(REGISTRY)


def _schedules() -> str:
    from pdscli.sample.setup import REFERENCE_GRID
    from pdscli.samplers.grids import SCHEDULES

    return ", ".join((REFERENCE_GRID, *SCHEDULES))


def _precisions() -> str:
    from pdscli.devices import PRECISIONS

    return ", ".join(PRECISIONS)


def _presets() -> str:
    from pdscli.models.config import PRESET_NAMES

    return ", ".join(PRESET_NAMES)


def _models() -> str:
    from pdscli.sample.model import MODEL_NAMES

    return ", ".join(MODEL_NAMES)


def _formats() -> str:
    from pdscli.engines.export import FORMATS

    return "; ".join(f"{name}: {what}" for name, what in FORMATS.items())


def _engine_backends() -> str:
    from pdscli.engines.onnx_engine import BACKENDS

    return ", ".join(BACKENDS)


def _tf32() -> str:
    from pdscli.devices import TF32_POLICIES

    return ", ".join(TF32_POLICIES)


def _bench_backends() -> str:
    from pdscli.bench.config import KNOWN_BACKENDS

    return ", ".join(KNOWN_BACKENDS)


def _bench_parts() -> str:
    from pdscli.bench.config import PARTS

    return ", ".join(PARTS)


def _alpha_ranges() -> str:
    """Where --alpha auto keeps each calibrated sampler's filters on, at the default sigma range."""
    from pdscli.precondition.alpha import AUTO_TABLES, auto_step_range

    lo, hi = 0.01, 378.0
    spans = []
    for sampler in AUTO_TABLES:
        span = auto_step_range(sampler, lo, hi)
        spans.append(f"{sampler} {span[0]}-{span[1]}" if span else f"{sampler} nowhere")
    return f"{', '.join(spans)} steps (for sigma {lo:g}-{hi:g})"


CHOICES: dict[str, Callable[[], str]] = {
    "samplers": _samplers, "schedules": _schedules, "precisions": _precisions, "presets": _presets,
    "models": _models, "formats": _formats, "engine_backends": _engine_backends, "tf32": _tf32,
    "bench_backends": _bench_backends, "bench_parts": _bench_parts, "alpha_ranges": _alpha_ranges,
}


def fill(text: str | None) -> str | None:
    """`text` with every {name} of CHOICES written out (escaped for Rich markup)."""
    if not text or "{" not in text:
        return text
    for name, load in CHOICES.items():
        key = "{" + name + "}"
        if key in text:
            text = text.replace(key, escape(load()))  # help is Rich markup: "pds[trt]" is no tag
    return text
