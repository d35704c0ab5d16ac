"""The output folder of a `pds sample` run: its files, --force, --resume, the lock, the end of a run.

Files in the output folder:
    000012.png      sample 12, 8-bit (written as soon as its batch finishes)
    .partial/       12.npy: sample 12's float32 values, kept until samples.npz is written,
                    so that a resumed run's samples.npz still holds exact floats;
                    run-config.json: what the run was started with (checked by --resume)
    grid.png        the first (up to 64) samples
    samples.npz     `samples` float32 [N, C, H, W] in [0, 1] (clipped, not 8-bit quantised),
                    `indices` int64 [N]
    run.json        every setting, the model, timings, NFE counts, versions
    .pds-lock       held (fcntl.flock) by the run writing here; names it
grid.png, samples.npz and run.json appear together (or not at all). A sample whose float
record is missing (e.g. .partial/ was deleted before --resume) is taken from samples.npz, else
from its PNG, i.e. 8-bit quantised; run.json lists those under `samples_from_png`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pdscli import __version__
from pdscli.devices import tf32_state
from pdscli.errors import PdsError
from pdscli.fsutil import (
    DiskFull,
    NotRegular,
    atomic_group,
    atomic_write_bytes,
    atomic_write_json,
    is_disk_full,
    refuse_odd,
    remove_stale_temporaries,
)
from pdscli.images import load_png, make_grid, save_png, to_pil
from pdscli.noise import NOISE_VERSION
from pdscli.sample.job import SampleJob

PARTIAL = ".partial"
RUN_CONFIG = "run-config.json"
FINAL_FILES = ("grid.png", "samples.npz", "run.json")
GRID_MAX = 64
GRID_MIN_CELL = 64  # pixels: small samples are enlarged in grid.png (not in the PNGs or samples.npz)
_SAMPLE_PNG = re.compile(r"^(\d+)\.png$")
_SAMPLE_NPY = re.compile(r"^(\d+)\.npy$")
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every whole PNG ends with

Warn = Callable[[str], None]


def png_name(index: int, num_samples: int) -> str:
    """Zero-padded to 6 digits (more when the run is larger), so names sort in index order."""
    return f"{index:0{max(6, len(str(max(num_samples - 1, 0))))}d}.png"


def float_path(out: Path, index: int) -> Path:
    return out / PARTIAL / f"{index}.npy"


def indices_on_disk(out: Path) -> set[int]:
    """Sample indices whose PNG exists (a PNG appears atomically, and --resume first removes damaged ones)."""
    if not out.is_dir():
        return set()
    return {int(m.group(1)) for p in out.iterdir() if (m := _SAMPLE_PNG.match(p.name))}


def write_sample(out: Path, index: int, num_samples: int, x: np.ndarray) -> bool:
    """Write what is missing of sample `index`: its float record, then its PNG (a PNG on disk
    means the sample is done). Returns whether the PNG was new."""
    if not float_path(out, index).exists():
        _save_npy(float_path(out, index), x)
    png = out / png_name(index, num_samples)
    if png.exists():
        return False
    save_png(png, x)
    return True


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------
# Before a run (main rank): the folder's state.


def _run_files(out: Path) -> list[Path]:
    """The entries of `out` named as a run's files (whatever they are: --force and --resume check that)."""
    return [p for p in out.iterdir() if _SAMPLE_PNG.match(p.name) or p.name in (*FINAL_FILES, PARTIAL)]


def clear_previous_run(out: Path) -> None:
    """--force: remove what an earlier run wrote here (and nothing else the user keeps in the folder).
    A folder under one of the run's names is the user's: refused, not removed."""
    for p in _run_files(out):
        if p.is_dir() and not p.is_symlink() and p.name != PARTIAL:
            raise NotRegular(p, "outputs")
    for p in _run_files(out):
        if p.name != PARTIAL:
            p.unlink()
    _remove_partial(out)
    remove_stale_temporaries(out)


def _remove_partial(out: Path) -> None:
    path = out / PARTIAL
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def repair(out: Path, shape: tuple[int, ...], warn: Warn) -> bool:
    """--resume: what a crash, a full disk or a hand edit can leave, treated as missing (so it is
    remade) with a warning: a .partial that is not a folder, a damaged PNG, a damaged float record.
    Returns whether the run's record went with a damaged .partial (check_resume then cannot compare)."""
    remove_stale_temporaries(out)
    for p in _run_files(out):  # a link could carry a write outside the folder; a folder is not ours
        if p.name != PARTIAL:
            refuse_odd(p, "outputs")
        elif p.is_symlink():
            raise NotRegular(p, "float records")
    partial = out / PARTIAL
    if partial.exists() and not partial.is_dir():
        warn(f"{partial} is not a folder; removed (float records of finished samples come from samples.npz or the PNGs, "
             "and the run's settings cannot be compared with the earlier ones)")
        partial.unlink()
        record_lost = True
    else:
        record_lost = False
    pngs = {int(m.group(1)): p for p in sorted(out.iterdir()) if (m := _SAMPLE_PNG.match(p.name))}
    for p in pngs.values():
        if not _whole_png(p):
            warn(f"{p} is damaged; it will be made again")
            p.unlink()
    if not partial.is_dir():
        return record_lost
    remove_stale_temporaries(partial)
    for p in sorted(partial.iterdir()):
        m = _SAMPLE_NPY.match(p.name)
        if m or p.name == RUN_CONFIG:
            refuse_odd(p, "float records")
        if m and not _whole_npy(p, shape):
            warn(f"{p} is damaged; sample {m.group(1)} will be made again")
            p.unlink()
            # Made again rather than taken from its PNG, which holds only 8 bits.
            png = pngs.get(int(m.group(1)))
            if png is not None:
                png.unlink(missing_ok=True)
    return record_lost


def _whole_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(len(_PNG_START))
            size = f.seek(0, 2)
            if size < len(_PNG_START) + len(_PNG_END):
                return False
            f.seek(size - len(_PNG_END))
            return head == _PNG_START and f.read() == _PNG_END
    except OSError:
        return False


def _whole_npy(path: Path, shape: tuple[int, ...]) -> bool:
    """A float32 C-order array of `shape` with all its bytes (reads the header only)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got, fortran, dtype = read_header(f)
            return (tuple(got) == tuple(shape) and dtype == np.float32 and not fortran
                    and path.stat().st_size == f.tell() + int(np.prod(shape)) * 4)
    except (OSError, ValueError, EOFError, SyntaxError):
        return False


def check_resume(job: SampleJob, *, record_lost: bool = False) -> None:
    """--resume must continue the same run: refuse different settings rather than mix two runs'
    images, refuse images with no record of the run that made them (unless `record_lost`: its
    record went with a damaged .partial, which repair warned about), and refuse a smaller
    --num-samples that would drop saved float data."""
    before = None
    for path, key in ((job.out / PARTIAL / RUN_CONFIG, None), (job.out / "run.json", "fingerprint")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            data = json.loads(path.read_text())
            before = data.get(key) if key else data
            if before:
                break
    if not before and not record_lost and _run_files(job.out):
        raise PdsError(f"--resume: {job.out} holds images but no run record ({PARTIAL}/{RUN_CONFIG} or run.json), so "
                       "nothing says they are this run's; use --force to start over, or another --out")
    if before:
        _check_noise_version(job.out, before)
        now = json.loads(json.dumps(job.fingerprint()))  # the same JSON round trip as the stored copy
        changed = [k for k in now if k in before and before[k] != now[k]]
        if changed:
            diffs = ", ".join(f"{k} {before[k]!r} -> {now[k]!r}{_flag_of(k)}" for k in changed)
            why = (" (the default batch-mean corrector step makes a batch's images depend on each other)"
                   if changed == ["batch_size"] else "")
            raise PdsError(f"--resume would mix two different runs ({diffs}){why}; use the same flags, or --force to start over")
    beyond = _saved_floats_beyond(job.out, job.num_samples)
    if beyond:
        raise PdsError(
            f"--resume with --num-samples {job.num_samples} would drop the saved samples {job.num_samples}.."
            f"{beyond - 1} from samples.npz; pass --num-samples {beyond} (or more), or --force to start over"
        )


# The flag that sets each fingerprint key, where its name differs (named in --resume's refusal).
_FLAGS = {"num_scales": "--num-scales", "sigma_max": "--sigma-max", "schedule": "--schedule", "precision": "--precision",
          "device": "--device", "tf32": "--tf32", "per_sample_step": "--per-sample-step", "alpha": "--alpha",
          "filters": "--masks", "seed": "--seed", "sampler": "--sampler", "steps": "--steps", "snr": "--snr",
          "batch_size": "--batch-size", "model": "the model", "model_sha256": "the model's weights"}


def _flag_of(key: str) -> str:
    return f" ({_FLAGS[key]})" if key in _FLAGS else ""


def _check_noise_version(out: Path, before: dict) -> None:
    """Another noise generator makes other images for the same seed: never mix them in one run.
    Runs that predate the record drew version 1 (a torch.Generator per sample)."""
    made_with = before.get("noise_version", 1)
    if made_with != NOISE_VERSION:
        raise PdsError(f"--resume: {out} was made with noise generator version {made_with} and this pds draws version "
                       f"{NOISE_VERSION}, so its images would not continue that run; use --force to start over")


def _saved_floats_beyond(out: Path, num_samples: int) -> int:
    """1 + the largest sample index with float data saved here, if it is >= num_samples; else 0."""
    largest = -1
    with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile), np.load(out / "samples.npz") as z:
        indices = z["indices"]
        largest = int(indices.max()) if indices.size else -1
    if (out / PARTIAL).is_dir():
        for p in (out / PARTIAL).iterdir():
            if m := _SAMPLE_NPY.match(p.name):
                largest = max(largest, int(m.group(1)))
    return largest + 1 if largest >= num_samples else 0


def start_partial(job: SampleJob) -> None:
    try:
        (job.out / PARTIAL).mkdir(exist_ok=True)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(job.out / PARTIAL) from None
        raise
    atomic_write_json(job.out / PARTIAL / RUN_CONFIG, job.fingerprint())


# ----------------------------------------------------------------------------------------
# The end of a run (main rank only): grid.png, samples.npz and run.json, together.


class _FloatSource:
    """Sample i's float values: .partial/i.npy, else an earlier samples.npz (a run extended with
    --resume and a larger --num-samples), else the PNG (8-bit; recorded)."""

    def __init__(self, out: Path, num_samples: int):
        self.out, self.num_samples = out, num_samples
        self.from_png: list[int] = []
        self._old: dict | None = None

    def _old_npz(self) -> dict:
        if self._old is None:
            self._old = {}
            with contextlib.suppress(OSError, ValueError, KeyError, zipfile.BadZipFile), \
                    np.load(self.out / "samples.npz") as z:
                self._old = dict(zip(z["indices"].tolist(), z["samples"]))
        return self._old

    def __call__(self, index: int) -> np.ndarray:
        path = float_path(self.out, index)
        if path.exists():
            return np.load(path)
        old = self._old_npz()
        if index in old:
            return old[index]
        self.from_png.append(index)
        return load_png(self.out / png_name(index, self.num_samples))


def _write_samples_npz(path: Path, num_samples: int, shape, get) -> np.ndarray:
    """Stream samples into an .npz one by one (memory stays flat for 50k samples); return the grid's samples."""
    grid = []
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        with zf.open("samples.npy", "w", force_zip64=True) as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                      "fortran_order": False, "shape": (num_samples, *shape)}
            np.lib.format.write_array_header_2_0(f, header)
            for i in range(num_samples):
                x = np.ascontiguousarray(get(i), dtype=np.float32)
                if x.shape != tuple(shape):
                    raise PdsError(f"sample {i} has shape {x.shape}, the run makes {tuple(shape)}")
                f.write(x.tobytes())
                if len(grid) < GRID_MAX:
                    grid.append(x)
        with zf.open("indices.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(num_samples, dtype=np.int64))
    return np.stack(grid)


def finish(job: SampleJob, record: Callable[[list[int], float], dict]) -> dict:
    """grid.png, samples.npz and run.json from every sample's files (all three or none); then drop
    .partial/. `record(from_png, finalize_s)` makes run.json's dict, which is returned."""
    on_disk = indices_on_disk(job.out)
    missing = next((i for i in range(job.num_samples) if i not in on_disk), None)
    if missing is not None:
        count = sum(1 for i in range(job.num_samples) if i not in on_disk)
        raise PdsError(f"{count} samples are missing (first: {missing}); rerun with --resume")
    t0 = time.perf_counter()
    source = _FloatSource(job.out, job.num_samples)
    with atomic_group() as group:
        grid = _write_samples_npz(group.path(job.out / "samples.npz"), job.num_samples, job.shape, source)
        to_pil(make_grid(grid, min_cell=GRID_MIN_CELL)).save(group.path(job.out / "grid.png"), format="PNG")
        data = record(source.from_png, time.perf_counter() - t0)
        group.path(job.out / "run.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    _remove_partial(job.out)
    return data


def run_record(job: SampleJob, stats, *, total_s: float, resumed: int, from_png: list[int], finalize_s: float) -> dict:
    """run.json: every setting, the model, timings, NFE counts, versions."""
    steps, model = job.steps, job.model
    return {
        "pds_version": __version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"name": model.name, "sha256": model.sha256, **model.info},
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
        **job.meta(),
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
