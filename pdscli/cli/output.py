"""How every command prints its result: `--json` gives one JSON document on stdout, in one style
for all commands; otherwise a plain line (or a Rich table) for a person."""

from __future__ import annotations

import json
import math

import typer

from pdscli.console import console, err_console


def _finite(value):
    """The document with every NaN or Inf float as None: strict JSON, which every parser reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def json_text(document) -> str:
    """The JSON every command prints: indented, strict, and anything else (a path, a dtype) as its string."""
    return json.dumps(_finite(document), indent=2, default=str, allow_nan=False) + "\n"


def print_json(document) -> None:
    """--json: the command's result, and nothing else, on stdout."""
    typer.echo(json_text(document), nl=False)


def print_line(text: str) -> None:
    """A result line on stdout, printed as it is (no Rich markup or highlighting, no wrapping)."""
    console.print(text, highlight=False, soft_wrap=True, markup=False)


def stderr_log(quiet: bool):
    """A command's progress messages: one line each on stderr, none with --quiet."""

    def log(line: str) -> None:
        if not quiet:
            err_console.print(line, highlight=False, soft_wrap=True, markup=False)

    return log
