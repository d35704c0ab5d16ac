"""The loop over planned batches: noise from the seeds, the sampler, the files (as NVlabs/edm generate.py).

A run's samples 0..N-1 are cut into batches once, by number: batch k holds the indices
k*B .. min((k+1)*B, N)-1. That plan never changes (not with --resume, not with the number of
torchrun ranks), because the reference's batch-mean Langevin step couples the members of a
batch: a batch is always made whole, exactly as planned, and only its missing files are
written. Sample i's noise is a function of (seed, i) and the draw (pdscli.noise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from pdscli.engines.graph_step import step_sampler
from pdscli.errors import is_out_of_memory
from pdscli.images import to_numpy
from pdscli.noise import SampleNoise
from pdscli.sample import outputs
from pdscli.sample.job import NonFiniteState, OutOfMemory, SampleJob
from pdscli.samplers import sampler_info, sampler_kwargs
from pdscli.samplers.teleport import TeleportNoise
from pdscli.score import CountingScore


class SampleProgress(Protocol):
    """What the loop reports; pdscli.cli.progress.SampleBars draws it."""

    def start(self, total: int, done: int, steps: int) -> None: ...
    def batch(self, first: int, last: int) -> None: ...
    def step(self, i: int, n: int, nfe_rate: float) -> None: ...
    def batch_done(self, count: int) -> None: ...


class NoProgress:
    """--quiet, and every rank but 0."""

    def start(self, total: int, done: int, steps: int) -> None: ...
    def batch(self, first: int, last: int) -> None: ...
    def step(self, i: int, n: int, nfe_rate: float) -> None: ...
    def batch_done(self, count: int) -> None: ...


@dataclass
class Stats:
    made: int = 0  # samples written now (the missing members of the batches made)
    nfe_calls: int = 0  # batched network calls
    nfe_per_sample: int = 0  # calls one sample went through
    sampling_s: float = 0.0
    step_graph: dict | None = None  # the path the steps ran on (StepGraphSampler.summary)


# ----------------------------------------------------------------------------------------
# The plan: batch numbers and the index ranges they stand for (never materialised as lists).


def batch_count(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def batch_indices(k: int, num_samples: int, batch_size: int) -> range:
    """The sample indices of planned batch k."""
    return range(k * batch_size, min((k + 1) * batch_size, num_samples))


def pending_batches(num_samples: int, batch_size: int, done: set[int] | None) -> Iterable[int]:
    """Batch numbers with a member to make: every batch, or (done = the complete samples on disk,
    for --resume) those with a member missing."""
    all_batches = range(batch_count(num_samples, batch_size))
    if done is None:
        return all_batches
    return [k for k in all_batches if any(i not in done for i in batch_indices(k, num_samples, batch_size))]


# ----------------------------------------------------------------------------------------
# The loop.


def _finite_check(indices: range) -> Callable[[dict], None]:
    """Sampler callback part: stop at the first NaN/Inf, naming the step and sigma."""

    def check(info: dict) -> None:
        if not bool(torch.isfinite(info["x"]).all()):
            i, n, sigma = int(info["i"]), int(info["n"]), float(info["sigma"])
            raise NonFiniteState(
                f"the sampler state became NaN/Inf at step {i + 1} of {n} (sigma={sigma:.4g}) in the batch "
                f"of samples {indices[0]}..{indices[-1]}; finished images are kept. Try more steps, "
                f"--precision fp32 or a larger --alpha"
            )

    return check


def make_batch(job: SampleJob, indices: range, *, sampler_fn, score, callback=None) -> torch.Tensor:
    """Planned batch `indices` as the sampler returns it (not clipped): sample i's noise from
    (seed, i), the job's grid, preconditioner and parts. Out of memory and NaN/Inf in the output
    end as one-line errors."""
    try:
        noise = SampleNoise(job.seed, indices, job.shape, job.model.device)
        if job.teleport_to is not None:
            noise = TeleportNoise(noise, job.data_gaussian, job.model.settings.sigma_max, job.teleport_to,
                                  stochastic=not sampler_info(job.sampler).deterministic)
        with torch.no_grad():
            x = sampler_fn(score, noise, job.steps, **sampler_kwargs(
                job.sampler, precond=job.precond, snr=job.snr, per_sample_step=job.per_sample_step, callback=callback,
                **job.sampler_options))
    except (MemoryError, RuntimeError) as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(
            f"out of memory on {job.model.device} making a batch of {len(indices)} samples "
            f"({'x'.join(map(str, job.shape))}); pass a smaller --batch-size (finished images are kept)"
        ) from None
    # A NaN in the last step's output (after the final callback) must not become a black PNG.
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteState(f"the sampler returned NaN/Inf for samples {indices[0]}..{indices[-1]}; "
                             "finished images are kept")
    return x


def step_callback(indices: range, score: CountingScore, progress: SampleProgress, t0: float) -> Callable[[dict], None]:
    """The sampler's callback: stop at the first NaN/Inf, and report the step and the NFE rate."""
    check = _finite_check(indices)

    def callback(info: dict) -> None:
        check(info)
        elapsed = time.perf_counter() - t0
        progress.step(int(info["i"]), int(info["n"]), score.calls / elapsed if elapsed > 0 else 0.0)

    return callback


def sample_batches(job: SampleJob, batch_numbers: Iterable[int], *, sampler_fn, progress: SampleProgress) -> Stats:
    """Make the planned batches `batch_numbers` and write their missing files."""
    score = CountingScore(job.model.score)
    # Eager unless asked; on a CPU, or where capture or compile fails, it says why and runs eagerly.
    sampler_fn = step_sampler(sampler_fn, job.model.device, job.step_path)
    stats = Stats()
    t0 = time.perf_counter()
    for k in batch_numbers:
        indices = batch_indices(k, job.num_samples, job.batch_size)
        progress.batch(indices[0], indices[-1])
        calls0 = score.calls
        x = make_batch(job, indices, sampler_fn=sampler_fn, score=score,
                       callback=step_callback(indices, score, progress, t0))
        images = to_numpy(x.clamp(0.0, 1.0))
        written = sum(outputs.write_sample(job.out, i, job.num_samples, image) for i, image in zip(indices, images))
        stats.made += written
        stats.nfe_per_sample = score.calls - calls0
        progress.batch_done(written)
    stats.nfe_calls = score.calls
    stats.sampling_s = time.perf_counter() - t0
    stats.step_graph = sampler_fn.summary()
    return stats
