"""The recommended sampler and grid for a budget of network calls (`pds sample --nfe N`).

The table mirrors docs/samplers.md ("Recommendation per budget"), made by scripts/samplers_doc.py
from the measurements in docs/data/samplers.json. Three columns, because the measurements say the
answer depends on the score, not only on the budget:

  * exact: an analytic model (the exact score of `--model gaussian` / `mixture`): the
    probability-flow ODE solvers win (spectral KL, mode proportions);
  * network: a trained network: its score errors are not smoothed away by an ODE solver (the
    deterministic samplers leave ~9x the data's high-frequency energy on the built-in model at
    any budget), and putting noise back each step repairs them;
  * network + filters: the same, when PDS filters are at hand (given, or the built-in model's).

`plan_budget` turns a budget into a sampler, its step count and grid, and a sentence saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdscli.errors import PdsError
from pdscli.samplers import sampler_info
from pdscli.samplers.plan import steps_for_nfe

EXACT, NETWORK, FILTERS = "exact", "network", "network+filters"


@dataclass(frozen=True)
class Choice:
    sampler: str
    grid: str
    filters: bool = False  # runs with the PDS filters


# (largest budget of the row, {column: Choice}); the first row whose bound is >= the budget applies.
# Measured in docs/samplers.md ("Quality per budget"):
# exact, up to 50 NFE: DPM-Solver++(2M) on the log-uniform grid. 3M is 2-17x closer to the exact
#   ODE solution from 20 NFE on but 6x further at 10, and in distribution it is not measurably
#   better up to 50 (the Gaussian's KL sits at the Tweedie floor, the mixture's mode TV within the
#   sampling noise of the 256 samples), so the proven 2M stays; above 50, where both are converged
#   in distribution, 3M for its ODE accuracy (1.9e-6 against 9.1e-5 at 100 NFE).
# network (with or without filters): DPM-Solver++(2M) SDE passes the built-in model's classifier
#   check from 10 NFE on; every deterministic sampler fails it at any budget (~11x the data's
#   high-frequency energy), PDS fails below 40 NFE, accel-sde with filters fails on mode balance.
_NETWORK = Choice("dpm++2m-sde", "geometric")
TABLE: tuple[tuple[int, dict[str, Choice]], ...] = (
    (50, {EXACT: Choice("dpm++2m", "geometric"), NETWORK: _NETWORK, FILTERS: _NETWORK}),
    (10**9, {EXACT: Choice("dpm++3m", "geometric"), NETWORK: _NETWORK, FILTERS: _NETWORK}),
)


def column(*, filters: bool, analytic: bool) -> str:
    """Which column applies: exact for analytic models, else network with or without filters."""
    return EXACT if analytic else (FILTERS if filters else NETWORK)


def recommend(nfe: int, *, filters: bool, analytic: bool) -> Choice:
    """The measured best sampler and grid at `nfe` score calls."""
    key = column(filters=filters, analytic=analytic)
    for bound, row in TABLE:
        if nfe <= bound:
            return row[key]
    raise AssertionError("the last row takes every budget")


@dataclass(frozen=True)
class BudgetPlan:
    sampler: str
    steps: int
    grid: str | None  # None: the caller's --schedule, or the sampler's default
    filters: bool  # whether the run uses the filters at hand
    nfe: int  # score calls the plan spends (<= the budget)
    reason: str
    chosen: bool = False  # the sampler is the recommendation (no --sampler given)


def plan_budget(nfe: int, *, sampler: str | None = None, schedule: str | None = None, filters: bool = False,
                analytic: bool = False) -> BudgetPlan:
    """A budget of `nfe` network calls -> the sampler, steps and grid to run.

    With `sampler`, that sampler takes the most steps that fit (on `schedule` or its default grid).
    Without, the recommended one for the budget (`recommend`); `filters` says filters are at hand
    (the choice may leave them unused), `analytic` that the score is exact."""
    if nfe < 1:
        raise PdsError(f"--nfe must be at least 1, got {nfe}")
    if sampler is not None:
        info = sampler_info(sampler)
        n = steps_for_nfe(sampler, nfe)
        grid = schedule or info.grid
        return BudgetPlan(sampler, n, grid, filters, info.nfe(n), f"--sampler {sampler}: {n} steps fit in {nfe} network calls")
    key = column(filters=filters, analytic=analytic)
    choice = recommend(nfe, filters=filters, analytic=analytic)
    n = steps_for_nfe(choice.sampler, nfe)
    grid = schedule or choice.grid
    why = (f"recommended for {nfe} network calls ({key} column of docs/samplers.md): "
           f"{choice.sampler} on the {choice.grid} grid, {n} steps")
    if filters and not choice.filters:
        why += "; the filters are not used (measured better without them at this budget)"
    return BudgetPlan(choice.sampler, n, grid, filters and choice.filters, sampler_info(choice.sampler).nfe(n), why,
                      chosen=True)
