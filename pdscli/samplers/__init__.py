"""Samplers: every sampler a short function `sampler(score, noise, steps, ...) -> x`, the step
grids they walk (`grids`), the helpers their steps share (`common`), and one registry (name ->
function, NFE per step, deterministic or not). The modules are named for their family: `pc`
(predictor-corrector, PDS), `accelerated`, `dpm`, `edm`, `sigma_multistep`; `fitted` holds the grids
fitted to data statistics, `plan` fits a sampler to a budget of calls and `recommend` is the measured
choice behind `--nfe`; `get_sampler(name)` is the function.

Imports only the base layer (errors, settings) and its own modules.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from pdscli import flag_rules
from pdscli.samplers import accelerated, dpm, edm, pc, sigma_multistep
from pdscli.samplers.grids import VE_EPS, Steps, pc_steps

__all__ = [
    "REGISTRY",
    "VE_EPS",
    "SamplerInfo",
    "Steps",
    "get_sampler",
    "nfe_count",
    "pc_steps",
    "sampler_info",
    "sampler_kwargs",
]


@dataclass(frozen=True)
class SamplerInfo:
    """What the run and bench need to know about a sampler besides its function.

    nfe_per_step: score calls per step; nfe_offset: added once per grid (accel-ode2 saves the
    second call on its last step). deterministic: a probability-flow ODE solver (the noise is
    only the prior). pc_grid: walks score_sde's PC grid (`pc_steps`) rather than the sampler grids.
    grid: the grid it walks when --schedule is not given. summary: what it is, in one line.
    """

    name: str
    fn: Callable
    nfe_per_step: int
    deterministic: bool
    pc_grid: bool
    nfe_offset: int = 0
    grid: str = "geometric"
    summary: str = ""  # one line for README's table and the help texts (scripts/readme_samplers.py)

    def nfe(self, n_steps: int) -> int:
        return self.nfe_per_step * int(n_steps) + self.nfe_offset

    @property
    def keywords(self) -> frozenset[str]:
        """The keywords `fn` takes besides score, noise and steps (its keyword-only parameters):
        precond and callback for every sampler, snr, per_sample_step and options for the PC family."""
        return frozenset(p.name for p in inspect.signature(self.fn).parameters.values() if p.kind is p.KEYWORD_ONLY)


REGISTRY: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("pc", pc.pc, 2, False, True, grid="pc",
                    summary="score_sde's predictor-corrector (reverse diffusion + Langevin), the baseline"),
        SamplerInfo("pds", pc.pds, 2, False, True, grid="pc",
                    summary="the same loop preconditioned with filters (`--masks`, or the reference's `.npy` files)"),
        SamplerInfo("predictor", pc.predictor, 1, False, True, grid="pc",
                    summary="the PC loop's predictor alone (reverse diffusion unless the config names another)"),
        SamplerInfo("corrector", pc.corrector, 1, False, True, grid="pc",
                    summary="the PC loop's annealed Langevin corrector alone"),
        SamplerInfo("ddim", accelerated.ddim, 1, True, False,
                    summary="Euler in sigma on the probability-flow ODE; 1st order"),
        SamplerInfo("accel-ode", accelerated.accel_ode, 1, True, False,
                    summary="Li et al.'s accelerated DDIM: two-step multistep, 2nd order"),
        SamplerInfo("accel-ode2", accelerated.accel_ode2, 2, True, False, nfe_offset=-1,
                    summary="Li et al.'s accelerated DDIM with two calls per step: single-step, 2nd order"),
        SamplerInfo("ddpm", accelerated.ddpm, 1, False, False,
                    summary="reverse diffusion only (score_sde's predictor)"),
        SamplerInfo("accel-sde", accelerated.accel_sde, 1, False, False,
                    summary="Li et al.'s accelerated DDPM"),
        SamplerInfo("dpm++2m", dpm.dpmpp_2m, 1, True, False,
                    summary="DPM-Solver++(2M): data prediction, two-step multistep, 2nd order"),
        SamplerInfo("dpm++3m", dpm.dpmpp_3m, 1, True, False,
                    summary="DPM-Solver++(3M): three-step multistep, 3rd order"),
        SamplerInfo("dpm++2m-sde", dpm.dpmpp_2m_sde, 1, False, False,
                    summary="DPM-Solver++(2M) SDE (eta 1): the reverse SDE, exponential integrator"),
        SamplerInfo("dpm++2m-sde-mid", dpm.dpmpp_2m_sde_midpoint, 1, False, False,
                    summary="DPM-Solver++(2M) SDE (eta 1) with the midpoint correction"),
        SamplerInfo("dpm++3m-sde", dpm.dpmpp_3m_sde, 1, False, False,
                    summary="DPM-Solver++(3M) SDE (eta 1)"),
        SamplerInfo("res-multistep", dpm.res_multistep, 1, True, False,
                    summary="RES multistep (Zhang et al.): 2M with the exact phi2 weight on D's difference, 2nd order"),
        SamplerInfo("heun", edm.heun, 2, True, False, nfe_offset=-1,
                    summary="EDM Algorithm 1: Heun in sigma, 2nd order"),
        SamplerInfo("edm-sde", edm.edm_sde, 2, False, False, nfe_offset=-1,
                    summary="EDM Algorithm 2: churn, then Heun"),
        SamplerInfo("euler-a", edm.euler_ancestral, 1, False, False,
                    summary="Euler ancestral (the DDPM posterior's split of each step's noise)"),
        SamplerInfo("ipndm", sigma_multistep.ipndm, 1, True, False,
                    summary="iPNDM: Adams-Bashforth in sigma with equal-step weights, up to 4 slopes"),
        SamplerInfo("ipndm-v", sigma_multistep.ipndm_v, 1, True, False,
                    summary="iPNDM-v: Adams-Bashforth in sigma with variable-step weights (Zhou et al.'s), up to 4 slopes"),
        SamplerInfo("gradient-estimation", sigma_multistep.gradient_estimation, 1, True, False,
                    summary="Permenter & Yuan's gradient-estimation sampler (gamma 2)"),
    )
}

def sampler_info(name: str, flag: str = "--sampler") -> SamplerInfo:
    """The registry entry for `name`; a PdsError listing the choices if unknown (`flag` is what
    the user typed the name in)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise flag_rules.not_one_of(flag, name, REGISTRY) from None


def sampler_kwargs(name: str, **available) -> dict:
    """Of the keywords a run has (precond, snr, per_sample_step, callback, options, ...), those
    sampler `name` takes: the one way the run, bench and graph code call a sampler."""
    takes = sampler_info(name).keywords
    return {k: v for k, v in available.items() if k in takes}


def get_sampler(name: str) -> Callable:
    """The sampler called `name` on the command line."""
    return sampler_info(name).fn


def nfe_count(name: str, n_steps: int) -> int | None:
    """Score evaluations the sampler `name` spends on `n_steps` steps (None: unknown sampler)."""
    info = REGISTRY.get(name)
    return None if info is None else info.nfe(n_steps)
