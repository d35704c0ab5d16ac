"""PDS filters from an image folder: stream the images once, keep only running sums.

The statistics are the reference recipe (mask_gen_demo.py), see `pdscli.precondition`:
freq = log(1 + mean |fft2(x)|²) and space = mean x², each [C, H, W], over images in [0, 1].
Memory does not grow with the folder: images are decoded in chunks by a thread pool (Pillow
releases the GIL while decoding and resizing) and each chunk is folded into the accumulator
before the next-but-one is read.
"""

from __future__ import annotations

import io
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from rich.markup import escape

from pdscli import flag_rules
from pdscli.console import err_console
from pdscli.errors import PdsError, first_line
from pdscli.fsutil import DiskFull, atomic_group, prepare_out_file
from pdscli.images import image_files, load_image
from pdscli.precondition.operator import compute_statistics

CHUNK = 64  # images per batch handed to the accumulator
MASKS_DIR = Path("masks")


def _read(path: Path, size: int, channels: int):
    """One image as float [C, size, size], or the reason it cannot be read (never raises: one bad file must not stop a folder)."""
    try:
        return load_image(path, size=size, channels=channels)
    except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError, SyntaxError...
        return f"{type(e).__name__}: {first_line(e)}"  # messages must stay one line


def _decoded_chunks(files: list[Path], *, size: int, channels: int, workers: int, skipped: list, progress) -> Iterator[torch.Tensor]:
    """Batches [B, C, size, size] float32 of the readable files; unreadable ones go to `skipped`."""
    chunks = [files[k : k + CHUNK] for k in range(0, len(files), CHUNK)]
    done = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # Keep one chunk decoding ahead of the one being accumulated, and no more: bounded memory.
        ahead = [pool.submit(_read, p, size, channels) for p in chunks[0]] if chunks else []
        for k, chunk in enumerate(chunks):
            current = ahead
            ahead = [pool.submit(_read, p, size, channels) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
            images = []
            for path, fut in zip(chunk, current):
                result = fut.result()
                if isinstance(result, str):
                    skipped.append((path, result))
                else:
                    images.append(result)
            done += len(chunk)
            if progress:
                progress(done, len(files))
            if images:
                yield torch.from_numpy(np.stack(images))


def folder_statistics(folder, *, size: int, channels: int = 3, limit: int | None = None, workers: int | None = None,
                      progress: Callable[[int, int], None] | None = None, warn: Callable[[str], None] | None = None):
    """Filters (raw statistics) of the images under `folder`, resized and centre-cropped to `size`.

    Files are taken in sorted order (deterministic); `limit` keeps the first N. Unreadable files
    are skipped and reported through `warn` (default: a line on stderr). `progress(done, total)`
    is called after each chunk.
    """
    folder = Path(folder)
    flag_rules.whole_number("--size", size, 1)
    if channels not in (1, 3):
        raise flag_rules.refusal("--channels", "1 or 3", channels)
    if limit is not None:
        flag_rules.whole_number("--limit", limit, 1)
    files = image_files(folder)
    files = files[:limit] if limit else files
    if workers is not None:
        flag_rules.whole_number("--workers", workers, 1)
    workers = workers or min(8, os.cpu_count() or 1)

    skipped: list = []
    chunks = _decoded_chunks(files, size=size, channels=channels, workers=workers, skipped=skipped, progress=progress)
    first = next(chunks, None)  # the accumulator must not see an empty stream: say why instead
    if first is None:
        path, reason = skipped[0]  # every file was either read or skipped
        raise PdsError(f"none of the {len(files)} image files in {folder} could be read (first: {path.name}: {reason})")
    filters = compute_statistics(itertools.chain([first], chunks), source=str(folder))
    if skipped:
        names = ", ".join(p.name for p, _ in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        (warn or _warn)(f"skipped {len(skipped)} unreadable file(s) of {len(files)}: {names}")
    return filters


def _warn(message: str) -> None:
    # escape: file names may hold brackets, which Rich would read as markup.
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------
# Writing.


def default_out_path(folder, size: int) -> Path:
    """masks/<folder name>-<size>.npz"""
    name = Path(folder).resolve().name or "images"
    return MASKS_DIR / f"{name}-{size}.npz"


def output_paths(out, *, npy: bool) -> dict[str, Path]:
    """Every file `write_filters` makes: the .npz, its preview PNG and, with --npy, the reference's two
    .npy files in a folder named after the .npz (their names are the reference's, so they cannot sit side by side)."""
    out = Path(out)
    paths = {"npz": out, "preview": out.with_suffix(".png")}
    if npy:
        folder = out.with_suffix("")
        paths["freq_npy"] = folder / "freq_mask.npy"
        paths["space_npy"] = folder / "space_mask.npy"
    return paths


def check_outputs(out, *, npy: bool, force: bool) -> dict[str, Path]:
    """Before reading a large folder: every output is new (or --force) and its folder writable."""
    out = Path(out)
    if out.suffix.lower() != ".npz":
        raise PdsError(f"--out must name a .npz file, not {out}")
    paths = output_paths(out, npy=npy)
    for path in paths.values():
        prepare_out_file(path, force=force)
    return paths


def write_filters(filters, out, *, npy: bool = False, force: bool = False) -> dict[str, Path]:
    """The .npz (Filters.save), a preview PNG and optionally freq_mask.npy / space_mask.npy.

    The set is written whole or not at all (`fsutil.atomic_group`): every file goes to a
    temporary file beside its target first (where a full disk shows), then all are renamed.
    """
    paths = check_outputs(out, npy=npy, force=force)
    preview = io.BytesIO()
    preview_image(filters).save(preview, format="PNG")
    blobs = {paths["preview"]: preview.getvalue()}
    if npy:
        # The reference's layout: float32 [C, H, W], freq = log(1 + mean|fft2|²), space = mean x².
        blobs[paths["freq_npy"]] = _npy_bytes(_as_numpy(filters.freq))
        blobs[paths["space_npy"]] = _npy_bytes(_as_numpy(filters.space))
    try:
        with atomic_group() as group:
            filters.save(group.path(paths["npz"]))
            for target, data in blobs.items():
                group.path(target).write_bytes(data)
    except DiskFull:
        raise
    except OSError as e:
        raise PdsError(f"cannot write {e.filename or out}: {e.strerror or e}; no filter file was written") from None
    return paths


def _as_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def preview_image(filters, min_side: int = 192):
    """Grey picture: the log spectrum (fft-shifted, DC in the centre) | the space statistic, channel-averaged."""
    def normalised(a: np.ndarray) -> np.ndarray:
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)

    freq = normalised(np.fft.fftshift(_as_numpy(filters.freq).mean(axis=0)))
    space = normalised(_as_numpy(filters.space).mean(axis=0))
    h, w = freq.shape
    gap = max(2, w // 16)
    picture = np.ones((h, 2 * w + gap), np.float32)
    picture[:, :w], picture[:, w + gap :] = freq, space
    im = Image.fromarray(np.floor(picture * 255 + 0.5).astype(np.uint8))
    scale = max(1, -(-min_side // h))  # nearest-neighbour zoom so small filters are visible
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im
