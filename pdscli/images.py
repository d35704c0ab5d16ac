"""Images in and out: float [C, H, W] in [0, 1] <-> 8-bit pictures, grids, folder readers."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from pdscli.errors import PdsError
from pdscli.fsutil import atomic_save_image

# Pillow's UserWarnings (e.g. "Palette images with Transparency expressed in bytes should be
# converted to RGBA") are about conversions pds makes on purpose (alpha is dropped): they must not
# reach the terminal raw, before pds's own lines. Decoding errors still end in pds's one line.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")

# What Pillow can read that people keep data sets in (same list as pdscli.train.datasets).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def to_numpy(x) -> np.ndarray:
    """A torch tensor or array -> float32 numpy array on the CPU."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def to_uint8(x) -> np.ndarray:
    """Float [..., C, H, W] in [0, 1] -> uint8 [..., H, W, C], rounded to nearest (as torchvision's save_image)."""
    a = np.clip(to_numpy(x), 0.0, 1.0)
    a = np.floor(a * 255.0 + 0.5).astype(np.uint8)
    return np.moveaxis(a, -3, -1)


def from_uint8(a: np.ndarray) -> np.ndarray:
    """uint8 [H, W] or [H, W, C] -> float32 [C, H, W] in [0, 1]."""
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    return np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32) / 255.0


def to_pil(x):
    """Float [C, H, W] in [0, 1] (C = 1 or 3) -> a PIL image (L or RGB)."""
    a = to_uint8(x)
    if a.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(a[..., 0]))  # 2-D uint8 -> mode L
    if a.shape[-1] != 3:
        raise ValueError(f"cannot picture {a.shape[-1]} channels; need 1 or 3")
    return Image.fromarray(np.ascontiguousarray(a))  # H x W x 3 uint8 -> mode RGB


def save_png(path, x) -> None:
    """Write float [C, H, W] in [0, 1] as an 8-bit PNG, atomically (no half-written file on Ctrl-C)."""
    atomic_save_image(path, to_pil(x))


def load_png(path) -> np.ndarray:
    """A PNG written by `save_png` -> float32 [C, H, W] in [0, 1] (8-bit quantised)."""
    with Image.open(path) as im:
        return from_uint8(np.asarray(im))


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0, min_cell: int = 0) -> np.ndarray:
    """Float [N, C, H, W] -> one float [C, H', W'] picture, `nrow` images per row (default: a square).

    `min_cell`: small images are enlarged by an integer factor (nearest, pixels stay sharp) so
    that each is at least this wide; a grid of 16-pixel digits is otherwise too small to look at.
    """
    a = to_numpy(images)
    factor = max(1, min_cell // a.shape[-1]) if min_cell else 1
    if factor > 1:
        a = a.repeat(factor, axis=-2).repeat(factor, axis=-1)
    n, c, h, w = a.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, np.float32)
    for k in range(n):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = a[k]
    return grid


def list_images(folder) -> list[Path]:
    """Image files under `folder`, recursively, sorted (so statistics are deterministic). In a
    `pds sample` output folder (it holds run.json) grid.png is left out: a mosaic, not a sample,
    it would enter the filters', FID's and training's statistics as one more image."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if (folder / "run.json").is_file():
        files = [p for p in files if p != folder / "grid.png"]
    return files


def image_files(folder, *, hint: str = "") -> list[Path]:
    """`list_images`, with a one-line error for a missing path, a file, or a folder without images.

    `hint` is added to the "no such folder" message (e.g. the built-in data set names).
    """
    folder = Path(folder)
    if not folder.exists():
        raise PdsError(f"no such folder: {folder}{hint}")
    if not folder.is_dir():
        raise PdsError(f"{folder} is not a folder of images")
    files = list_images(folder)
    if not files:
        raise PdsError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {folder}")
    return files


# Modes Pillow keeps more than 8 bits per sample in, with the value that means white: 16-bit
# integers (PNG, TIFF; mode I is how older Pillows and some TIFFs hold them) and floats in [0, 1].
HIGH_DEPTH_WHITE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def load_image(path, *, size: int | None, channels: int = 3) -> np.ndarray:
    """Read any Pillow image -> float32 [channels, size, size] in [0, 1] (size None: as it is).

    Centre square crop, then resize to `size`: the same as resizing the shorter side to `size`
    and centre-cropping, and the same preprocessing as `pdscli.train.datasets` (training data).
    8-bit modes (L, RGB, P, LA, RGBA, CMYK, 1, ...) go through Pillow's conversion to L or RGB
    (alpha is dropped); 16-bit and float images are scaled by their own white (65535, 1.0), never
    clipped to 8 bits. A file whose values cannot mean [0, 1] is refused (PdsError), not guessed.
    """
    with Image.open(path) as im:
        if im.mode in HIGH_DEPTH_WHITE:
            return _load_high_depth(im, Path(path), size=size, channels=channels)
        try:
            im = im.convert("L" if channels == 1 else "RGB")
        except ValueError as e:  # a mode Pillow cannot convert (e.g. La)
            raise PdsError(f"cannot read image {Path(path).name}: Pillow mode {im.mode}: {e}") from None
        return from_uint8(np.asarray(_square(im, size), dtype=np.uint8))


def _square(im, size: int | None):
    """Centre square crop, resized to `size` (Lanczos when shrinking, for anti-aliasing; bicubic when
    growing); size None keeps the image as it is."""
    if size is None:
        return im
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize((size, size), Image.LANCZOS if side > size else Image.BICUBIC)
    return im


def _load_high_depth(im, path: Path, *, size: int | None, channels: int) -> np.ndarray:
    """A one-channel 16-bit or float image, scaled to [0, 1] and resampled in float (mode F)."""
    a = np.asarray(im.convert("F") if im.mode != "F" else im, dtype=np.float32) / HIGH_DEPTH_WHITE[im.mode]
    if not np.isfinite(a).all():
        raise PdsError(f"cannot read image {path.name}: its {im.mode} pixels include NaN or infinity")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:
        white = "1.0" if im.mode == "F" else "65535"
        raise PdsError(f"cannot read image {path.name}: its {im.mode} pixels span {lo * HIGH_DEPTH_WHITE[im.mode]:g}.."
                       f"{hi * HIGH_DEPTH_WHITE[im.mode]:g}, not 0..{white}; convert it to 8 or 16 bits")
    grey = np.asarray(_square(Image.fromarray(a), size), dtype=np.float32)
    grey = np.clip(grey, 0.0, 1.0)  # Lanczos overshoots at edges; 8-bit images are clipped by their type
    return np.ascontiguousarray(np.repeat(grey[None], channels, axis=0))
