"""FID and KID from feature vectors, and reference statistics files.

Everything here is numpy over features [N, D]; which network made the features is
`pdscli.evaluate.features`' business, and where the images come from is `pdscli.evaluate.imagesets`'.

- FID: the Fréchet distance between Gaussians fitted to the two feature sets,
  |mu1 - mu2|² + Tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½), in float64. The square root of the product
  goes through two symmetric eigendecompositions instead of a general matrix square root
  (scipy's sqrtm): for positive semi-definite S1, S2 the trace is the same, and it stays real
  and exact when the covariances are singular (fewer images than feature dimensions).
- KID: the unbiased estimate of the squared MMD with the kernel k(x, y) = (x·y / D + 1)³ over
  random subsets of both sets (Bińkowski et al. 2018), its mean and standard deviation.
- Statistics files (.npz): mu, sigma, count, the feature network's name and image size, and a
  random subset of the features themselves so that KID works against a file too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdscli.errors import PdsError
from pdscli.fsutil import atomic_save_npz

STATS_FORMAT = "pds-fid-statistics/1"
KID_KEEP = 2000  # reference features kept in a statistics file for KID (16 MB at D = 2048)
KID_SUBSETS = 100  # torch-fidelity's defaults, so that numbers compare
KID_SUBSET_SIZE = 1000
KID_SEED = 0  # subsets are drawn from a fixed seed: the same inputs give the same KID


# ----------------------------------------------------------------------------------------
# The two measures.


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet (2-Wasserstein) distance squared between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    # S1^½ S2 S1^½ is symmetric PSD with the eigenvalues of S1 S2: the trace of its root is Tr((S1 S2)^½).
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_root = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical sets


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance; tiny negative eigenvalues (rounding) count as 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / D + 1)³ for every pair of rows."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
    """The unbiased estimate of MMD² between the rows of x and of y (equal counts, at least 2)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = x.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    # Off-diagonal means within each set (a sample is not compared with itself), the full mean across.
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


@dataclass
class Kid:
    mean: float
    std: float
    subsets: int
    subset_size: int

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "subsets": self.subsets, "subset_size": self.subset_size}


def kid(x, y, *, subsets: int = KID_SUBSETS, subset_size: int | None = None, seed: int = KID_SEED) -> Kid:
    """KID: mmd2_unbiased over `subsets` random subsets of `subset_size` rows of each set.

    `subset_size` None: torch-fidelity's 1000, or all of the smaller set when it has fewer.
    The std is over subsets (how much the estimate moves with the draw), not a standard error.
    """
    n = min(len(x), len(y))
    size = min(KID_SUBSET_SIZE, n) if subset_size is None else subset_size
    if size < 2:
        raise PdsError(f"KID needs at least 2 images in each set; the smaller has {n}")
    if size > n:
        raise PdsError(f"--kid-subset-size {size} is more than the smaller set holds ({n} images)")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
              for _ in range(subsets)]
    return Kid(float(np.mean(values)), float(np.std(values)), subsets, size)


# ----------------------------------------------------------------------------------------
# Statistics of one set, and their files.


@dataclass
class Statistics:
    """What FID and KID need of one image set; `feature` names the network (sets of different networks never mix)."""

    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D], ddof 1 (as torch-fidelity and pytorch-fid)
    count: int
    feature: str
    image_size: tuple[int, int]  # (H, W) of the images, before the feature network's own resize
    kid_features: np.ndarray  # float32 [m, D]: all features, or KID_KEEP of them in a file
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def statistics_of(features: np.ndarray, *, feature: str, image_size, source: str = "") -> Statistics:
    """Mean and covariance in float64 of features [N, D] (float32), centred before the products."""
    features = np.asarray(features, np.float32)
    n = features.shape[0]
    if n < 2:
        raise PdsError(f"FID needs at least 2 images in each set; {source or 'a set'} has {n}")
    mu = features.mean(axis=0, dtype=np.float64)
    sigma = np.zeros((features.shape[1],) * 2, np.float64)
    for k in range(0, n, 4096):  # in chunks: a float64 copy of 50k x 2048 features would be 800 MB
        c = features[k : k + 4096].astype(np.float64) - mu
        sigma += c.T @ c
    sigma /= n - 1
    return Statistics(mu, sigma, n, feature, tuple(int(s) for s in image_size), features, source)


def save_statistics(stats: Statistics, path) -> None:
    """Write `stats` atomically, keeping KID_KEEP randomly chosen features (fixed seed) for KID."""
    keep = stats.kid_features
    if len(keep) > KID_KEEP:
        keep = keep[np.sort(np.random.default_rng(KID_SEED).choice(len(keep), KID_KEEP, replace=False))]
    atomic_save_npz(
        path, format=np.array(STATS_FORMAT), mu=stats.mu, sigma=stats.sigma, count=np.array(stats.count),
        feature=np.array(stats.feature), image_size=np.array(stats.image_size, np.int64),
        kid_features=np.asarray(keep, np.float32), source=np.array(stats.source),
    )


def is_statistics_file(path) -> bool:
    """A .npz with mu and sigma (ours, or another tool's, which `load_statistics` then explains)."""
    path = Path(path)
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path) as f:
            return "mu" in f.files and "sigma" in f.files
    except (OSError, ValueError):
        return False


def load_statistics(path) -> Statistics:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            fmt = str(f["format"]) if "format" in f.files else ""
            if fmt != STATS_FORMAT:
                raise PdsError(f"{path} holds mu and sigma but not pds's statistics format ({STATS_FORMAT}): "
                               "it does not say which feature network made it; write one with `pds fid ... --save-stats`")
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            stats = Statistics(mu, sigma, int(f["count"]), str(f["feature"]), tuple(int(s) for s in f["image_size"]),
                               f["kid_features"].astype(np.float32), str(f["source"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PdsError(f"cannot read statistics file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    d = stats.dim if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or stats.kid_features.ndim != 2 or stats.kid_features.shape[1] != d:
        raise PdsError(f"statistics file {path} is inconsistent: mu {mu.shape}, sigma {sigma.shape}, "
                       f"kid_features {stats.kid_features.shape}")
    fault = _damage(stats)
    if fault:
        raise PdsError(f"statistics file {path} is damaged: {fault}; write it again with `pds fid ... --save-stats`")
    return stats


SYMMETRY_TOL = 1e-6  # relative to the covariance's largest entry (float64 sums of float32 features)
PSD_TOL = 1e-6  # a negative eigenvalue beyond this fraction of the largest is not rounding


def _damage(stats: Statistics) -> str:
    """What makes statistics unusable for FID or KID, or "" (a covariance must be finite, symmetric
    and positive semi-definite up to rounding; a mean of D finite values; at least 2 images)."""
    mu, sigma, keep = stats.mu, stats.sigma, stats.kid_features
    if stats.count < 2:
        return f"count {stats.count} (FID needs at least 2 images)"
    if len(stats.image_size) != 2 or min(stats.image_size) < 1:
        return f"image_size {list(stats.image_size)}"
    if keep.shape[0] < 2:
        return f"{keep.shape[0]} features kept for KID (it needs at least 2)"
    for name, a in (("mu", mu), ("sigma", sigma), ("kid_features", keep)):
        if not np.isfinite(a).all():
            return f"{name} holds NaN or infinite values"
    scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
    if float(np.abs(sigma - sigma.T).max()) > SYMMETRY_TOL * scale:
        return "sigma is not symmetric"
    eig = np.linalg.eigvalsh(sigma)
    if eig[0] < -PSD_TOL * max(float(eig[-1]), scale):
        return f"sigma is not positive semi-definite (eigenvalue {eig[0]:.3g})"
    return ""
