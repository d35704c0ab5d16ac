"""Sampling runs: part `e2e` (vanilla PC at the full step count against PDS at 1/k of it) and
part `samplers` (each --samplers entry at equal NFE budgets), timed batch by batch on the same
noise and scored with the quality measure, the configurations interleaved.

The batches and their noise are planned as `pds sample` plans them (pdscli.sample.loop's
batch_indices, SampleNoise from (seed, i)); the loop itself is not sample's, which checks every
step for NaN (a device sync per step) and writes files: here nothing but the sampler may be
inside the timed call, and the samples stay in memory for the quality figure."""

from __future__ import annotations

import time
from typing import Callable

import torch

from pdscli.bench.config import QUICK_FULL_STEPS, BenchConfig
from pdscli.bench.fid import FidQuality
from pdscli.bench.model import BenchModel
from pdscli.bench.preconditioner import PreconditionerCache
from pdscli.bench.timing import summarize, sync
from pdscli.errors import PdsError
from pdscli.noise import SampleNoise
from pdscli.precondition import Preconditioner
from pdscli.sample.loop import batch_count, batch_indices
from pdscli.samplers import get_sampler, sampler_kwargs
from pdscli.samplers.plan import Plan, plan
from pdscli.score import CountingScore


class SamplingRun:
    """One sampler configuration, run batch by batch: samples of indices 0..count-1 (so every
    configuration sees the same noise), each full batch timed (synchronised wall clock around
    the sampler call: network, sampler arithmetic and noise draws together)."""

    def __init__(self, score: Callable, run: Plan, precond: Preconditioner | None, *, cfg: BenchConfig,
                 model: BenchModel):
        self.fn, self.counting, self.steps = get_sampler(run.sampler), CountingScore(score), run.steps
        self.options = sampler_kwargs(run.sampler, precond=precond, snr=model.settings.snr, **run.sampler_options())
        self.cfg, self.model = cfg, model
        self.times, self.outs, self.batches = [], [], 0

    def run_batch(self, k: int, count: int) -> None:
        """Planned batch k of `count` samples, cut as `pds sample` cuts a run."""
        batch, model = self.cfg.e2e_batch, self.model
        noise = SampleNoise(self.cfg.seed, batch_indices(k, count, batch), model.shape, model.device)
        sync(model.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = self.fn(self.counting, noise, self.steps, **self.options)
        sync(model.device)
        if len(noise) == batch:
            self.times.append(time.perf_counter() - t0)
        self.outs.append(x.detach().cpu())
        self.batches += 1

    def result(self) -> dict:
        samples = torch.cat(self.outs)
        return {"timing": {**summarize(self.times), "times_s": self.times}, "nfe": self.counting.calls // self.batches,
                "samples": samples, "finite": bool(torch.isfinite(samples).all())}


def run_interleaved(runs: list[SamplingRun], count: int, batch: int) -> list[dict]:
    """Batch k of every run, then batch k + 1 of every run, ...: a change in the machine's load
    (a shared machine) then falls on all the runs compared, not on whichever ran last."""
    for k in range(batch_count(count, batch)):
        for run in runs:
            run.run_batch(k, count)
    return [run.result() for run in runs]


def _run_record(label: str, run: Plan, result: dict, cfg: BenchConfig, quality, alpha: float | None,
                fid: FidQuality | None) -> dict:
    t = result["timing"]
    return {"label": label, "sampler": run.sampler, "steps": len(run.steps), "schedule": run.grid, "nfe": result["nfe"],
            "alpha": alpha, "batch": cfg.e2e_batch, "timing": t, "per_image_s": t["median_s"] / cfg.e2e_batch,
            "images_per_s": cfg.e2e_batch / t["median_s"], "finite": result["finite"],
            "quality": quality.measure(result["samples"]) if quality is not None else None,
            "fid": fid.measure(result["samples"]) if fid is not None else None}


def full_and_pds_steps(cfg: BenchConfig, settings) -> tuple[int, int]:
    """(vanilla steps, PDS steps): the model's num_scales (--quick: at most 40) and 1/k of it, or --steps."""
    full = cfg.full_steps or (min(settings.num_scales, QUICK_FULL_STEPS) if cfg.quick else settings.num_scales)
    pds = cfg.steps if cfg.steps is not None else int(full / cfg.speed_up)
    if pds < 1:
        raise PdsError(f"--speed-up {cfg.speed_up:g} leaves no step of {full}")
    return full, pds


def sample_count(cfg: BenchConfig, quality, fid: FidQuality | None = None) -> int:
    scored = quality is not None or fid is not None
    return max(cfg.e2e_batch * cfg.e2e_repeats, cfg.quality_samples if scored else 0)


def run_end_to_end(cfg: BenchConfig, model: BenchModel, score, preconds: PreconditionerCache, quality, log,
                   fid: FidQuality | None = None) -> dict:
    """Vanilla PC at the full step count and PDS at 1/k of it, same backend, batch and noise."""
    full, n_pds = full_and_pds_steps(cfg, model.settings)
    count = sample_count(cfg, quality, fid)
    vanilla_run = plan("pc", settings=model.settings, steps=full)
    pds_run = plan("pds", settings=model.settings, steps=n_pds)
    runs = [SamplingRun(score, vanilla_run, None, cfg=cfg, model=model),
            SamplingRun(score, pds_run, preconds.for_steps(n_pds), cfg=cfg, model=model)]
    log(f"end to end: vanilla pc at {full} steps and PDS at {n_pds}, {count} images each in batches of "
        f"{cfg.e2e_batch}, interleaved ...")
    results = run_interleaved(runs, count, cfg.e2e_batch)
    if fid is not None:
        log(f"FID / KID of {2 * count} images ...")
    vanilla = _run_record("vanilla", vanilla_run, results[0], cfg, quality, None, fid)
    pds = _run_record("pds", pds_run, results[1], cfg, quality, preconds.alpha(n_pds), fid)
    return {"status": "ok", "batch": cfg.e2e_batch, "samples": count, "runs": [vanilla, pds],
            "speedup": vanilla["timing"]["median_s"] / pds["timing"]["median_s"],
            "nfe_ratio": vanilla["nfe"] / pds["nfe"], "full_steps": full, "pds_steps": n_pds}


def run_samplers(cfg: BenchConfig, model: BenchModel, score, preconds: PreconditionerCache, quality, log,
                 fid: FidQuality | None = None) -> dict:
    """Each --samplers entry at each --nfe budget, as pdscli.samplers.plan plans it: the most steps
    that fit the budget (counted with the model's PC parts), on the sampler's own default grid;
    all configurations interleaved batch by batch."""
    count, rows, planned = sample_count(cfg, quality, fid), [], []
    for name in cfg.samplers:
        for budget in cfg.nfe:
            try:
                run = plan(name, settings=model.settings, nfe=budget)
            except PdsError as e:  # not even the sampler's fewest steps fit the budget
                rows.append({"sampler": name, "nfe_budget": budget, "steps": 0, "status": "skipped", "reason": str(e)})
                continue
            n = len(run.steps)
            precond, alpha = (preconds.for_steps(n), preconds.alpha(n)) if name == "pds" else (None, None)
            rows.append({"sampler": name, "nfe_budget": budget, "status": "ok"})
            planned.append((rows[-1], run, alpha, SamplingRun(score, run, precond, cfg=cfg, model=model)))
    log(f"samplers: {len(planned)} configurations, {count} images each in batches of {cfg.e2e_batch}, interleaved ...")
    results = run_interleaved([p[-1] for p in planned], count, cfg.e2e_batch)
    if fid is not None:
        log(f"FID / KID of {len(planned) * count} images ...")
    for (row, run, alpha, _), result in zip(planned, results):
        row.update(_run_record(row["sampler"], run, result, cfg, quality, alpha, fid))
    return {"status": "ok", "batch": cfg.e2e_batch, "samples": count, "rows": rows}
