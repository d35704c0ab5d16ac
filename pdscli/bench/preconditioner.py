"""The preconditioner PDS runs with in the bench: its filters (--masks, the analytic model's
exact spectrum, the built-in model's own, statistics of --reference, else a synthetic spectrum
that costs what real filters cost) and one Preconditioner per alpha."""

from __future__ import annotations

import numpy as np
import torch

from pdscli.bench.config import ANALYTIC, BenchConfig
from pdscli.bench.model import BenchModel
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.precondition import Filters, Preconditioner, compute_statistics
from pdscli.evaluate.moments import expected_freq_statistic
from pdscli.precondition.alpha import resolve_alpha
from pdscli.sample.model import check_filters_fit, open_filters
from pdscli.settings import SamplingSettings


def bench_filters(cfg: BenchConfig, model: BenchModel, reference: torch.Tensor | None) -> tuple[Filters, dict]:
    """(Filters, info): --masks; the analytic model's exact spectrum; the built-in model's own;
    statistics of --reference; else a synthetic natural-image spectrum, which times PDS
    exactly as real filters would (the cost does not depend on the values) but makes no
    meaningful images."""
    c, size, _ = model.shape
    # --masks and the built-in model's own filters open as `pds sample` opens them (checked to fit).
    filters, _ = open_filters(cfg.masks, settings=model.settings, use_builtin=model.is_builtin)
    if filters is not None:
        source = f"--masks {cfg.masks}" if cfg.masks is not None else "the built-in model's own filters"
        return filters, {"source": source, "kinds": filters.kinds, "images_meaningful": True}
    if model.kind == ANALYTIC:
        exact = model.gaussian if model.gaussian is not None else model.mixture.moment_matched()
        filters, source, meaningful = spectrum_filters(exact), "the analytic model's exact spectrum", True
    elif reference is not None:
        filters = compute_statistics([reference.clamp(0, 1)], source=str(cfg.reference))
        source, meaningful = f"statistics of {len(reference)} --reference images", True
    else:
        filters = spectrum_filters(GaussianImageModel(size, c))
        source, meaningful = "synthetic 1/f^2 spectrum (no --masks or --reference): right cost, images not meaningful", False
    check_filters_fit(filters, model.settings)
    return filters, {"source": source, "kinds": filters.kinds, "images_meaningful": meaningful}


def spectrum_filters(g: GaussianImageModel) -> Filters:
    """Frequency and space statistics of a stationary Gaussian model, exactly: the frequency
    one from its spectrum, the space one flat (mean^2 + std^2 in every pixel), which gives the
    identity space filter the data calls for, while PDS still pays for applying it."""
    freq = expected_freq_statistic(g).astype(np.float32)
    space = np.full(g.shape, g.mean**2 + g.std**2, dtype=np.float32)
    return Filters(freq, space, size=g.image_size, channels=g.channels, source="exact spectrum of the analytic model")


class PreconditionerCache:
    """One Preconditioner per alpha (--alpha auto gives each step count its own)."""

    def __init__(self, filters: Filters, alpha_flag: str, settings: SamplingSettings, device: torch.device):
        self.filters, self.alpha_flag, self.settings, self.device = filters, alpha_flag, settings, device
        self._made: dict[float, Preconditioner] = {}

    def alpha(self, n_steps: int) -> float:
        return resolve_alpha(self.alpha_flag, self.settings, n_steps)

    def for_steps(self, n_steps: int) -> Preconditioner:
        a = self.alpha(n_steps)
        if a not in self._made:
            self._made[a] = Preconditioner.from_filters(self.filters, a, self.device)
        return self._made[a]
