"""Training images: an image folder, or the built-in `digits` data set, as one float tensor in [0, 1].

Everything is loaded into memory once: the trainer is meant for small data (the built-in
model's 1,797 digits, a few thousand images at most), not for streaming a large corpus.
"""

from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from pdscli.errors import PdsError
from pdscli.images import image_files, load_image  # the same reading as `pds filters`

# Data sets known by name; anything else is taken as a folder path.
BUILTIN_DATASETS = ("digits",)


def load_dataset(source: str, *, size: int, channels: int) -> torch.Tensor:
    """`digits` or an image folder -> float32 [N, channels, size, size] in [0, 1]."""
    if size < 1 or channels not in (1, 3):
        raise PdsError(f"bad image shape: size {size}, channels {channels} (channels must be 1 or 3)")
    if str(source) in BUILTIN_DATASETS:
        return load_digits(size=size, channels=channels)
    return load_image_folder(source, size=size, channels=channels)


def load_digits_8x8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits (shipped inside the package, no download): float [N, 8, 8] in [0, 1], labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise PdsError('the built-in `digits` data set needs scikit-learn: pip install "pds[train]"') from None
    bunch = sk_load_digits()
    # The pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap), so /16 maps them onto [0, 1].
    images = bunch.images.astype(np.float32) / 16.0
    return images, bunch.target.astype(np.int64)


def upscale_digits(images_8x8: np.ndarray, size: int) -> torch.Tensor:
    """float [N, 8, 8] in [0, 1] -> [N, 1, size, size], bilinear: the one resampling the model is trained on."""
    x = torch.from_numpy(np.asarray(images_8x8, dtype=np.float32))[:, None]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0)


def downscale_to_8x8(images: torch.Tensor) -> torch.Tensor:
    """[N, C, S, S] -> [N, 8, 8] grey, area average: how generated digits are compared with the 8x8 originals."""
    x = images.float()
    if x.shape[1] > 1:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, (8, 8))
    return x[:, 0]


def load_digits(*, size: int, channels: int = 1) -> torch.Tensor:
    images, _ = load_digits_8x8()
    x = upscale_digits(images, size)
    return x.repeat(1, channels, 1, 1) if channels > 1 else x


def load_image_folder(folder, *, size: int, channels: int) -> torch.Tensor:
    """Every image in `folder`, center-cropped to a square and resized to `size`: float32 [N, C, size, size].

    The same preprocessing as `pds filters` (pdscli.images.load_image), so filters computed from a
    folder match a model trained on it. A file that cannot be read is an error here, not a skip:
    silently training on part of the data would make the recipe irreproducible.
    """
    hint = f" (built-in data sets: {', '.join(BUILTIN_DATASETS)})" if "/" not in str(folder) else ""
    arrays = []
    for path in image_files(folder, hint=hint):
        try:
            arrays.append(load_image(path, size=size, channels=channels))
        except Exception as e:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
            raise PdsError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return torch.from_numpy(np.stack(arrays))


def max_pairwise_distance(x: torch.Tensor, chunk: int = 512) -> float:
    """The largest Euclidean distance between two training images.

    Song & Ermon (2020), technique 1: sigma_max should be about this large, so that the prior
    N(0, sigma_max² I) covers the whole data set and sampling can reach every mode.
    """
    flat = x.reshape(x.shape[0], -1).double()
    best = 0.0
    for i in range(0, flat.shape[0], chunk):
        d = torch.cdist(flat[i : i + chunk], flat)
        best = max(best, float(d.max()))
    return best
