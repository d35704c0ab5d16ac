"""The one planner for sampler x grid x steps x NFE: which grid a sampler walks, how many steps
it takes and how many score calls (NFE) they cost.

    plan(sampler, *, settings, steps=None, nfe=None, speed_up=None, schedule=None, options=None,
         filters=None) -> Plan

At most one of `steps`, `nfe` (a budget of score calls: the most steps that fit), `speed_up`
(int(num_scales / k) steps; the PC grid is then the reference's for k); none: num_scales steps.
`schedule` names the grid (`grids.GRIDS`, or `stats`: fitted to `filters`' statistics,
`pdscli.samplers.fitted`; None: the sampler's default, `SamplerInfo.grid`).
`options` are the PC family's parts; None: those the model's sampling section names
(`PCOptions.from_settings`), so a config's `n_steps_each: 2` costs what it runs.

    Plan(sampler, grid, steps, nfe, options, reason)
        grid: the grid's name; steps: the `Steps`; nfe: score calls per sample; options: the
        PCOptions the run uses (None for the other samplers); reason: how the count was reached.
        plan.sampler_options(): the keywords that pass those options to the sampler.

A budget without a sampler (`pds sample --nfe N`) is `pdscli.samplers.recommend`'s choice,
planned here.

The parts, for callers that need only one of them:

    check_counts(steps=None, nfe=None, speed_up=None)   at most one of them (a PdsError naming the flags)
    grid_name(sampler, schedule=None) -> str            the grid a sampler walks
    pc_options(sampler, settings) -> PCOptions | None   the PC family's parts from a sampling section
    nfe_for(sampler, n, options=None) -> int            score calls of n steps
    steps_for_nfe(sampler, budget, options=None, grid=None) -> int   the most steps that fit

The registry's `SamplerInfo.nfe(n)` is the count with the reference's PC parts; `nfe_for` with
`options` is the count of a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdscli import flag_rules
from pdscli.errors import PdsError
from pdscli.samplers import sampler_info
from pdscli.samplers import fitted
from pdscli.samplers.grids import GRIDS, Steps, count_steps, make_steps, min_steps
from pdscli.samplers.pc import PCOptions
from pdscli.settings import SamplingSettings


@dataclass(frozen=True)
class Plan:
    """A sampler's run: the grid it walks (name and `Steps`), its score calls per sample, the PC
    family's parts (None for the other samplers) and a sentence saying how the steps were chosen."""

    sampler: str
    grid: str
    steps: Steps
    nfe: int
    options: PCOptions | None
    reason: str

    def sampler_options(self) -> dict:
        """The sampler's keywords for the PC parts: none where pc / pds run the reference's
        default parts (the plain call), else {"options": options}."""
        if self.options is None or (self.sampler in ("pc", "pds") and self.options.is_reference_default):
            return {}
        return {"options": self.options}


def check_counts(*, steps: int | None = None, nfe: int | None = None, speed_up: float | None = None) -> None:
    """At most one way to count the steps: --steps, --speed-up or --nfe (a PdsError naming them)."""
    if steps is not None and speed_up is not None:
        raise PdsError("--steps and --speed-up exclude each other: give the number of steps or the speed-up")
    if nfe is not None and (steps is not None or speed_up is not None):
        raise PdsError("--nfe excludes --steps and --speed-up: give a budget of network calls or a number of steps")


def grid_name(sampler: str, schedule: str | None = None) -> str:
    """The grid `sampler` walks: `schedule` if given, else its default (`pc` for the PC family,
    the measured-best grid for the others); a PdsError for an unknown sampler or grid, or for a
    grid fitted to the statistics (`stats`) asked of the PC family."""
    info = sampler_info(sampler)
    name = schedule or info.grid
    if name == fitted.STATS_GRID:
        if info.pc_grid:
            raise PdsError(f"--schedule {fitted.STATS_GRID} fits grids for the samplers outside the PC family, "
                           f"not {sampler}")
        return name
    if name not in GRIDS:
        raise flag_rules.not_one_of("--schedule", name, (*GRIDS, fitted.STATS_GRID))
    return name


def _fewest_steps(grid: str) -> int:
    return 2 if grid == fitted.STATS_GRID else min_steps(grid)


def pc_options(sampler: str, settings: SamplingSettings) -> PCOptions | None:
    """The PC family's parts a sampling section names (None for the other samplers)."""
    return PCOptions.from_settings(settings, sampler) if sampler_info(sampler).pc_grid else None


def _calls(sampler: str, options: PCOptions | None) -> tuple[int, int]:
    """(calls per step, calls added once per grid) of `sampler` run with `options`."""
    info = sampler_info(sampler)
    if info.pc_grid and options is not None:
        return options.for_sampler(sampler).nfe_per_step(), 0
    return info.nfe_per_step, info.nfe_offset


def nfe_for(sampler: str, n: int, options: PCOptions | None = None) -> int:
    """Score calls of `n` steps of `sampler`; for the PC family those of `options` (None: the
    reference's parts, as the registry counts)."""
    per_step, offset = _calls(sampler, options)
    return per_step * int(n) + offset


def steps_for_nfe(sampler: str, budget: int, options: PCOptions | None = None, grid: str | None = None) -> int:
    """The largest n with nfe_for(sampler, n, options) <= budget on `grid` (None: the sampler's
    default); a PdsError if not even the grid's fewest steps fit."""
    per_step, offset = _calls(sampler, options)
    n = (int(budget) - offset) // per_step
    low = _fewest_steps(grid_name(sampler, grid))
    if n < low:
        raise PdsError(f"--nfe {budget} is too small for {sampler}: its {low} steps take "
                       f"{nfe_for(sampler, low, options)} network calls")
    return n


def plan(sampler: str, *, settings: SamplingSettings, steps: int | None = None, nfe: int | None = None,
         speed_up: float | None = None, schedule: str | None = None, options: PCOptions | None = None,
         filters=None) -> Plan:
    """The grid, step count and score calls of a run of `sampler` (see the module docstring)."""
    check_counts(steps=steps, nfe=nfe, speed_up=speed_up)
    grid = grid_name(sampler, schedule)
    if options is None or not sampler_info(sampler).pc_grid:
        options = pc_options(sampler, settings)
    else:
        options = options.for_sampler(sampler)
    reason = ""
    if nfe is not None:
        if nfe < 1:
            raise PdsError(f"--nfe must be at least 1, got {nfe}")
        steps = steps_for_nfe(sampler, nfe, options, grid)
        reason = f"{sampler}: {steps} steps fit in {nfe} network calls"
    if grid == fitted.STATS_GRID:
        built = fitted.grid_for_filters(sampler, filters, settings, count_steps(settings, steps, speed_up))
    else:
        built = make_steps(grid, settings, steps, speed_up=speed_up)
    return Plan(sampler, grid, built, nfe_for(sampler, len(built), options), options, reason)
