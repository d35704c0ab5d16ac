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

`choose_for_budget` turns a budget into a sampler and grid, and a sentence saying why; its
`plan(settings)` adds the step count (`pdscli.samplers.plan`), which can depend on the model's
PC parts (a config's `n_steps_each`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdscli.errors import PdsError
from pdscli.samplers.pc import PCOptions
from pdscli.samplers.plan import Plan, grid_name, plan
from pdscli.settings import SamplingSettings

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


# exact, without the data's statistics (--teleport off; with them these budgets teleport, where
#   dpm++2m leads): the few budgets where another ODE solver wins, by the Gaussian's exact KL on the
#   geometric grid (docs/data/peers-gaussian.json holds the peers'): 5 NFE iPNDM 4.46e-3 (dpm++2m
#   5.94e-2); 6-8 NFE res-multistep 5.70e-3 / 2.05e-3 / 1.81e-3 (dpm++2m 2.32e-2 / 9.66e-3 /
#   3.49e-3); from 9 NFE dpm++2m again (1.18e-3 against 2.27e-3). The first row whose bound is >= the budget.
PLAIN_EXACT: tuple[tuple[int, Choice], ...] = ((5, Choice("ipndm", "geometric")), (8, Choice("res-multistep", "geometric")))


def column(*, filters: bool, analytic: bool) -> str:
    """Which column applies: exact for analytic models, else network with or without filters."""
    return EXACT if analytic else (FILTERS if filters else NETWORK)


def recommend(nfe: int, *, filters: bool, analytic: bool, statistics: bool = True) -> Choice:
    """The measured best sampler and grid at `nfe` score calls; `statistics`: the run may teleport."""
    key = column(filters=filters, analytic=analytic)
    if key == EXACT and not statistics:
        for bound, choice in PLAIN_EXACT:
            if nfe <= bound:
                return choice
    for bound, row in TABLE:
        if nfe <= bound:
            return row[key]
    raise AssertionError("the last row takes every budget")


@dataclass(frozen=True)
class BudgetChoice:
    """What a budget of `nfe` network calls runs, before the model's settings are known: the
    sampler, its grid, whether the filters at hand are used, and why. `plan(settings)` adds the steps (`pdscli.samplers.plan`: the most that fit, counted
    with the PC parts the settings name)."""

    nfe: int
    sampler: str
    grid: str
    filters: bool  # whether the run uses the filters at hand
    why: str  # the sampler's reason, before the steps are known
    chosen: bool = False  # the sampler is the recommendation (no --sampler given)
    note: str = ""  # said after the steps

    def plan(self, settings: SamplingSettings, options: PCOptions | None = None, filters=None) -> Plan:
        """The run: the most steps of `sampler` whose score calls fit the budget; its reason says
        why. `filters`: the statistics a `stats` grid is fitted to."""
        try:
            run = plan(self.sampler, settings=settings, nfe=self.nfe, schedule=self.grid, options=options,
                       filters=filters)
        except PdsError as e:
            if not self.chosen:
                raise
            # The user named no sampler: say that pds picked it, not as if they had chosen it.
            raise PdsError(f"--nfe {self.nfe} is too small for the sampler pds picks without --sampler ({self.sampler}: "
                           f"{str(e).split(': ', 1)[-1]}); give a larger --nfe") from None
        n = len(run.steps)
        if self.chosen:
            reason = f"{self.why}, {n} steps{self.note}"
        else:
            reason = f"{self.why}: {n} steps fit in {self.nfe} network calls"
        return dataclasses.replace(run, reason=reason)


def choose_for_budget(nfe: int, *, sampler: str | None = None, schedule: str | None = None, filters: bool = False,
                      analytic: bool = False, statistics: bool = True) -> BudgetChoice:
    """A budget of `nfe` network calls -> the sampler and grid to run (no model needed).

    With `sampler`, that sampler (on `schedule` or its default grid). Without, the recommended
    one for the budget (`recommend`); `filters` says filters are at hand (the choice may leave
    them unused), `analytic` that the score is exact, `statistics` that the run may teleport."""
    if nfe < 1:
        raise PdsError(f"--nfe must be at least 1, got {nfe}")
    if sampler is not None:
        return BudgetChoice(nfe, sampler, grid_name(sampler, schedule), filters, f"--sampler {sampler}")
    key = column(filters=filters, analytic=analytic)
    choice = recommend(nfe, filters=filters, analytic=analytic, statistics=statistics)
    where = f"{key} column of docs/samplers.md"
    if key == EXACT and not statistics:
        where = "exact score without statistics, docs/samplers.md's peers"
    why = (f"recommended for {nfe} network calls ({where}): "
           f"{choice.sampler} on the {choice.grid} grid")
    note = "; the filters are not used (measured better without them at this budget)" if filters and not choice.filters else ""
    return BudgetChoice(nfe, choice.sampler, grid_name(choice.sampler, schedule or choice.grid),
                        filters and choice.filters, why, chosen=True, note=note)
