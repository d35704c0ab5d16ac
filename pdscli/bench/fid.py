"""`pds bench --fid-ref`: FID and KID beside the time of each sampling run.

The reference's statistics are computed (or read) once; each run's samples then go through the
same feature network. The run's sample count is small next to a paper's 50,000, so every figure
carries its count and KID's spread, and the report states FID's small-sample bias.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from pdscli.errors import PdsError
from pdscli.evaluate.compare import SMALL_N_NOTE, check_pair, describe, measure, open_side, statistics
from pdscli.evaluate.features import open_features
from pdscli.evaluate.fid import Statistics
from pdscli.evaluate.imagesets import ArraySet

FID_BATCH = 64  # images per feature-network call


def check_fid_ref(path: Path, model_kind: str | None) -> None:
    """The cheap checks of --fid-ref, before any model is loaded."""
    if model_kind == "gaussian":
        raise PdsError("--fid-ref needs a network model: the analytic model's quality is exact (spectral_kl), "
                       "and its images are not pictures an image network knows")
    if not Path(path).exists():
        raise PdsError(f"--fid-ref: no such file or folder: {path}")


class FidQuality:
    """FID/KID of sample batches against one reference, through one feature network."""

    def __init__(self, reference: Path, features: Path | None, shape: tuple[int, int, int], device: torch.device,
                 log: Callable[[str], None] = lambda s: None):
        self.net = open_features(features, device)
        side = open_side(reference)
        # The samples' size is the model's: check it against the reference before any image is read.
        check_pair(_Shape(shape), side, self.net)
        if not isinstance(side, Statistics):
            log(f"FID reference: features of {side.count} images in {reference} ...")
        self.reference = statistics(side, self.net, batch_size=FID_BATCH)
        self.info = {**describe(side), "features": self.net.name, "feature_dim": self.net.dim, "note": SMALL_N_NOTE}

    def measure(self, samples: torch.Tensor) -> dict:
        """FID, KID (mean, std over subsets) and the count of `samples` (float [N, C, H, W], clipped to [0, 1] as a PNG is)."""
        if not bool(torch.isfinite(samples).all()):
            return {"fid": None, "kid": None, "samples_count": int(samples.shape[0]), "reason": "samples not finite"}
        stats = statistics(ArraySet.of(samples.float().cpu().numpy()), self.net, batch_size=FID_BATCH)
        return measure(stats, self.reference)


class _Shape:
    """What check_pair reads of an image set: its size (the model's samples, not made yet)."""

    def __init__(self, shape: tuple[int, int, int]):
        self.size = (int(shape[1]), int(shape[2]))


def fid_cell(f: dict | None) -> str:
    """A table cell: `FID / KID ± std`, or why there is none."""
    if not f:
        return "—"
    if f.get("fid") is None:
        return f.get("reason", "—")
    k = f["kid"]
    return f"{f['fid']:.4g} / {k['mean']:.3g}±{k['std']:.2g}"


def fid_header(info: dict | None, count: int | None) -> str | None:
    """One line for the report's head: what the FID column is, and its caveat."""
    if not info:
        return None
    n = f"{count} samples per run" if count else "the samples of each run"
    return (f"FID / KID±std: {n} against {info['path']} ({info['count']} images, {info['kind']}), "
            f"{info['features']}; FID is biased upward at this count: compare within this report only")
