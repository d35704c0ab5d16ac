"""FID/KID of one image set against another: sets or statistics files in, one result out.

`pds fid` and `pds bench --fid-ref` both come here: `open_side` reads what the user named,
`statistics` runs the feature network over an image set (batch by batch, with progress),
`measure` compares two statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pdscli.errors import PdsError
from pdscli.evaluate.features import FeatureNet
from pdscli.evaluate.fid import (
    KID_SUBSETS,
    Statistics,
    frechet_distance,
    is_statistics_file,
    kid,
    load_statistics,
    save_statistics,
    statistics_of,
)
from pdscli.evaluate.imagesets import ImageSet, open_image_set

Progress = Callable[[str, int, int], None]  # (label, done, total)

# Said with every FID: a paper's number and a small run's number are different quantities.
SMALL_N_NOTE = ("FID is biased upward at small sample counts (more so below the feature dimension): compare FIDs "
                "only at equal counts; papers (score_sde, PDS) report 50,000 samples against the training set's statistics")


BATCH_BYTES = 1 << 30  # decoded pixels held per feature batch


def open_side(path) -> ImageSet | Statistics:
    """SAMPLES or REFERENCE: a statistics .npz (mu, sigma), else a folder of images or a samples.npz;
    a set or statistics already open (images in memory: `ArraySet`) is taken as it is."""
    if isinstance(path, (ImageSet, Statistics)):
        return path
    path = Path(path)
    if is_statistics_file(path):
        stats = load_statistics(path)
        stats.source = str(path)
        return stats
    return open_image_set(path)


def describe(side: ImageSet | Statistics) -> dict:
    if isinstance(side, Statistics):
        return {"path": side.source, "kind": "statistics", "count": side.count, "size": list(side.image_size)}
    return side.to_dict()


def _size(side: ImageSet | Statistics) -> tuple[int, int]:
    return tuple(side.image_size) if isinstance(side, Statistics) else side.size


def check_pair(samples: ImageSet | Statistics, reference: ImageSet | Statistics, net: FeatureNet) -> None:
    """Before any feature is computed: the two sides compare (one size, one feature network)."""
    for side in (samples, reference):
        if isinstance(side, Statistics) and side.feature != net.name:
            raise PdsError(f"{side.source} holds statistics of {side.feature}, not of {net.name}: "
                           "features of different networks do not compare (write new ones with --save-stats)")
    a, b = _size(samples), _size(reference)
    if a != b:
        raise PdsError(f"the samples are {a[0]}x{a[1]} and the reference is {b[0]}x{b[1]}: "
                       "compare images of one size (resize the reference to the model's size first)")


def batch_that_fits(side: ImageSet, batch_size: int) -> int:
    """At most `batch_size` images, and no more than BATCH_BYTES of decoded pixels: one legal
    10000x10000 RGB float image is 1.2 GB, and 64 of them would not fit anywhere."""
    per_image = side.size[0] * side.size[1] * (side.channels * 4 + 3)  # float decode + the uint8 batch
    return max(1, min(batch_size, BATCH_BYTES // per_image))


def statistics(side: ImageSet | Statistics, net: FeatureNet, *, batch_size: int = 64, workers: int | None = None,
               label: str = "images", progress: Progress | None = None) -> Statistics:
    """The statistics of an image set through `net` (a Statistics is returned as it is)."""
    if isinstance(side, Statistics):
        return side
    features = np.empty((side.count, net.dim), np.float32)
    done = 0
    for batch in side.batches(batch_that_fits(side, batch_size), workers=workers):
        out = net(torch.from_numpy(batch)).cpu().numpy()
        features[done : done + len(out)] = out
        done += len(out)
        if progress:
            progress(label, done, side.count)
    if not np.isfinite(features).all():
        raise PdsError(f"the feature network gave NaN or infinite features for {side.path}")
    return statistics_of(features, feature=net.name, image_size=side.size, source=str(side.path))


def measure(samples: Statistics, reference: Statistics, *, kid_subsets: int = KID_SUBSETS,
            kid_subset_size: int | None = None) -> dict:
    """FID and KID of two statistics, with the counts they rest on."""
    k = kid(samples.kid_features, reference.kid_features, subsets=kid_subsets, subset_size=kid_subset_size)
    return {"fid": frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma), "kid": k.to_dict(),
            "samples_count": samples.count, "reference_count": reference.count, "features": samples.feature}


def compare(samples_path, reference_path, net: FeatureNet, *, batch_size: int = 64, workers: int | None = None,
            kid_subsets: int = KID_SUBSETS, kid_subset_size: int | None = None, save_stats: Path | None = None,
            progress: Progress | None = None) -> dict:
    """`pds fid`: FID and KID of SAMPLES against REFERENCE, optionally saving the reference's statistics."""
    samples, reference = open_side(samples_path), open_side(reference_path)
    check_pair(samples, reference, net)
    if save_stats is not None and isinstance(reference, Statistics):
        raise PdsError(f"--save-stats: the reference {reference.source} is already a statistics file")
    if kid_subset_size is not None:
        # The file of a statistics side keeps only some features for KID: say so before the work, not after.
        room = min(s.kid_features.shape[0] if isinstance(s, Statistics) else s.count for s in (samples, reference))
        if kid_subset_size > room:
            raise PdsError(f"--kid-subset-size {kid_subset_size} is more than the smaller set holds for KID ({room})")
    opts = {"batch_size": batch_size, "workers": workers, "progress": progress}
    ref_stats = statistics(reference, net, label="reference", **opts)
    if save_stats is not None:
        save_statistics(ref_stats, save_stats)
    sample_stats = statistics(samples, net, label="samples", **opts)
    result = measure(sample_stats, ref_stats, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    result.update(samples=describe(samples), reference=describe(reference), feature_dim=net.dim,
                  saved_stats=str(save_stats) if save_stats is not None else None, note=SMALL_N_NOTE)
    return result
