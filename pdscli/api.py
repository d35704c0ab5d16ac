"""The Python API: open a model, sample from it, make filters, measure FID (docs/api.md).

    model = pdscli.load("builtin")                    # anything `pds sample` takes as a model
    x = pdscli.sample(model, 8, nfe=20, seed=0)       # float32 [8, C, H, W] in [0, 1], on the CPU
    f = pdscli.filters("~/data/ffhq", 256)            # PDS filter statistics
    pdscli.fid(x, "stats/reference.npz", features=...)["fid"]

`sample` gives the images `pds sample` writes to samples.npz with the same flags, bit for bit:
both choose the sampler, grid and filters in pdscli.sample.setup and make each planned batch
with pdscli.sample.loop.make_batch, so sample i of seed s is the same array.
Bad input raises the one-line `pdscli.errors.PdsError` the command line prints.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdscli import flag_rules
from pdscli.devices import resolve_device
from pdscli.engines import ONNX_SUFFIXES, TRT_SUFFIXES
from pdscli.errors import PdsError
from pdscli.evaluate.compare import compare, open_side
from pdscli.evaluate.features import open_features
from pdscli.evaluate.fid import KID_SUBSETS
from pdscli.evaluate.imagesets import ArraySet
from pdscli.fsutil import prepare_out_file
from pdscli.models import builtin
from pdscli.precondition import Filters, compute_statistics, load_filters
from pdscli.precondition.filters import folder_statistics
from pdscli.sample.job import SampleJob
from pdscli.sample.loop import NoProgress, SampleProgress, batch_count, batch_indices, make_batch, step_callback
from pdscli.sample.model import MODEL_NAMES, ModelSpec, check_filters_fit, open_model
from pdscli.sample.run import warn_on_stderr
from pdscli.sample.setup import SampleFlags, check_fits_in_memory, choose_sampler, sampling_parts_for, start_for
from pdscli.samplers import sampler_info
from pdscli.score import CountingScore, ScoreModel
from pdscli.settings import SamplingSettings

__all__ = ["Model", "fid", "filters", "load", "sample"]

DEFAULT_BATCH_SIZE = 16  # `pds sample --batch-size`'s default: with the batch-mean corrector step, images depend on it


@dataclass(frozen=True)
class Model:
    """An open score model: `score(x, sigma)` (x [B, C, H, W] float32, sigma [B] float32), its
    sampling `settings`, and the PDS `filters` that come with it (the built-in model's; else None)."""

    spec: ModelSpec
    opened: ScoreModel
    filters: Filters | None = None

    def score(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """The score grad log p_sigma(x); a number sigma applies to the whole batch."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        return self.opened.score(x, sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma)

    @property
    def settings(self) -> SamplingSettings:
        return self.opened.settings

    @property
    def name(self) -> str:
        return self.opened.name

    @property
    def device(self) -> torch.device:
        return self.opened.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, size, size) of one image."""
        return self.opened.settings.shape


def model_spec(source: str | Path | ModelSpec, *, device: str | None = None, precision: str | None = None,
               config: str | Path | None = None, preset: str | None = None, trust_checkpoint: bool = False,
               image_size: int | None = None, channels: int | None = None) -> ModelSpec:
    """The ModelSpec `pds sample` would build for a model named as `load` takes it."""
    flags = {"device": device or "auto", "precision": precision, "trust_checkpoint": trust_checkpoint,
             "image_size": image_size, "channels": channels}
    if isinstance(source, ModelSpec):
        given = {k: v for k, v in flags.items() if v not in (None, False, "auto")}
        return dataclasses.replace(source, **given)
    text = str(source)
    if text in MODEL_NAMES:
        kind = {"model": text}
    elif text.startswith("hf:"):
        kind = {"checkpoint": text}
    elif Path(text).suffix.lower() in ONNX_SUFFIXES + TRT_SUFFIXES:
        kind = {"engine": Path(text)}
    else:
        kind = {"checkpoint": Path(text)}
    if (config or preset) and "checkpoint" not in kind:
        raise PdsError(f"config / preset describe a checkpoint; {text} is not one")
    return ModelSpec(**kind, config=Path(config) if config else None, preset=preset, **flags)


def load(source: str | Path | ModelSpec, *, device: str | None = None, precision: str | None = None,
         config: str | Path | None = None, preset: str | None = None, trust_checkpoint: bool = False,
         image_size: int | None = None, channels: int | None = None) -> Model:
    """Open a score model from anything `pds sample` takes: `"builtin"`, `"gaussian"`, `"mixture"`,
    a checkpoint (with `config=` or `preset=` where the file does not carry its config), a diffusers
    model or pipeline folder, `"hf:ORG/NAME[@REVISION]"`, an engine file (.onnx, .plan, .engine),
    or a `pdscli.sample.model.ModelSpec`. `device`: "auto" (default), "cpu", "cuda", "cuda:1";
    `precision`: fp32 (default), fp16 or bf16 for a network."""
    spec = model_spec(source, device=device, precision=precision, config=config, preset=preset,
                      trust_checkpoint=trust_checkpoint, image_size=image_size, channels=channels)
    opened = open_model(spec)
    return Model(spec=spec, opened=opened, filters=builtin.default_filters() if spec.uses_builtin else None)


def _as_filters(value: Filters | str | Path | None, settings: SamplingSettings) -> Filters | None:
    if value is None:
        return None
    if not isinstance(value, Filters):
        value = load_filters(value)
    check_filters_fit(value, settings)
    return value


def sample(model: Model, n: int, *, nfe: int | None = None, sampler: str | None = None, steps: int | None = None,
           speed_up: float | None = None, schedule: str | None = None, filters: Filters | str | Path | None = None,
           alpha: float | str | None = None, per_sample_step: bool = False, seed: int = 0,
           batch_size: int = DEFAULT_BATCH_SIZE, progress: bool | SampleProgress = False,
           teleport: float | str | None = None) -> torch.Tensor:
    """`n` images, float32 [n, C, H, W] in [0, 1] on the CPU: those `pds sample` writes to
    samples.npz with the same flags (--nfe, --sampler, --steps, --speed-up, --schedule, --masks,
    --alpha, --per-sample-step, --seed, --batch-size, --teleport), bit for bit.

    `filters`: a `Filters` or a filters .npz; None: the model's own (the built-in model's, used by
    the pds sampler as `pds sample` does). `progress`: True for a bar on stderr, or a
    pdscli.sample.loop.SampleProgress."""
    # SampleFlags checks every number by its flag's rule, as for `pds sample` (errors name the flag).
    flags = SampleFlags(out=Path(), alpha=None if alpha is None else str(alpha), sampler=sampler, steps=steps,
                        speed_up=speed_up, schedule=schedule, nfe=nfe, per_sample_step=per_sample_step,
                        num_samples=n, batch_size=batch_size, seed=seed,
                        teleport=None if teleport is None else str(teleport))
    n, batch_size, seed = flags.num_samples, flags.batch_size, flags.seed
    given = _as_filters(filters, model.settings)
    choice = choose_sampler(model.spec, flags, has_filters=given is not None)
    used = given if choice.given_filters else (model.filters if choice.builtin_filters else None)
    check_fits_in_memory(min(batch_size, n), model.shape, model.device)
    parts = sampling_parts_for(model.opened, choice, used)
    start, gaussian, _, _ = start_for(model.spec, flags, model.opened, choice, parts, used or given or model.filters)
    job = SampleJob(model=model.opened, sampler=start.sampler, steps=start.steps, out=None, num_samples=n,
                    batch_size=batch_size, seed=seed, snr=model.settings.snr, precond=parts.precond,
                    per_sample_step=per_sample_step, sampler_options=parts.options, warnings=parts.warnings,
                    teleport=start.teleport, data_gaussian=gaussian if start.teleport.sigma_t is not None else None)
    return _run(job, _progress(progress))


def _progress(progress: bool | SampleProgress) -> SampleProgress:
    if progress is True:
        return LineProgress()
    return progress or NoProgress()


class LineProgress:
    """progress=True: one line on stderr, rewritten in place (images done, the batch's step)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.total = self.done = 0

    def _show(self, text: str, end: str = "") -> None:
        self.stream.write(f"\rpds: {self.done}/{self.total} images{text}{end}")
        self.stream.flush()

    def start(self, total: int, done: int, steps: int) -> None:
        self.total, self.done = total, done

    def batch(self, first: int, last: int) -> None:
        self._show(f", samples {first}..{last}")

    def step(self, i: int, n: int, nfe_rate: float) -> None:
        self._show(f", step {i + 1}/{n} ({nfe_rate:.1f} NFE/s)  ")

    def batch_done(self, count: int) -> None:
        self.done += count
        self._show(" " * 30, end="\n" if self.done >= self.total else "")


def _run(job: SampleJob, progress: SampleProgress) -> torch.Tensor:
    for line in job.warnings:
        warn_on_stderr(line)
    score = CountingScore(job.model.score)
    sampler_fn = sampler_info(job.sampler).fn
    out = torch.empty((job.num_samples, *job.shape), dtype=torch.float32)
    t0 = time.perf_counter()
    progress.start(job.num_samples, 0, len(job.steps))
    for k in range(batch_count(job.num_samples, job.batch_size)):
        indices = batch_indices(k, job.num_samples, job.batch_size)
        progress.batch(indices[0], indices[-1])
        x = make_batch(job, indices, sampler_fn=sampler_fn, score=score, callback=step_callback(indices, score, progress, t0))
        out[indices[0] : indices[-1] + 1] = x.clamp(0.0, 1.0).float().cpu()
        progress.batch_done(len(indices))
    return out


def filters(images_or_folder, size: int | None = None, *, channels: int | None = None, limit: int | None = None,
            workers: int | None = None, progress: Callable[[int, int], None] | None = None) -> Filters:
    """PDS filter statistics, as `pds filters` makes them: of the images in a folder (resized and
    centre-cropped to `size`, `channels` 1 or 3, default 3; `limit`: the first N by path;
    `progress(done, total)` after each chunk), or of images [N, C, H, W] in [0, 1] (a tensor or
    array, taken at their own size: `size` and `channels`, if given, must match)."""
    if isinstance(images_or_folder, (str, Path)):
        if size is None:
            raise PdsError("give the image size: filters(folder, size)")
        return folder_statistics(Path(images_or_folder).expanduser(), size=int(size),
                                 channels=3 if channels is None else int(channels), limit=limit, workers=workers,
                                 progress=progress)
    x = torch.as_tensor(np.asarray(images_or_folder) if not isinstance(images_or_folder, torch.Tensor)
                        else images_or_folder)
    if x.ndim != 4:
        raise PdsError(f"images must be [N, C, H, W], got a tensor shaped {tuple(x.shape)}")
    for what, given, actual in (("size", size, x.shape[-1]), ("channels", channels, x.shape[1])):
        if given is not None and int(given) != actual:
            raise PdsError(f"{what} {given} does not match the images ({x.shape[1]}x{x.shape[2]}x{x.shape[3]})")
    x = x[:limit] if limit else x
    return compute_statistics(x.split(64), source="images")


def fid(samples, reference, *, features: str | Path | None = None, device: str | None = None, batch_size: int = 64,
        workers: int | None = None, kid_subsets: int = KID_SUBSETS, kid_subset_size: int | None = None,
        save_stats: str | Path | None = None, force: bool = False,
        progress: Callable[[str, int, int], None] | None = None) -> dict:
    """FID and KID of `samples` against `reference`, as `pds fid --json` prints them: each a folder
    of images, a samples.npz, a statistics .npz, or images [N, C, H, W] in [0, 1] (tensor or
    array). `features`: None for torch-fidelity's Inception (pip install "pds[eval]"), or a
    feature network file (docs/evaluation.md). `save_stats`: write the reference's statistics
    there (an .npz; `force` replaces one). `progress(label, done, total)` per batch."""
    counts = fid_counts(batch_size=batch_size, kid_subsets=kid_subsets, workers=workers,
                        kid_subset_size=kid_subset_size)
    if save_stats is not None:
        save_stats = Path(save_stats)
        if save_stats.suffix.lower() != ".npz":
            raise PdsError(f"--save-stats writes an .npz file, not {save_stats.name}")
        prepare_out_file(save_stats, force=force)  # before the work, not after
    # The inputs first: a missing folder is said before a missing feature network.
    sides = [_image_side(side, name) for side, name in ((samples, "samples"), (reference, "reference"))]
    net = open_features(Path(features) if features is not None else None, resolve_device(device or "auto"))
    result = compare(*sides, net, **counts, save_stats=save_stats, progress=progress)
    result["device"] = str(net.device)
    return result


def fid_counts(*, batch_size, kid_subsets, workers, kid_subset_size) -> dict:
    """`fid`'s counts, typed or as text, by the rules of `pds fid`'s flags (errors name the flag)."""
    return {"batch_size": flag_rules.whole_number("--batch-size", batch_size),
            "kid_subsets": flag_rules.whole_number("--kid-subsets", kid_subsets),
            "workers": None if workers is None else flag_rules.whole_number("--workers", workers),
            "kid_subset_size": None if kid_subset_size is None
            else flag_rules.whole_number("--kid-subset-size", kid_subset_size, 2)}


def _image_side(side, name: str):
    if isinstance(side, (str, Path)):
        return open_side(Path(side).expanduser())
    a = side.detach().float().cpu().numpy() if isinstance(side, torch.Tensor) else np.asarray(side, np.float32)
    if a.ndim != 4 or a.shape[1] not in (1, 3) or len(a) == 0:
        raise PdsError(f"{name} must be images [N, C, H, W] with 1 or 3 channels, got an array shaped {a.shape}")
    if not np.isfinite(a).all():
        raise PdsError(f"{name} hold NaN or infinite values")
    return ArraySet.of(a, name)
