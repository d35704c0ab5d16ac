"""The value rules of the flags, each written once with one wording for every refusal:
`--steps must be at least 1, not 0`. The command line parses its flags with these functions and
the library entry points (a SampleFlags, a BenchConfig) pass their fields through the same ones,
so `pds sample`, `pds bench` and the Python API accept and refuse the same values. Every rule
takes what a command line gives (a string) or an already typed value, and returns the typed value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from pdscli.errors import PdsError
from pdscli.noise import SEED_MAX



def _shown(value) -> str:
    """A refused value as the user typed it: numbers bare, anything else quoted."""
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    try:
        float(text)
    except ValueError:
        return repr(text)
    return text.strip()


def refusal(flag: str, rule: str, value) -> PdsError:
    """The one wording of a value a flag does not take."""
    return PdsError(f"{flag} must be {rule}, not {_shown(value)}")


def not_one_of(flag: str, value, names: Iterable[str]) -> PdsError:
    """The one wording of a name that is not among a flag's choices."""
    return refusal(flag, f"one of {', '.join(names)}", value)


def one_of(flag: str, value, names: Iterable[str]) -> str:
    """`value` (any case, surrounding space ignored) if it is one of `names`."""
    names = list(names)
    chosen = str(value).strip().lower()
    if chosen not in names:
        raise not_one_of(flag, value, names)
    return chosen


def whole_number(flag: str, value, least: int = 1, below: int | None = None) -> int:
    """An integer >= `least` (and < `below` when given)."""
    rule = f"a whole number from {least} to {below - 1}" if below is not None else f"at least {least}"
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool):
        raise refusal(flag, rule if below is not None else f"a whole number, {rule}", value)
    if number < least or (below is not None and number >= below):
        raise refusal(flag, rule, value)
    return number


def positive_number(flag: str, value) -> float:
    """A finite number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise refusal(flag, "a positive number", value) from None
    if not (math.isfinite(number) and number > 0):
        raise refusal(flag, "a positive number", value)
    return number


def device(value) -> str:
    """--device: auto, cpu, cuda or cuda:N (whether that device is there is asked when it is used)."""
    text = str(value).strip().lower()
    if text in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise refusal("--device", "auto, cpu, cuda or cuda:N", value)


# -- the flags `pds sample` and `pds bench` share ------------------------------------------------


def seed(value) -> int:
    """--seed: the run's noise (sample i's noise is a function of (seed, i))."""
    return whole_number("--seed", value, 0, SEED_MAX + 1)


def steps(value, flag: str = "--steps") -> int:
    """--steps (and any other step or image count)."""
    return whole_number(flag, value, 1)


def speed_up(value) -> float:
    """--speed-up k: int(num_scales / k) steps, for any k > 0 (the reference's speed-up)."""
    return positive_number("--speed-up", value)


def alpha(value) -> str | None:
    """--alpha: a positive number or "auto" (any case), as text the way it was given (run.json
    records it so); None stays None (the sampler's default, pdscli.precondition.alpha)."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() == "auto":
        return "auto"
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0):
        raise refusal("--alpha", "a positive number or auto", value)
    return text
