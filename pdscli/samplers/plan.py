"""A budget of network calls (`--nfe N`) -> a number of steps.

`steps_for_nfe(name, nfe)` is the most steps sampler `name` can take without spending more than
`nfe` score calls, from the registry's exact count (nfe_per_step * n + nfe_offset).
"""

from __future__ import annotations

from pdscli.errors import PdsError
from pdscli.samplers import sampler_info


def min_steps(name: str) -> int:
    """The fewest steps a sampler runs: 1 on the PC grid, 2 on the others (sigma_max ... sigma_min)."""
    return 1 if sampler_info(name).pc_grid else 2


def steps_for_nfe(name: str, nfe: int) -> int:
    """The largest n with nfe(n) <= nfe for sampler `name`; a PdsError if not even its fewest steps fit."""
    info = sampler_info(name)
    budget = int(nfe)
    n = (budget - info.nfe_offset) // info.nfe_per_step
    low = min_steps(name)
    if n < low:
        raise PdsError(f"--nfe {nfe} is too small for {name}: its {low} steps take {info.nfe(low)} network calls")
    return n
