"""The sampling run, in one process or across torchrun ranks (in the style of NVlabs/edm generate.py).

    begin    (main rank) lock the folder; --force: clear the earlier run; --resume: remove
             damaged files, check the settings match; .partial/run-config.json
    plan     the pending batches of the fixed batch plan (pdscli.sample.loop), dealt to ranks
             round-robin: rank r makes batches r, r + W, r + 2W, ... of the pending ones
    loop     every rank makes its whole batches and writes their missing files
    finish   (main rank) samples.npz, grid.png and run.json, together; .partial/ removed

The images depend only on the seed, the sample index and (with the default batch-mean step) the
batch plan, never on the number of ranks or on interruptions: a rank that dies or a Ctrl-C
leaves only whole files, and --resume remakes whole batches, so the result is byte-identical
to an uninterrupted run.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pdscli.console import err_console, ignore_further_interrupts
from pdscli.fsutil import DiskFull, FolderLock
from pdscli.sample import outputs
from pdscli.sample.distributed import Dist
from pdscli.sample.job import RunInterrupted, SampleJob
from pdscli.sample.loop import NoProgress, SampleProgress, Stats, pending_batches, sample_batches
from pdscli.samplers import sampler_info

RESUME_HINT = "free some space and rerun with --resume"


def warn_on_stderr(message: str) -> None:
    err_console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)


def begin(job: SampleJob, warn: Callable[[str], None] = warn_on_stderr) -> FolderLock:
    """Prepare the folder for this run (main rank); returns the lock held for the run. The folder
    rules (--force / --resume for a non-empty one) were checked by pdscli.sample.setup."""
    job.out.mkdir(parents=True, exist_ok=True)
    lock = job.lock or FolderLock(job.out, what="pds sample run")
    try:
        if job.force:
            outputs.clear_previous_run(job.out)
        if job.resume:
            record_lost = outputs.repair(job.out, job.shape, warn)
            outputs.check_resume(job, record_lost=record_lost)
        outputs.start_partial(job)
    except BaseException:
        lock.release()
        raise
    return lock


class _RankProgress:
    """Rank 0 shows the images made on all ranks: one all-reduce per batch round, every rank
    joining. Ranks may have a batch fewer than others; `finish_rounds` joins the rounds they miss."""

    def __init__(self, inner: SampleProgress, dist: Dist, rounds: int):
        self.inner, self.dist, self.rounds, self.done = inner, dist, rounds, 0

    def start(self, total: int, done: int, steps: int) -> None:
        self.inner.start(total, done, steps)

    def batch(self, first: int, last: int) -> None:
        self.inner.batch(first, last)

    def step(self, i: int, n: int, nfe_rate: float) -> None:
        self.inner.step(i, n, nfe_rate)

    def batch_done(self, count: int) -> None:
        self.done += 1
        self.inner.batch_done(self.dist.sum(count))

    def finish_rounds(self) -> None:
        while self.done < self.rounds:
            self.batch_done(0)


def run(job: SampleJob, *, progress: SampleProgress | None = None, sampler_fn=None, dist: Dist | None = None,
        warn: Callable[[str], None] = warn_on_stderr) -> dict | None:
    """A whole run; returns run.json's dict (None on ranks but 0). Raises RunInterrupted on Ctrl-C."""
    started = time.perf_counter()
    dist = dist or Dist()
    sampler_fn = sampler_fn or sampler_info(job.sampler).fn
    lock = begin(job, warn) if dist.is_main else None
    for line in job.warnings if dist.is_main else ():
        warn(line)
    try:
        dist.barrier()  # --force has cleared, --resume repaired the folder before anyone lists it
        done = outputs.indices_on_disk(job.out) if job.resume else None
        todo = pending_batches(job.num_samples, job.batch_size, done)
        dist.barrier()  # everyone has listed the folder before anyone writes to it
        resumed = sum(1 for i in done if i < job.num_samples) if done else 0
        mine = todo[dist.rank :: dist.world_size]
        shown = _RankProgress(progress if progress and dist.is_main else NoProgress(), dist, dist.max(len(mine)))
        shown.start(job.num_samples, resumed, len(job.steps.sigma))
        try:
            stats = sample_batches(job, mine, sampler_fn=sampler_fn, progress=shown)
        except KeyboardInterrupt:
            ignore_further_interrupts()  # counting and reporting must finish; `pds` restores the handler
            written = sum(1 for i in outputs.indices_on_disk(job.out) if i < job.num_samples)
            raise RunInterrupted(written, job.num_samples) from None
        except DiskFull as e:
            raise DiskFull(e.path, RESUME_HINT) from None
        shown.finish_rounds()
        stats.made = dist.sum(stats.made)
        stats.nfe_calls = dist.sum(stats.nfe_calls)
        dist.barrier()
        if not dist.is_main:
            return None
        return _finish(job, stats, started=started, resumed=resumed)
    finally:
        if lock is not None:
            lock.release()


def _finish(job: SampleJob, stats: Stats, *, started: float, resumed: int) -> dict:
    def record(from_png: list[int], finalize_s: float) -> dict:
        return outputs.run_record(job, stats, total_s=time.perf_counter() - started, resumed=resumed,
                                  from_png=from_png, finalize_s=finalize_s)

    try:
        return outputs.finish(job, record)
    except DiskFull as e:
        raise DiskFull(e.path, RESUME_HINT) from None


def run_distributed(make_job: Callable[[], SampleJob], dist: Dist, *, progress: SampleProgress | None = None,
                    sampler_fn=None) -> dict | None:
    """The same run across torchrun ranks; returns run.json's dict on rank 0, None elsewhere.

    `make_job()` opens the model: rank 0 first (an engine it builds is then on disk), the others
    after it. Whole planned batches are dealt to ranks, so every image is what a single process
    with the same --batch-size makes. Rank 0 holds the folder's lock for all of them; a rank that
    dies leaves only complete files (atomic writes); torchrun then stops the others and --resume
    finishes.
    """
    with dist.main_first():
        job = make_job()
    dist.barrier()  # every rank has checked the folder before rank 0 writes to it
    return run(job, progress=progress, sampler_fn=sampler_fn, dist=dist)

