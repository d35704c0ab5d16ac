"""Flags -> a checked SampleJob. Every `pds sample` flag is checked once: by Typer (ranges) or here.

`build_job` checks what it can before the slow model load (folder rules, sampler, schedule,
numbers), opens the model and the filters (pdscli.sample.model checks their flags), builds the
step grid and alpha once, and refuses a batch that cannot fit in memory before allocating it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from pdscli.errors import PdsError
from pdscli.fsutil import LOCK_NAME, FolderLock, prepare_out_dir
from pdscli.models import builtin
from pdscli.noise import SEED_MAX
from pdscli.precondition import Preconditioner
from pdscli.precondition.alpha import AlphaChoice, check_alpha, choose_alpha
from pdscli.sample.job import SampleJob
from pdscli.sample.model import ANALYTIC_MODELS, ModelSpec, open_filters, open_model
from pdscli.samplers import Steps, fitted, sampler_info
from pdscli.samplers.pc import corrector_stalls
from pdscli.samplers.plan import Plan, check_counts, grid_name, plan
from pdscli.samplers.recommend import BudgetChoice, choose_for_budget
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
    step_graphs: bool = False

    @property
    def has_filter_files(self) -> bool:
        return bool(self.masks or self.freq_mask or self.space_mask)


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
    have = _device_memory(device)
    if have and need > have:
        most = max(1, have // (STATE_COPIES * math.prod(shape) * 4))
        raise PdsError(
            f"a batch of {batch} samples of {'x'.join(map(str, shape))} needs at least {need / 2**30:.3g} GiB on "
            f"{device}, which has {have / 2**30:.3g} GiB; pass a smaller --batch-size (at most about {most})"
        )


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: the run's out-of-memory message is the fallback


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
    check_alpha(flags.alpha)  # a bad number fails before the slow model load
    if not 0 <= flags.seed <= SEED_MAX:
        raise PdsError(f"--seed must be between 0 and 2^64-1 = {SEED_MAX} (the noise generator's key), got {flags.seed}")
    check_counts(steps=flags.steps, nfe=flags.nfe, speed_up=flags.speed_up)
    if flags.speed_up is not None and not (math.isfinite(flags.speed_up) and flags.speed_up > 0):
        raise PdsError(f"--speed-up must be a positive number, got {flags.speed_up:g}")
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
                         given_filters=has_filters, builtin_filters=builtin_filters, budget=budget)


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
        on_error.pop_all()  # set up: the run holds the lock from here and releases it
    alpha, budget = parts.alpha, choice.budget
    return SampleJob(
        model=model, sampler=choice.sampler, steps=parts.steps, out=out, num_samples=flags.num_samples,
        batch_size=flags.batch_size, seed=flags.seed, snr=settings.snr,  # --snr is already in the settings
        precond=parts.precond, per_sample_step=flags.per_sample_step, resume=flags.resume, force=flags.force,
        step_graphs=flags.step_graphs,
        schedule=choice.schedule, alpha=alpha.alpha if parts.precond is not None else None,
        alpha_given=alpha.given if alpha is not None else None, filters=filters_info,
        precision=model.info.get("precision") or spec.precision or "fp32",  # what the model says it runs at
        steps_flag=choice.steps, speed_up_flag=choice.speed_up, model_load_s=load_s,
        nfe_budget=None if budget is None else {"budget": flags.nfe, "planned": parts.plan.nfe,
                                                "reason": parts.plan.reason},
        sampler_options=parts.options, filter_off=alpha.note if alpha is not None and alpha.off else None,
        warnings=parts.warnings, lock=held,
    )


def _apply_budget(spec: ModelSpec, flags: SampleFlags, *, has_filters: bool):
    """--nfe: the flags with the chosen sampler and grid filled in, and the choice (the steps
    come with the model's settings, `SamplerChoice.plan`). A recommended sampler that takes no
    filters runs without them (`choice.filters`; its reason says so)."""
    budget = choose_for_budget(flags.nfe, sampler=flags.sampler, schedule=flags.schedule,
                               filters=has_filters or spec.uses_builtin, analytic=spec.model in ANALYTIC_MODELS)
    return dataclasses.replace(flags, sampler=budget.sampler, schedule=budget.grid), budget
