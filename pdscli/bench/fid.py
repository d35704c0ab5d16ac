"""`pds bench --fid-ref`: FID and KID beside the time of each sampling run.

The reference's statistics are computed (or read) once; each run's samples then go through the
same feature network. The run's sample count is small next to a paper's 50,000, so every figure
carries its count and KID's spread, and the report states FID's small-sample bias.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch

from pdscli.errors import PdsError
from pdscli.evaluate.compare import SMALL_N_NOTE, check_pair, describe, measure, open_side, statistics
from pdscli.evaluate.features import INSTALL_HINT, open_features
from pdscli.evaluate.fid import Statistics
from pdscli.evaluate.imagesets import ArraySet

FID_BATCH = 64  # images per feature-network call


def check_fid_flags(fid_ref: Path | None, features: Path | None, model: str | None) -> None:
    """The cheap checks of --fid-ref / --fid-features, before any model is loaded."""
    if fid_ref is None:
        if features is not None:
            raise PdsError("--fid-features applies with --fid-ref")
        return
    if model == "gaussian":
        raise PdsError("--fid-ref needs a network model: the analytic model's quality is exact (spectral_kl), "
                       "and its images are not pictures an image network knows")
    if not Path(fid_ref).exists():
        raise PdsError(f"--fid-ref: no such file or folder: {fid_ref}")
    if features is not None and not Path(features).is_file():
        raise PdsError(f"--fid-features: no such file: {features}")
    if features is None and importlib.util.find_spec("torch_fidelity") is None:
        raise PdsError(INSTALL_HINT)


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
