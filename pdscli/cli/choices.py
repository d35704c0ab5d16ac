"""The choices the flags take, read from the registries that define them, so that no help text
lists a stale set. A help text names a set as {samplers}, {formats}, ...; `fill` writes the set in
when a command's help is shown (cli.app.Command), and only then are the registries imported:
`pds --help` and every command's start stay fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from rich.markup import escape


def _schedules() -> str:
    from pdscli.samplers import fitted
    from pdscli.samplers.grids import GRIDS

    return ", ".join((*GRIDS, fitted.STATS_GRID))


def _formats() -> str:
    from pdscli.engines.export import FORMATS

    return "; ".join(f"{name}: {what}" for name, what in FORMATS.items())


def _alpha_ranges() -> str:
    """Where --alpha auto keeps each calibrated sampler's filters on, at the default sigma range."""
    from pdscli.precondition.alpha import AUTO_TABLES, auto_step_range

    lo, hi = 0.01, 378.0
    spans = []
    for sampler in AUTO_TABLES:
        span = auto_step_range(sampler, lo, hi)
        spans.append(f"{sampler} {span[0]}-{span[1]}" if span else f"{sampler} nowhere")
    return f"{', '.join(spans)} steps (for sigma {lo:g}-{hi:g})"


# Sets that are a registry's names: (module, attribute).
REGISTRIES = {
    "samplers": ("pdscli.samplers", "REGISTRY"),
    "precisions": ("pdscli.devices", "PRECISIONS"),
    "presets": ("pdscli.models.config", "PRESET_NAMES"),
    "engine_backends": ("pdscli.engines.onnx_engine", "BACKENDS"),
    "bench_backends": ("pdscli.bench.config", "KNOWN_BACKENDS"),
    "bench_parts": ("pdscli.bench.config", "PARTS"),
}


def _names(module: str, attribute: str) -> Callable[[], str]:
    return lambda: ", ".join(getattr(importlib.import_module(module), attribute))


CHOICES: dict[str, Callable[[], str]] = {
    **{name: _names(*where) for name, where in REGISTRIES.items()},
    "schedules": _schedules, "formats": _formats, "alpha_ranges": _alpha_ranges,
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
