"""The sampling run: sample indices in, one PNG per index out (in the style of NVlabs/edm generate.py).

The unit of work is a sample index. Sample i's noise is a function of (seed, i) and the draw
(pdscli.noise), so an index's image does not depend on which batch (or, later, which rank)
makes it. A run is:

    plan_indices -> pending_indices (skip what --resume finds on disk) -> sample_indices
    (batch by batch: sample, clip, write PNGs at once) -> finalize (grid.png, samples.npz,
    run.json: once, on the main rank).

`sample_indices` takes the exact list of indices this process must make and writes only
files named after them. A distributed driver (pdscli.sample.distributed.Dist) does: rank 0 `begin`,
barrier, every rank `sample_indices(job, dist.shard(pending_indices(...)))`, barrier, rank 0
`finalize` (with the ranks' Stats summed).

Files in the output folder:
    000012.png      sample 12, 8-bit (written as soon as its batch finishes)
    .partial/       000012.npy: sample 12's float32 values, kept until samples.npz is written,
                    so that a resumed run's samples.npz still holds exact floats;
                    run-config.json: what the run was started with (checked by --resume)
    grid.png        the first (up to 64) samples
    samples.npz     `samples` float32 [N, C, H, W] in [0, 1] (clipped, not 8-bit quantised),
                    `indices` int64 [N]
    run.json        every setting, the model, timings, NFE counts, versions
A sample whose float record is missing (e.g. .partial/ was deleted before --resume) is taken
from its PNG, i.e. 8-bit quantised; run.json lists those under `samples_from_png`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdscli import __version__
from pdscli.devices import tf32_state
from pdscli.engines.graph_step import StepGraphSampler
from pdscli.errors import PdsError
from pdscli.fsutil import atomic_path, atomic_write_bytes, atomic_write_json, prepare_out_dir
from pdscli.images import load_png, make_grid, save_png, to_numpy
from pdscli.noise import NOISE_VERSION, SampleNoise
from pdscli.score import CountingScore, ScoreModel

PARTIAL = ".partial"
GRID_MAX = 64
GRID_MIN_CELL = 64  # pixels: small samples are enlarged in grid.png (not in the PNGs or samples.npz)
_SAMPLE_PNG = re.compile(r"^(\d+)\.png$")


class RunInterrupted(PdsError):
    """Ctrl-C: what was finished is on disk; exit code 130 as a shell expects."""

    exit_code = 130

    def __init__(self, written: int, total: int):
        self.written, self.total = written, total
        super().__init__(f"interrupted: {written} of {total} images written; rerun with --resume")


class NonFiniteState(PdsError):
    """A NaN or Inf appeared in the sampler state."""


@dataclass
class SampleJob:
    """Everything a run needs. `meta` carries what only the caller knows (alpha, filters, flags) into run.json."""

    model: ScoreModel
    sampler: str
    steps: Any  # pdscli.samplers.Steps
    out: Path
    num_samples: int
    batch_size: int = 16
    seed: int = 0
    precond: Any = None  # pdscli.precondition.Preconditioner, or None for vanilla
    snr: float | None = None  # None: the model's
    per_sample_step: bool = False
    resume: bool = False
    force: bool = False
    step_graphs: bool = False  # replay whole steps from CUDA graphs where possible (pdscli.engines.graph_step)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.num_samples < 1:
            raise PdsError(f"--num-samples must be at least 1, got {self.num_samples}")
        if self.batch_size < 1:
            raise PdsError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.snr is None:
            self.snr = self.model.settings.snr
        if not self.snr > 0:
            raise PdsError(f"--snr must be positive, got {self.snr}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.settings.shape

    def fingerprint(self) -> dict:
        """What must not change between a run and its --resume (batch size and count may)."""
        steps = self.steps
        return {
            "model": self.model.name,
            "model_sha256": self.model.sha256,
            "settings": self.model.settings.to_dict(),
            "sampler": self.sampler,
            "seed": self.seed,
            "steps": len(steps.sigma),
            "sigma_max": float(steps.sigma_max),
            "schedule": self.meta.get("schedule"),
            "snr": float(self.snr),
            "per_sample_step": self.per_sample_step,
            "alpha": self.meta.get("alpha") if self.precond is not None else None,
            "filters": (self.meta.get("filters") or {}).get("sha256") if self.precond is not None else None,
            "noise_version": NOISE_VERSION,
        }


# ----------------------------------------------------------------------------------------
# Progress: a tiny protocol so the loop knows nothing about Rich.


class Progress:
    """No progress (--quiet). Subclasses show it."""

    def start(self, total: int, done: int, steps: int) -> None: ...
    def batch(self, indices: list[int]) -> None: ...
    def step(self, i: int, n: int, nfe_rate: float) -> None: ...
    def batch_done(self, count: int) -> None: ...
    def close(self) -> None: ...


class RichProgress(Progress):
    """Two bars on stderr: images (with ETA) and the steps of the current batch (with NFE/s)."""

    def __init__(self, console=None):
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichBars

        from pdscli.console import err_console

        self.bars = RichBars(
            TextColumn("{task.description:>7}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console or err_console,
        )
        self.images = self.steps = None

    def start(self, total, done, steps):
        self.bars.start()
        self.images = self.bars.add_task("images", total=total, completed=done, extra="")
        self.steps = self.bars.add_task("steps", total=steps, extra="")

    def batch(self, indices):
        label = f"#{indices[0]}" if len(indices) == 1 else f"#{indices[0]}..{indices[-1]}"
        self.bars.reset(self.steps, extra=label)

    def step(self, i, n, nfe_rate):
        self.bars.update(self.steps, completed=i + 1, total=n, extra=f"{nfe_rate:.1f} NFE/s")

    def batch_done(self, count):
        self.bars.advance(self.images, count)

    def close(self):
        self.bars.stop()


# ----------------------------------------------------------------------------------------
# Indices and the files named after them.


def plan_indices(num_samples: int) -> list[int]:
    """All sample indices of a run. A distributed driver shards this list (Dist.shard)."""
    return list(range(num_samples))


def png_name(index: int, num_samples: int) -> str:
    """Zero-padded to 6 digits (more when the run is larger), so names sort in index order."""
    return f"{index:0{max(6, len(str(max(num_samples - 1, 0))))}d}.png"


def indices_on_disk(out: Path) -> set[int]:
    """Sample indices whose PNG exists (a PNG appears atomically, so it is complete)."""
    if not out.is_dir():
        return set()
    return {int(m.group(1)) for p in out.iterdir() if (m := _SAMPLE_PNG.match(p.name))}


def pending_indices(out: Path, indices: list[int], *, resume: bool) -> list[int]:
    if not resume:
        return list(indices)
    done = indices_on_disk(out)
    return [i for i in indices if i not in done]


def batches(indices: list[int], batch_size: int) -> list[list[int]]:
    """Batches aligned to the run's grid: index i belongs to batch i // batch_size.

    The reference's batch-mean Langevin step couples the samples of a batch, so a batch's
    members must not depend on which indices are left (--resume) or on the rank that makes it.
    """
    groups: dict[int, list[int]] = {}
    for i in indices:
        groups.setdefault(i // batch_size, []).append(i)
    return [groups[k] for k in sorted(groups)]


def _float_path(out: Path, index: int) -> Path:
    return out / PARTIAL / f"{index}.npy"


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def write_sample(out: Path, index: int, num_samples: int, x: np.ndarray) -> None:
    """Float record first, then the PNG: a PNG on disk means the sample is done."""
    _save_npy(_float_path(out, index), x)
    save_png(out / png_name(index, num_samples), x)


def clear_previous_run(out: Path) -> None:
    """--force: remove what an earlier run wrote here (and nothing else the user keeps in the folder)."""
    for p in out.iterdir():
        if _SAMPLE_PNG.match(p.name) or p.name in ("grid.png", "samples.npz", "run.json"):
            p.unlink()
    shutil.rmtree(out / PARTIAL, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# The loop.


@dataclass
class Stats:
    made: int = 0
    nfe_calls: int = 0  # batched network calls
    nfe_per_sample: int = 0  # calls one sample went through
    sampling_s: float = 0.0
    step_graph: dict | None = None  # the path the steps ran on (StepGraphSampler.summary)


def _finite_check(indices: list[int]):
    """Sampler callback part: stop at the first NaN/Inf, naming the step and sigma."""

    def check(info: dict) -> None:
        x = info["x"]
        if not bool(torch.isfinite(x).all()):
            i, n, sigma = int(info["i"]), int(info["n"]), float(info["sigma"])
            raise NonFiniteState(
                f"the sampler state became NaN/Inf at step {i + 1} of {n} (sigma={sigma:.4g}) in the batch "
                f"of samples {indices[0]}..{indices[-1]}; finished images are kept. Try more steps, "
                f"--precision fp32 or a larger --alpha"
            )

    return check


def sample_indices(job: SampleJob, indices: list[int], *, sampler_fn=None, progress: Progress | None = None) -> Stats:
    """Make and write the samples `indices`, batch by batch. Writes only files named after them."""
    sampler_fn = sampler_fn or _resolve_sampler(job.sampler)
    progress = progress or Progress()
    score = CountingScore(job.model.score)
    device = job.model.device
    # Eager unless asked; on a CPU, or where capture fails, it says why and runs eagerly.
    sampler_fn = StepGraphSampler(sampler_fn, device, enabled=job.step_graphs)
    stats = Stats()
    t0 = time.perf_counter()
    for batch in batches(indices, job.batch_size):
        progress.batch(batch)
        noise = SampleNoise(job.seed, batch, job.shape, device)
        calls0 = score.calls
        check = _finite_check(batch)

        def callback(info, check=check):
            check(info)
            elapsed = time.perf_counter() - t0
            progress.step(int(info["i"]), int(info["n"]), score.calls / elapsed if elapsed > 0 else 0.0)

        with torch.no_grad():
            x = sampler_fn(
                score, noise, job.steps, precond=job.precond, snr=job.snr,
                per_sample_step=job.per_sample_step, callback=callback,
            )
        # A NaN in the last step's output (after the final callback) must not become a black PNG.
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteState(f"the sampler returned NaN/Inf for samples {batch[0]}..{batch[-1]}; finished images are kept")
        images = to_numpy(x.clamp(0.0, 1.0))
        for index, image in zip(batch, images):
            write_sample(job.out, index, job.num_samples, image)
        stats.made += len(batch)
        stats.nfe_per_sample = score.calls - calls0
        progress.batch_done(len(batch))
    stats.nfe_calls = score.calls
    stats.sampling_s = time.perf_counter() - t0
    stats.step_graph = sampler_fn.summary()
    return stats


# ----------------------------------------------------------------------------------------
# The end of a run (main rank only).


class _FloatSource:
    """Sample i's float values: .partial/i.npy, else an earlier samples.npz (a run extended with
    --resume and a larger --num-samples), else the PNG (8-bit; recorded)."""

    def __init__(self, out: Path, num_samples: int):
        self.out, self.num_samples = out, num_samples
        self.from_png: list[int] = []
        self._old = None

    def _old_npz(self):
        if self._old is None:
            self._old = {}
            path = self.out / "samples.npz"
            with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile):
                with np.load(path) as z:
                    self._old = dict(zip(z["indices"].tolist(), z["samples"]))
        return self._old

    def __call__(self, index: int) -> np.ndarray:
        path = _float_path(self.out, index)
        if path.exists():
            return np.load(path)
        old = self._old_npz()
        if index in old:
            return old[index]
        self.from_png.append(index)
        return load_png(self.out / png_name(index, self.num_samples))


def _write_samples_npz(path: Path, indices: list[int], shape, get) -> np.ndarray:
    """Stream samples into an .npz one by one (memory stays flat for 50k samples); return the grid's samples."""
    grid = []
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            with zf.open("samples.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                          "fortran_order": False, "shape": (len(indices), *shape)}
                np.lib.format.write_array_header_2_0(f, header)
                for i in indices:
                    x = np.ascontiguousarray(get(i), dtype=np.float32)
                    if x.shape != tuple(shape):
                        raise PdsError(f"sample {i} has shape {x.shape}, the run makes {tuple(shape)}")
                    f.write(x.tobytes())
                    if len(grid) < GRID_MAX:
                        grid.append(x)
            with zf.open("indices.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(indices, dtype=np.int64))
    return np.stack(grid)


def finalize(job: SampleJob, stats: Stats, *, started: float, resumed: int) -> dict:
    """grid.png, samples.npz and run.json from every sample's files; then drop .partial/. Returns run.json's dict."""
    indices = plan_indices(job.num_samples)
    missing = sorted(set(indices) - indices_on_disk(job.out))
    if missing:
        raise PdsError(f"{len(missing)} samples are missing (first: {missing[0]}); rerun with --resume")
    t0 = time.perf_counter()
    source = _FloatSource(job.out, job.num_samples)
    grid = _write_samples_npz(job.out / "samples.npz", indices, job.shape, source)
    save_png(job.out / "grid.png", make_grid(grid, min_cell=GRID_MIN_CELL))
    record = run_record(job, stats, started=started, resumed=resumed, from_png=source.from_png,
                        finalize_s=time.perf_counter() - t0)
    atomic_write_json(job.out / "run.json", record)
    shutil.rmtree(job.out / PARTIAL, ignore_errors=True)
    return record


def run_record(job: SampleJob, stats: Stats, *, started: float, resumed: int, from_png: list[int], finalize_s: float) -> dict:
    steps, model = job.steps, job.model
    total_s = time.perf_counter() - started
    return {
        "pds_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": model.name, "sha256": model.sha256, **{k: v for k, v in model.info.items()}},
        "settings": model.settings.to_dict(),
        "sampler": job.sampler,
        "steps": {
            "count": len(steps.sigma),
            "sigma_max": float(steps.sigma_max),
            "sigma_first": float(steps.sigma[0]),
            "sigma_last": float(steps.sigma[-1]),
        },
        "snr": float(job.snr),
        "per_sample_step": job.per_sample_step,
        "preconditioned": job.precond is not None,
        "seed": job.seed,
        "noise_version": NOISE_VERSION,
        "num_samples": job.num_samples,
        "batch_size": job.batch_size,
        "device": str(model.device),
        "tf32": tf32_state(model.device),
        "step_graph": stats.step_graph,
        **job.meta,
        "nfe": {"per_sample": stats.nfe_per_sample, "network_calls": stats.nfe_calls},
        "timings": {
            "sampling_s": round(stats.sampling_s, 4),
            "per_image_s": round(stats.sampling_s / stats.made, 6) if stats.made else None,
            "finalize_s": round(finalize_s, 4),
            "total_s": round(total_s, 4),
        },
        "made_now": stats.made,
        "resumed_from_disk": resumed,
        "samples_from_png": from_png,
        "fingerprint": job.fingerprint(),
        "files": {"images": "NNNNNN.png (zero-padded sample index)", "grid": "grid.png", "samples": "samples.npz"},
    }


# ----------------------------------------------------------------------------------------
# Resume bookkeeping.


def _check_resume(job: SampleJob) -> None:
    """--resume must continue the same run: refuse different settings rather than mix two runs' images."""
    before = None
    for path, key in ((job.out / PARTIAL / "run-config.json", None), (job.out / "run.json", "fingerprint")):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            before = data.get(key) if key else data
            if before:
                break
    if not before:
        return
    _check_noise_version(job.out, before)
    now = json.loads(json.dumps(job.fingerprint()))  # the same JSON round trip as the stored copy
    changed = [k for k in now if k in before and before[k] != now[k]]
    if changed:
        diffs = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise PdsError(f"--resume would mix two different runs ({diffs}); use the same flags, or --force to start over")


def _check_noise_version(out: Path, before: dict) -> None:
    """Another noise generator makes other images for the same seed: never mix them in one run.
    Runs that predate the record drew version 1 (a torch.Generator per sample)."""
    made_with = before.get("noise_version", 1)
    if made_with != NOISE_VERSION:
        raise PdsError(f"--resume: {out} was made with noise generator version {made_with} and this pds draws version "
                       f"{NOISE_VERSION}, so its images would not continue that run; use --force to start over")


def prepare_output(out, *, force: bool, resume: bool) -> Path:
    """The output folder rules, callable early (before a slow model load) and again by `run`."""
    return prepare_out_dir(out, force=force, resume=resume)


def begin(job: SampleJob) -> None:
    """Prepare the folder for this run (main rank): rules, --force clean-up, --resume check, run-config.json."""
    prepare_output(job.out, force=job.force, resume=job.resume)
    if job.force:
        clear_previous_run(job.out)
    if job.resume:
        _check_resume(job)
    (job.out / PARTIAL).mkdir(exist_ok=True)
    atomic_write_json(job.out / PARTIAL / "run-config.json", job.fingerprint())


def run(job: SampleJob, *, progress: Progress | None = None, sampler_fn=None) -> dict:
    """A whole single-process run; returns run.json's dict. Raises RunInterrupted on Ctrl-C."""
    started = time.perf_counter()
    sampler_fn = sampler_fn or _resolve_sampler(job.sampler)
    begin(job)
    todo = pending_indices(job.out, plan_indices(job.num_samples), resume=job.resume)
    resumed = job.num_samples - len(todo)
    progress = progress or Progress()
    progress.start(job.num_samples, resumed, len(job.steps.sigma))
    try:
        stats = sample_indices(job, todo, sampler_fn=sampler_fn, progress=progress)
    except KeyboardInterrupt:
        done = len(indices_on_disk(job.out) & set(plan_indices(job.num_samples)))
        raise RunInterrupted(done, job.num_samples) from None
    finally:
        progress.close()
    return finalize(job, stats, started=started, resumed=resumed)


def run_distributed(make_job, dist, *, progress: Progress | None = None, sampler_fn=None) -> dict | None:
    """The same run across torchrun ranks; returns run.json's dict on rank 0, None elsewhere.

    `make_job()` opens the model: rank 0 first (an engine it builds is then on disk), the
    others after it. Whole aligned batches are dealt to ranks round-robin, so every image is
    what a single process with the same --batch-size makes. A rank that dies leaves only
    complete images (atomic writes); torchrun then stops the others and --resume finishes.
    """
    started = time.perf_counter()
    with dist.main_first():
        job = make_job()
    dist.barrier()  # every rank has checked the (still empty) folder before rank 0 writes to it
    sampler_fn = sampler_fn or _resolve_sampler(job.sampler)
    if dist.is_main:
        begin(job)
    dist.barrier()  # --force has cleared the folder before anyone lists it
    todo = pending_indices(job.out, plan_indices(job.num_samples), resume=job.resume)
    dist.barrier()  # everyone has listed the folder before anyone writes to it
    mine = batches(todo, job.batch_size)[dist.rank :: dist.world_size]
    resumed = job.num_samples - len(todo)
    rounds = dist.max(len(mine))  # before sampling: collectives must line up across ranks
    shown = _GlobalProgress(progress if dist.is_main else Progress(), dist)
    shown.start(job.num_samples, resumed, len(job.steps.sigma))
    try:
        stats = sample_indices(job, [i for b in mine for i in b], sampler_fn=sampler_fn, progress=shown)
        shown.finish_rounds(rounds)
    finally:
        shown.close()
    stats.made = dist.sum(stats.made)
    stats.nfe_calls = dist.sum(stats.nfe_calls)
    dist.barrier()
    return finalize(job, stats, started=started, resumed=resumed) if dist.is_main else None


class _GlobalProgress(Progress):
    """Rank 0 shows the images made on all ranks: one all-reduce per batch round, every rank joining.

    Ranks may have one batch fewer than others; `finish_rounds` joins the rounds they miss.
    """

    def __init__(self, inner: Progress, dist):
        self.inner, self.dist, self.rounds = inner, dist, 0

    def start(self, total, done, steps):
        self.inner.start(total, done, steps)

    def batch(self, indices):
        self.inner.batch(indices)

    def step(self, i, n, nfe_rate):
        self.inner.step(i, n, nfe_rate)

    def batch_done(self, count):
        self.rounds += 1
        self.inner.batch_done(self.dist.sum(count))

    def finish_rounds(self, total_rounds: int) -> None:
        while self.rounds < total_rounds:
            self.batch_done(0)

    def close(self):
        self.inner.close()


# ----------------------------------------------------------------------------------------
# Setting a run up from flags (the `pds sample` command is a thin layer over this).


@dataclass
class ModelSpec:
    """Where the score comes from: exactly one of checkpoint / engine / model (none = built-in)."""

    checkpoint: Path | None = None
    config: Path | None = None
    preset: str | None = None
    engine: Path | None = None
    backend: str | None = None
    model: str | None = None  # "gaussian" | "builtin"
    image_size: int | None = None
    channels: int | None = None
    trust_checkpoint: bool = False
    precision: str | None = None  # None: fp32, or an engine's own
    device: str = "auto"
    overrides: dict = field(default_factory=dict)  # sigma_min, sigma_max, num_scales, snr (None = unset)


MODEL_NAMES = ("gaussian", "builtin")


def open_model(spec: ModelSpec) -> ScoreModel:
    """The ScoreModel a spec names, with the flag overrides applied to its settings."""
    from pdscli.devices import resolve_device, resolve_precision

    sources = [flag for flag, given in (("--checkpoint", spec.checkpoint), ("--engine", spec.engine), ("--model", spec.model)) if given]
    if len(sources) > 1:
        raise PdsError(f"choose one model: {' and '.join(sources)} exclude each other")
    if (spec.config or spec.preset) and not spec.checkpoint:
        raise PdsError("--config / --preset describe a --checkpoint; pass one (an engine carries its own settings)")
    if spec.model and spec.model not in MODEL_NAMES:
        raise PdsError(f"--model must be one of {', '.join(MODEL_NAMES)}, not {spec.model!r}")
    if spec.precision:
        resolve_precision(spec.precision)
    device = resolve_device(spec.device)
    overrides = {k: v for k, v in spec.overrides.items() if v is not None}

    if spec.engine:
        from pdscli.engines import open_engine

        # Engines may lack metadata: the shape flags fill it in, like the sigma flags.
        shape = {"image_size": spec.image_size, "num_channels": spec.channels}
        return open_engine(spec.engine, device=device, backend=spec.backend, precision=spec.precision,
                           overrides={**overrides, **{k: v for k, v in shape.items() if v is not None}})
    if spec.backend:
        raise PdsError("--backend applies to --engine files only")
    if spec.checkpoint:
        from pdscli.models.checkpoint import open_checkpoint

        model = open_checkpoint(spec.checkpoint, spec.config, spec.preset, device=device,
                                precision=spec.precision or "fp32", trust_checkpoint=spec.trust_checkpoint)
        _check_shape_flags(spec, model)
    elif spec.model == "gaussian":
        from pdscli.evaluate.analytic import gaussian_score_model

        if spec.precision and spec.precision.lower() != "fp32":
            raise PdsError(f"the analytic gaussian model has no network: --precision {spec.precision} does not apply")
        model = gaussian_score_model(spec.image_size or 32, spec.channels or 3, device=device)
    else:
        from pdscli.models.builtin import default_score_model

        model = default_score_model(device)
        _check_shape_flags(spec, model)
    if overrides:
        model = dataclasses.replace(model, settings=model.settings.replace(**overrides))
    return model


def _check_shape_flags(spec: ModelSpec, model: ScoreModel) -> None:
    s = model.settings
    for flag, given, actual in (("--image-size", spec.image_size, s.image_size), ("--channels", spec.channels, s.num_channels)):
        if given is not None and given != actual:
            raise PdsError(f"{flag} {given} does not match the model ({model.name} makes {s.num_channels}x{s.image_size}x{s.image_size} images)")


def open_filters(masks=None, freq_mask=None, space_mask=None, *, settings, builtin: bool = False):
    """Filters from a `pds filters` .npz, the reference's .npy pair or (builtin=True) the built-in
    model's own, checked against the model's shape; (None, None) if none."""
    from pdscli import precondition

    if masks and (freq_mask or space_mask):
        raise PdsError("--masks excludes --freq-mask / --space-mask: give the .npz or the .npy files")
    for path in (masks, freq_mask, space_mask):
        if path and not Path(path).is_file():
            raise PdsError(f"filter file {path} does not exist")
    if masks:
        filters, files = precondition.load_filters(masks), [masks]
    elif freq_mask or space_mask:
        filters = precondition.load_reference_npy(freq_mask, space_mask, channels=settings.num_channels, size=settings.image_size)
        files = [p for p in (freq_mask, space_mask) if p]
    elif builtin:
        from pdscli.models import builtin as builtin_model

        filters, files = builtin_model.default_filters(), [builtin_model.FILTERS]
    else:
        return None, None
    check_filters_fit(filters, settings)
    return filters, _filters_info(filters, files)


def _filters_info(filters, files) -> dict:
    from pdscli.fsutil import sha256_file

    return {
        "files": [str(p) for p in files],
        "sha256": "+".join(sha256_file(p)[:16] for p in files),
        "source": filters.source,
        "kinds": filters.kinds,
        "count": filters.count,
        "size": filters.size,
        "channels": filters.channels,
    }


def check_filters_fit(filters, settings) -> None:
    """Filters made for other images cannot precondition this model: say so in one line."""
    want, got = tuple(settings.shape), tuple(filters.shape)
    if got != want:
        raise PdsError(
            f"the filters are {'x'.join(map(str, got))} (C x H x W) but the model makes "
            f"{'x'.join(map(str, want))} images; make filters at this size with `pds filters DIR --size {settings.image_size}`"
        )


def resolve_sampler_name(name: str | None, *, has_filters: bool) -> str:
    from pdscli.samplers import get_sampler

    chosen = name or ("pds" if has_filters else "pc")
    get_sampler(chosen)  # unknown names fail here, before a slow model load
    if chosen == "pds" and not has_filters:
        raise PdsError("the pds sampler needs filters: pass --masks FILE (from `pds filters`) or --freq-mask/--space-mask")
    if name == "pc" and has_filters:
        # `pc` is the vanilla baseline; with a preconditioner it would silently be PDS.
        raise PdsError("--sampler pc is vanilla predictor-corrector: drop the filters, or use --sampler pds")
    return chosen


def uses_builtin(spec: "ModelSpec") -> bool:
    """No model flag (or --model builtin) means the built-in model."""
    return spec.model == "builtin" or not (spec.checkpoint or spec.engine or spec.model)


# The samplers of score_sde / PDS run on the reference's own grid; the others on a schedule.
PC_FAMILY = ("pc", "pds", "predictor", "corrector")
REFERENCE_GRID = "pc"


def build_steps(settings, *, steps: int | None, speed_up: int | None, sampler: str = "pc", schedule: str | None = None):
    """The step grid: `pc` = the reference's (pc_steps), else a pdscli.samplers.grids grid of the same length.

    Default: `pc` for the predictor-corrector family, `geometric` (score_sde's log-uniform spacing)
    for the accelerated samplers.
    """
    from pdscli.samplers import pc_steps

    if steps is not None and speed_up is not None:
        raise PdsError("--steps and --speed-up exclude each other: give the number of steps or the speed-up")
    if steps is not None and steps < 1:
        raise PdsError(f"--steps must be at least 1, got {steps}")
    if speed_up is not None and speed_up < 1:
        raise PdsError(f"--speed-up must be at least 1, got {speed_up}")
    schedule = schedule or (REFERENCE_GRID if sampler in PC_FAMILY else "geometric")
    if schedule == REFERENCE_GRID:
        return pc_steps(settings, steps, speed_up=speed_up), schedule
    from pdscli.samplers.grids import SCHEDULES, make_steps

    if schedule not in SCHEDULES:
        raise PdsError(f"unknown schedule {schedule!r}; choose one of: {', '.join((REFERENCE_GRID, *SCHEDULES))}")
    if speed_up is not None:
        n = int(settings.num_scales / speed_up)
    else:
        n = steps if steps is not None else settings.num_scales
    if n < 1:
        raise PdsError(f"--speed-up {speed_up} leaves no step of the model's {settings.num_scales}")
    return make_steps(schedule, settings, n), schedule


def build_job(spec: ModelSpec, *, out, masks=None, freq_mask=None, space_mask=None, alpha: float | str = 5.0,
              sampler: str | None = None, steps: int | None = None, speed_up: int | None = None,
              schedule: str | None = None,
              snr: float | None = None, per_sample_step: bool = False, num_samples: int = 16,
              batch_size: int = 16, seed: int = 0, force: bool = False, resume: bool = False,
              step_graphs: bool = False) -> SampleJob:
    """Check every flag (cheap checks before the slow model load), open the model and filters, make the job."""
    from pdscli.precondition.alpha import resolve_alpha

    if str(alpha).strip().lower() != "auto":
        alpha = resolve_alpha(alpha, None, 0)  # a bad number fails before the slow model load
    if snr is not None and not snr > 0:
        raise PdsError(f"--snr must be positive, got {snr}")
    if steps is not None and steps < 1:
        raise PdsError(f"--steps must be at least 1, got {steps}")
    if steps is not None and speed_up is not None:
        raise PdsError("--steps and --speed-up exclude each other: give the number of steps or the speed-up")
    if num_samples < 1 or batch_size < 1:
        raise PdsError(f"--num-samples and --batch-size must be at least 1, got {num_samples} and {batch_size}")
    if masks and (freq_mask or space_mask):
        raise PdsError("--masks excludes --freq-mask / --space-mask: give the .npz or the .npy files")
    with _removed_if_left_empty(out):
        prepare_output(out, force=force, resume=resume)
        filter_flags = bool(masks or freq_mask or space_mask)
        # The built-in model runs as its docs say (PDS with its own filters, few steps) unless told otherwise.
        builtin = uses_builtin(spec)
        builtin_filters = builtin and not filter_flags and sampler in (None, "pds")
        sampler = resolve_sampler_name(sampler, has_filters=filter_flags or builtin_filters)
        if builtin and steps is None and speed_up is None:
            from pdscli.models.builtin import DEFAULT_STEPS

            steps = DEFAULT_STEPS

        t0 = time.perf_counter()
        model = open_model(spec)
        load_s = time.perf_counter() - t0
        filters, filters_info = open_filters(masks, freq_mask, space_mask, settings=model.settings, builtin=builtin_filters)
        grid, schedule = build_steps(model.settings, steps=steps, speed_up=speed_up, sampler=sampler, schedule=schedule)
        alpha_given, alpha = alpha, resolve_alpha(alpha, model.settings, len(grid))
        precond = None
        if filters is not None:
            from pdscli.precondition import Preconditioner

            precond = Preconditioner.from_filters(filters, alpha, model.device)
    meta = {
        "precision": model.info.get("precision") or spec.precision or "fp32",  # what the model says it runs at
        "alpha": alpha if precond is not None else None,
        "alpha_given": alpha_given if precond is not None else None,
        "filters": filters_info,
        "schedule": schedule,
        "steps_requested": {"steps": steps, "speed_up": speed_up},
        "model_load_s": round(load_s, 4),
    }
    return SampleJob(model=model, sampler=sampler, steps=grid, out=Path(out), num_samples=num_samples,
                     batch_size=batch_size, seed=seed, precond=precond, snr=snr, per_sample_step=per_sample_step,
                     resume=resume, force=force, step_graphs=step_graphs, meta=meta)


@contextlib.contextmanager
def _removed_if_left_empty(out):
    """The output folder is made early (to fail fast); a set-up error must not leave it behind, empty."""
    out = Path(out)
    existed = out.exists()
    try:
        yield
    except BaseException:
        if not existed:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds when empty
        raise


def _resolve_sampler(name: str):
    from pdscli.samplers import get_sampler

    return get_sampler(name)


def summary_line(record: dict, out: Path) -> str:
    n, t = record["num_samples"], record["timings"]
    return (
        f"{n} images in {out}/ (grid.png, samples.npz, run.json): {record['made_now']} made in "
        f"{t['sampling_s']:.2f} s, {record['nfe']['per_sample']} NFE each, sampler {record['sampler']}"
    )
