"""The image sets FID compares: a folder of images or a pds `samples.npz`, read in batches of 8-bit RGB.

Every set reaches the feature network as uint8 [B, 3, H, W]: the 8-bit pictures a user looks at
and the pictures torch-fidelity's Inception takes. A `samples.npz` (float32 [N, C, H, W] in [0, 1])
is rounded to 8 bits exactly as `pds sample` rounds its PNGs, so a run's folder and its
samples.npz give the same features. Grey images are repeated into three channels, as the TF
FID code does for grey data sets. One set has one image size; sets are not resized here (the
feature network resizes, each in its own defined way).
"""

from __future__ import annotations

import math
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pdscli.errors import PdsError, first_line
from pdscli.images import image_files, load_image, to_uint8


@dataclass
class ImageSet:
    """A set of same-sized images: `batches()` yields uint8 [B, 3, H, W]."""

    path: Path
    kind: str  # "folder" | "samples.npz"
    count: int
    size: tuple[int, int]  # (H, W)
    channels: int  # as stored (1 or 3); batches always have 3

    def describe(self) -> str:
        return f"{self.count} images {self.size[0]}x{self.size[1]} ({self.path})"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "count": self.count, "size": list(self.size)}

    def batches(self, batch_size: int, *, workers: int | None = None) -> Iterator[np.ndarray]:
        raise NotImplementedError


def open_image_set(path) -> ImageSet:
    """A folder of images or a samples.npz, with its size checked; one-line errors for anything else."""
    path = Path(path)
    if path.is_dir():
        return FolderSet.open(path)
    if not path.exists():
        raise PdsError(f"no such file or folder: {path}")
    if path.suffix.lower() == ".npz":
        return NpzSet.open(path)
    raise PdsError(f"{path} is neither a folder of images nor a samples.npz (or a statistics .npz)")


# ----------------------------------------------------------------------------------------
# A folder of images.


def _read_rgb(path: Path) -> np.ndarray:
    """One image as uint8 [3, H, W], decoded as everywhere in pds (pdscli.images.load_image: grey and
    palette images become RGB, alpha is dropped, 16-bit and float images scaled by their own white)."""
    try:
        a = np.moveaxis(to_uint8(load_image(path, size=None, channels=3)), -1, 0)
    except PdsError:
        raise
    except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError, SyntaxError...
        raise PdsError(f"cannot read image {path}: {first_line(e)}") from None
    return np.ascontiguousarray(a)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # reads the header only
            return im.size[1], im.size[0]
    except Exception as e:
        raise PdsError(f"cannot read image {path}: {first_line(e)}") from None


@dataclass
class FolderSet(ImageSet):
    files: tuple[Path, ...] = ()

    @classmethod
    def open(cls, folder: Path) -> FolderSet:
        files = image_files(folder)
        size = _image_size(files[0])
        return cls(folder, "folder", len(files), size, 3, tuple(files))

    def batches(self, batch_size, *, workers=None):
        workers = workers or min(8, os.cpu_count() or 1)
        chunks = [self.files[k : k + batch_size] for k in range(0, len(self.files), batch_size)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # Pillow releases the GIL while decoding; one chunk decodes ahead of the one in use, no more.
            ahead = [pool.submit(_read_rgb, p) for p in chunks[0]] if chunks else []
            for k, chunk in enumerate(chunks):
                current = ahead
                ahead = [pool.submit(_read_rgb, p) for p in chunks[k + 1]] if k + 1 < len(chunks) else []
                images = [f.result() for f in current]
                for path, a in zip(chunk, images):
                    if a.shape[1:] != self.size:
                        raise PdsError(f"images in {self.path} differ in size: {self.files[0].name} is "
                                       f"{self.size[0]}x{self.size[1]}, {path.name} is {a.shape[1]}x{a.shape[2]}; "
                                       "FID takes one size per set")
                yield np.stack(images)


# ----------------------------------------------------------------------------------------
# Samples in memory (pds bench's runs).


def _floats_to_rgb8(x: np.ndarray) -> np.ndarray:
    """float [n, C, H, W] in [0, 1] -> uint8 [n, 3, H, W], rounded as `pds sample` rounds its PNGs."""
    a = np.moveaxis(to_uint8(x), -1, 1)
    return np.ascontiguousarray(np.repeat(a, 3, axis=1) if a.shape[1] == 1 else a)


@dataclass
class ArraySet(ImageSet):
    images: np.ndarray | None = None  # float32 [N, C, H, W] in [0, 1]

    @classmethod
    def of(cls, images, name: str = "samples") -> ArraySet:
        a = np.asarray(images, np.float32)
        return cls(Path(name), "array", a.shape[0], (a.shape[2], a.shape[3]), a.shape[1], a)

    def batches(self, batch_size, *, workers=None):
        for start in range(0, self.count, batch_size):
            yield _floats_to_rgb8(self.images[start : start + batch_size])


# ----------------------------------------------------------------------------------------
# A pds samples.npz, streamed: a 50k x 3 x 256 x 256 file is 39 GB of float32.


def _npz_member(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile) as e:
        raise PdsError(f"cannot read {path} as .npz: {e}") from None
    if "samples.npy" not in names:
        keys = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
        raise PdsError(f"{path} has no `samples` array (it holds {keys}); pds sample writes samples.npz with "
                       "samples float32 [N, C, H, W] in [0, 1]")
    return "samples.npy"


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _check_member_size(path: Path, member: str, shape, dtype: np.dtype) -> None:
    """The header's shape against the bytes the archive holds: a header may claim 10^12 samples."""
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        _read_header(f)
        header = f.tell()
        stored = zf.getinfo(member).file_size
    claimed = math.prod(int(s) for s in shape) * dtype.itemsize
    if stored - header != claimed:
        per_sample = claimed // shape[0]
        raise PdsError(f"{path}: its header says {shape[0]} samples of {list(shape[1:])} ({claimed} bytes) but it "
                       f"holds {max(stored - header, 0)} bytes (about {max(stored - header, 0) // per_sample} samples): "
                       "it is damaged or truncated")


@dataclass
class NpzSet(ImageSet):
    dtype: np.dtype = np.dtype(np.float32)

    @classmethod
    def open(cls, path: Path) -> NpzSet:
        member = _npz_member(path)
        with zipfile.ZipFile(path) as zf, zf.open(member) as f:
            shape, fortran, dtype = _read_header(f)
        if len(shape) != 4 or shape[1] not in (1, 3) or dtype.kind != "f" or fortran:
            raise PdsError(f"{path}: samples must be float [N, C, H, W] with C = 1 or 3 in [0, 1]; "
                           f"got {dtype} {list(shape)}")
        if shape[0] == 0:
            raise PdsError(f"{path} holds no samples")
        _check_member_size(path, member, shape, dtype)
        return cls(path, "samples.npz", shape[0], (shape[2], shape[3]), shape[1], dtype)

    def batches(self, batch_size, *, workers=None):
        per_image = self.channels * self.size[0] * self.size[1]
        with zipfile.ZipFile(self.path) as zf, zf.open("samples.npy") as f:
            _read_header(f)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                raw = f.read(n * per_image * self.dtype.itemsize)
                if len(raw) != n * per_image * self.dtype.itemsize:
                    raise PdsError(f"{self.path} is truncated: it ends before sample {start + len(raw) // (per_image * self.dtype.itemsize)}")
                x = np.frombuffer(raw, self.dtype).reshape(n, self.channels, *self.size)
                if not np.isfinite(x).all():
                    raise PdsError(f"{self.path} holds NaN or infinite values (samples {start}..{start + n - 1})")
                yield _floats_to_rgb8(x)
