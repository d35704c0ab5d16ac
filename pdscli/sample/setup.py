"""Flags -> a checked SampleJob. Every `pds sample` flag is checked once, where its typed holder is
made: SampleFlags (the run, pdscli.flag_rules) and ModelSpec (the model, pdscli.sample.model).

`build_job` checks what it can before the slow model load (folder rules, sampler, schedule,
numbers), opens the model and the filters (pdscli.sample.model checks their flags), builds the
step grid and alpha once, and refuses a batch that cannot fit in memory before allocating it.
"""

from __future__ import annotations

import contextlib
import math
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pdscli import flag_rules
from pdscli.devices import memory_bytes
from pdscli.engines.graph_step import CUDA_GRAPH, STEP_PATHS
from pdscli.errors import PdsError
from pdscli.fsutil import LOCK_NAME, FolderLock, prepare_out_dir
from pdscli.models import builtin
from pdscli.precondition import Preconditioner
from pdscli.precondition.alpha import AlphaChoice, choose_alpha
from pdscli.sample.job import SampleJob
from pdscli.sample.pilot import Candidate, choose_by_pilot, own_gaussian
from pdscli.sample.model import ANALYTIC_MODELS, ModelSpec, check_filter_flags, scale_count, data_gaussian, open_filters, open_model, refresh_hint
from pdscli.samplers import Steps, fitted, sampler_info
from pdscli.samplers.pc import corrector_stalls
from pdscli.samplers.plan import Plan, check_counts, grid_name, nfe_for, plan, steps_for_nfe
from pdscli.samplers.recommend import BudgetChoice, choose_for_budget, recommend
from pdscli.samplers.teleport import auto_ratio, choose_teleport, parse_teleport
from pdscli.settings import SamplingSettings
PNG_CHANNELS = (1, 3)  # grey or RGB: what an 8-bit PNG of a sample can hold
STATE_COPIES = 4  # a sampler holds at least x, the noise, the score and x_mean of a batch


@dataclass(frozen=True)
class SampleFlags:
    """The run's flags besides the model's (pdscli.sample.model.ModelSpec)."""

    out: Path
    masks: Path | None = None
    freq_mask: Path | None = None
    space_mask: Path | None = None
    alpha: str | None = None  # a positive number or "auto"; None: the sampler's default (pdscli.precondition.alpha)
    sampler: str | None = None  # None: pds with filters, else pc
    steps: int | None = None
    speed_up: float | None = None
    schedule: str | None = None  # None: the sampler's default grid (pc for the PC family)
    nfe: int | None = None  # a budget of network calls instead of --steps (pdscli.samplers.recommend)
    per_sample_step: bool = False
    num_samples: int = 16
    batch_size: int = 16
    seed: int = 0
    force: bool = False
    resume: bool = False
    step_graphs: bool = False  # --step-graphs: the same as whole_step="cuda-graph"
    whole_step: str = "off"  # how whole steps run: off, cuda-graph or compile (pdscli.engines.graph_step.STEP_PATHS)
    teleport: str | None = None  # "auto" (None), "off" or a noise level (pdscli.samplers.teleport)

    def __post_init__(self):
        """The run flags' one check (pdscli.flag_rules, shared with pds bench): whoever makes a
        SampleFlags, the command line or the API, gets the same answer, and what holds one trusts it."""
        checked = {"alpha": flag_rules.alpha(self.alpha), "seed": flag_rules.seed(self.seed),
                   "num_samples": flag_rules.steps(self.num_samples, "--num-samples"),
                   "batch_size": flag_rules.steps(self.batch_size, "--batch-size")}
        for name, rule in (("steps", scale_count), ("speed_up", flag_rules.speed_up),
                           ("nfe", lambda v: scale_count(v, "--nfe"))):
            if getattr(self, name) is not None:
                checked[name] = rule(getattr(self, name))
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "whole_step", whole_step_path(self.whole_step, self.step_graphs))
        check_counts(steps=self.steps, nfe=self.nfe, speed_up=self.speed_up)
        check_filter_flags(self.masks, self.freq_mask, self.space_mask)

    @property
    def has_filter_files(self) -> bool:
        return bool(self.masks or self.freq_mask or self.space_mask)


def whole_step_path(whole_step, step_graphs: bool) -> str:
    """--whole-step's path; --step-graphs alone is --whole-step cuda-graph (its meaning before
    --whole-step), and with another path the two flags disagree."""
    path = flag_rules.one_of("--whole-step", whole_step, STEP_PATHS)
    if not step_graphs:
        return path
    if path not in ("off", CUDA_GRAPH):
        raise PdsError(f"--step-graphs is --whole-step {CUDA_GRAPH}: drop it to run --whole-step {path}")
    return CUDA_GRAPH


def resolve_sampler_name(name: str | None, *, has_filters: bool) -> str:
    chosen = name or ("pds" if has_filters else "pc")
    sampler_info(chosen)  # unknown names fail here, before a slow model load
    if chosen == "pds" and not has_filters:
        raise PdsError("the pds sampler needs filters: pass --masks FILE (from `pds filters`) or --freq-mask/--space-mask")
    if name == "pc" and has_filters:
        # `pc` is the vanilla baseline; with a preconditioner it would silently be PDS.
        raise PdsError("--sampler pc is vanilla predictor-corrector: drop the filters, or use --sampler pds")
    return chosen


def preconditioner_for(filters, alpha: str | None, model, sampler: str, n_steps: int):
    """(Preconditioner or None, AlphaChoice or None): --alpha for this sampler and step count; a
    calibrated auto may switch the filters off (the choice's note says why)."""
    if filters is None:
        return None, None
    choice = choose_alpha(alpha, model.settings, n_steps, sampler)
    if choice.off:
        return None, choice
    return Preconditioner.from_filters(filters, choice.alpha, model.device), choice


def sampler_parts(run: Plan, snr: float) -> tuple[dict, list[str]]:
    """The sampler's keywords for the run's PC parts (`Plan.sampler_options`) and warnings about them."""
    warnings = []
    if run.options is not None and run.options.predictor == "none":
        stall = corrector_stalls(run.steps, snr, run.options.n_steps_each)
        if stall:
            warnings.append(stall)
    return run.sampler_options(), warnings


def check_fits_in_memory(batch: int, shape: tuple[int, ...], device: torch.device) -> None:
    """Refuse, before allocating anything, a batch whose sampler state alone exceeds the device's memory."""
    need = STATE_COPIES * batch * math.prod(shape) * 4
    have = memory_bytes(device)
    if have and need > have:
        most = have // (STATE_COPIES * math.prod(shape) * 4)
        # A smaller batch helps only if one sample fits; else the image size (or the device) must change.
        fix = (f"pass a smaller --batch-size (at most about {most})" if most >= 1 else
               "even one sample does not fit: use a smaller image size or a device with more memory")
        raise PdsError(
            f"a batch of {batch} samples of {'x'.join(map(str, shape))} needs at least {need / 2**30:.3g} GiB on "
            f"{device}, which has {have / 2**30:.3g} GiB; {fix}"
        )


@contextlib.contextmanager
def _removed_if_left_empty(out: Path):
    """The output folder is made early (to fail fast); a set-up error must not leave it behind,
    holding nothing but the lock this run made."""
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                (out / LOCK_NAME).unlink(missing_ok=True)
                out.rmdir()  # only succeeds when empty
        raise


@dataclass(frozen=True)
class SamplerChoice:
    """What the flags choose before any model is open: the sampler, its grid, the step flags it
    runs with and which filters it uses. `pds sample` and `pdscli.sample` both come here."""

    sampler: str
    schedule: str
    steps: int | None  # --steps, or the built-in model's default when no step flag is given
    speed_up: float | None
    alpha: str | None
    given_filters: bool  # the filters the caller gave are used (an --nfe plan may leave them unused)
    builtin_filters: bool  # the built-in model's own filters are used
    budget: BudgetChoice | None = None  # --nfe's sampler and grid (the steps come with the model's settings)
    teleport: str | float = "auto"  # --teleport, checked (pdscli.samplers.teleport.parse_teleport)

    def plan(self, settings: SamplingSettings, filters=None) -> Plan:
        """The grid, steps and score calls for a model's settings (pdscli.samplers.plan); `filters`
        are the statistics a `stats` grid is fitted to."""
        if self.budget is not None:
            return self.budget.plan(settings, filters=filters)
        return plan(self.sampler, settings=settings, steps=self.steps, speed_up=self.speed_up, schedule=self.schedule,
                    filters=filters)


def choose_sampler(spec: ModelSpec, flags: SampleFlags, *, has_filters: bool | None = None) -> SamplerChoice:
    """Check the sampling flags (no model needed) and choose the sampler, grid and filters.
    `has_filters`: filters were given (default: filter files among the flags)."""
    has_filters = flags.has_filter_files if has_filters is None else has_filters
    teleport = parse_teleport(flags.teleport)
    budget = None
    if flags.nfe is not None:
        flags, budget = _apply_budget(spec, flags, has_filters=has_filters)
        if budget.chosen and not budget.filters:
            has_filters = False
    # The built-in model runs as its docs say (PDS with its own filters, few steps) unless told otherwise.
    builtin_filters = spec.uses_builtin and not has_filters and flags.sampler in (None, "pds")
    if budget is not None and budget.chosen:
        builtin_filters = spec.uses_builtin and not has_filters and budget.filters
    if flags.schedule == fitted.STATS_GRID:
        # The grid is fitted to the filters' statistics; they are not a preconditioner then.
        if not (has_filters or spec.uses_builtin):
            raise PdsError(f"--schedule {fitted.STATS_GRID} fits the grid to the data's statistics: pass --masks FILE "
                           "(from `pds filters` on the model's data or samples)")
        builtin_filters = spec.uses_builtin and not has_filters
    sampler = resolve_sampler_name(flags.sampler, has_filters=(has_filters or builtin_filters)
                                   and flags.schedule != fitted.STATS_GRID)
    schedule = grid_name(sampler, flags.schedule)
    steps = flags.steps
    if spec.uses_builtin and flags.steps is None and flags.speed_up is None:
        steps = builtin.DEFAULT_STEPS
    return SamplerChoice(sampler=sampler, schedule=schedule, steps=steps, speed_up=flags.speed_up, alpha=flags.alpha,
                         given_filters=has_filters, builtin_filters=builtin_filters, budget=budget,
                         teleport=teleport)


@dataclass(frozen=True)
class SamplingParts:
    """What a sampler runs with for an open model: the grid, the preconditioner and the PC parts."""

    steps: Steps
    precond: Preconditioner | None
    alpha: AlphaChoice | None
    options: dict
    warnings: tuple[str, ...]
    plan: Plan


def sampling_parts_for(model, choice: SamplerChoice, filters) -> SamplingParts:
    """The grid, the preconditioner (--alpha for this sampler and step count) and the PC parts."""
    run = choice.plan(model.settings, filters)
    if run.grid == fitted.STATS_GRID:
        filters = None  # they made the grid
    precond, alpha = preconditioner_for(filters, choice.alpha, model, choice.sampler, len(run.steps))
    options, warnings = sampler_parts(run, model.settings.snr)
    if alpha is not None and alpha.off:
        warnings.insert(0, alpha.note)
    return SamplingParts(steps=run.steps, precond=precond, alpha=alpha, options=options, warnings=tuple(warnings),
                         plan=run)


def build_job(spec: ModelSpec, flags: SampleFlags, *, lock: bool = True) -> SampleJob:
    """Check every flag (cheap checks before the slow model load), open the model and filters, make the job.

    With `lock` (one process, or torchrun's rank 0) the output folder's lock is taken before the
    model load and travels in the job to the run, which releases it after its last write: a
    second run started meanwhile is refused instead of merging its files with this one's."""
    out = Path(flags.out)
    choice = choose_sampler(spec, flags)
    files = (flags.masks, flags.freq_mask, flags.space_mask) if choice.given_filters else (None, None, None)
    with _removed_if_left_empty(out), contextlib.ExitStack() as on_error:
        prepare_out_dir(out, force=flags.force, resume=flags.resume)
        held = FolderLock(out, what="pds sample run") if lock else None
        if held is not None:
            on_error.callback(held.release)
        t0 = time.perf_counter()
        model = open_model(spec)
        load_s = time.perf_counter() - t0
        settings = model.settings
        if settings.num_channels not in PNG_CHANNELS:
            raise PdsError(f"pds sample writes PNGs of 1 or 3 channels; {model.name} makes {settings.num_channels}")
        check_fits_in_memory(min(flags.batch_size, flags.num_samples), settings.shape, model.device)
        filters, filters_info = open_filters(*files, settings=settings, use_builtin=choice.builtin_filters)
        parts = sampling_parts_for(model, choice, filters)
        start, gaussian, pilot, hint = start_for(spec, flags, model, choice, parts,
                                                 *statistics_at_hand(spec, flags, settings, filters))
        on_error.pop_all()  # set up: the run holds the lock from here and releases it
    alpha, budget = parts.alpha, choice.budget
    return SampleJob(
        model=model, sampler=start.sampler, steps=start.steps, out=out, num_samples=flags.num_samples,
        batch_size=flags.batch_size, seed=flags.seed, snr=settings.snr,  # --snr is already in the settings
        precond=parts.precond, per_sample_step=flags.per_sample_step, resume=flags.resume, force=flags.force,
        step_path=flags.whole_step,
        schedule=start.grid, alpha=alpha.alpha if parts.precond is not None else None,
        alpha_given=alpha.given if alpha is not None else None, filters=filters_info,
        precision=model.info.get("precision") or spec.precision or "fp32",  # what the model says it runs at
        steps_flag=choice.steps, speed_up_flag=choice.speed_up, model_load_s=load_s,
        nfe_budget=None if budget is None else budget_record(flags.nfe, parts.plan, start, pilot),
        sampler_options=parts.options, filter_off=alpha.note if alpha is not None and alpha.off else None,
        warnings=parts.warnings + ((hint,) if hint else ()), lock=held, teleport=start.teleport,
        data_gaussian=gaussian if start.teleport.sigma_t is not None else None,
    )


def start_for(spec: ModelSpec, flags: SampleFlags, model, choice: SamplerChoice, parts: SamplingParts, stats,
              stats_path=None):
    """(the Candidate the run starts with, the data's Gaussian or None, the pilot's record or None, a refresh hint or None):
    --teleport for the chosen sampler, and on a network under --nfe with statistics the pilot.
    `stats`: the filters at hand, used or not (`statistics_at_hand`); `stats_path` their file, for the hint."""
    settings = model.settings
    blocked = teleport_blocked(choice.sampler, parts.precond, choice.schedule)
    gaussian = data_gaussian(spec, settings, stats)
    hint = None
    if gaussian is None and stats is not None and not blocked:
        hint = refresh_hint(stats, stats_path)
        if isinstance(choice.teleport, float):
            raise PdsError(hint)
        if choice.teleport == "off" or auto_ratio(choice.sampler, parts.plan.nfe) is None:
            hint = None  # teleportation would not run anyway: no line
    start = start_at(settings, choice.teleport, gaussian, sampler=choice.sampler, schedule=parts.plan.grid,
                     n_steps=len(parts.steps), grid=parts.steps, blocked=blocked)
    pilot = None
    if pilot_applies(spec, choice.budget, parts.precond):
        start, pilot = pick_by_pilot(model, gaussian, start, settings, choice.teleport, nfe=flags.nfe,
                                     schedule=flags.schedule, seed=flags.seed)
    return start, gaussian, pilot, hint


def statistics_at_hand(spec: ModelSpec, flags: SampleFlags, settings: SamplingSettings, filters) -> tuple:
    """(Filters or None, their file or None): the filters the run uses, else the files as given (an
    --nfe plan may run without them), else the built-in model's own file."""
    if filters is not None or not (flags.has_filter_files or spec.uses_builtin):
        return filters, flags.masks or flags.freq_mask
    if flags.has_filter_files:
        return open_filters(flags.masks, flags.freq_mask, flags.space_mask, settings=settings)[0], flags.masks or flags.freq_mask
    return open_filters(settings=settings, use_builtin=True)[0], builtin.FILTERS


def teleport_blocked(sampler: str, precond, schedule: str) -> str | None:
    """Why this run cannot teleport, or None."""
    if schedule == fitted.STATS_GRID:
        return f"--schedule {fitted.STATS_GRID} fits its grid from sigma_max"
    if sampler_info(sampler).pc_grid:
        return f"{sampler} walks the reference's PC grid from sigma_max"
    if precond is not None:
        return "a preconditioned sampler starts from the filters' noise, which has no closed-form teleport"
    return None


def start_at(settings: SamplingSettings, teleport_flag, gaussian, *, sampler: str, schedule: str, n_steps: int,
             grid: Steps | None = None, blocked: str | None = None) -> Candidate:
    """The sampler with its grid, from sigma_max or (--teleport) from sigma_t: the grid's own
    spacing on [sigma_min, sigma_t] with the same number of steps (`grid`: the one from sigma_max, if made)."""
    teleport = choose_teleport(teleport_flag, gaussian=gaussian, sampler=sampler, nfe=nfe_for(sampler, n_steps),
                               sigma_min=settings.sigma_min, sigma_max=settings.sigma_max, blocked=blocked)
    if teleport.sigma_t is not None:
        grid = plan(sampler, settings=settings.replace(sigma_max=teleport.sigma_t), steps=n_steps, schedule=schedule).steps
    elif grid is None:
        grid = plan(sampler, settings=settings, steps=n_steps, schedule=schedule).steps
    return Candidate(sampler, schedule, grid, teleport)


def pilot_applies(spec: ModelSpec, budget, precond) -> bool:
    """--nfe without --sampler (a chosen plan) on a network: the pilot picks between the samplers measured
    best on exact scores and on a weak network."""
    return budget is not None and budget.chosen and spec.model not in ANALYTIC_MODELS and precond is None


def pick_by_pilot(model, gaussian, planned: Candidate, settings: SamplingSettings, teleport_flag, *, nfe: int,
                  schedule: str | None, seed: int) -> tuple[Candidate, dict | None]:
    """The planned start against the exact-score recommendation at the same budget, by a pilot judged
    against the data's Gaussian: the statistics at hand, else the one the model's own denoiser shows
    (its network calls counted in the pilot's; it only judges, the run does not teleport with it)."""
    exact = recommend(nfe, filters=False, analytic=True)
    if exact.sampler == planned.sampler:
        return planned, None
    grid = grid_name(exact.sampler, schedule or exact.grid)
    other = start_at(settings, teleport_flag, gaussian, sampler=exact.sampler, schedule=grid,
                     n_steps=steps_for_nfe(exact.sampler, nfe, grid=grid))
    if gaussian is not None:
        return choose_by_pilot(model, gaussian, [planned, other], seed=seed)
    own, calls = own_gaussian(model, seed=seed)
    return choose_by_pilot(model, own, [planned, other], seed=seed, statistics_calls=calls)


def budget_record(nfe: int, planned: Plan, start: Candidate, pilot: dict | None) -> dict:
    """run.json's nfe_budget: the budget, what the run spends per image, why, and the pilot if one ran."""
    sampler = start.sampler
    spent = planned.nfe if sampler == planned.sampler else nfe_for(sampler, len(start.steps))
    record = {"budget": nfe, "planned": spent, "reason": planned.reason}
    if pilot is not None:
        record["reason"] = (f"pilot of {pilot['samples']} samples per candidate at {nfe} network calls "
                            f"({pilot['nfe']} in all), spectra against the data's: {sampler}")
        record["pilot"] = pilot
    return record




def _apply_budget(spec: ModelSpec, flags: SampleFlags, *, has_filters: bool):
    """--nfe: the flags with the chosen sampler and grid filled in, and the choice (the steps
    come with the model's settings, `SamplerChoice.plan`). A recommended sampler that takes no
    filters runs without them (`choice.filters`; its reason says so)."""
    budget = choose_for_budget(flags.nfe, sampler=flags.sampler, schedule=flags.schedule,
                               filters=has_filters or spec.uses_builtin, analytic=spec.model in ANALYTIC_MODELS,
                               statistics=parse_teleport(flags.teleport) != "off")
    return dataclasses.replace(flags, sampler=budget.sampler, schedule=budget.grid), budget
