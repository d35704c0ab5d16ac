"""The preconditioner PDS runs with in the bench: its filters (--masks, the analytic model's
exact spectrum, the built-in model's own, statistics of --reference, else a synthetic spectrum
that costs what real filters cost) and one Preconditioner per alpha."""

from __future__ import annotations

import numpy as np
import torch

from pdscli.bench.config import ANALYTIC, BenchConfig
from pdscli.bench.model import BenchModel
from pdscli.evaluate.analytic import GaussianImageModel
from pdscli.models import builtin
from pdscli.precondition import Filters, Preconditioner, compute_statistics, load_filters
from pdscli.precondition.alpha import expected_freq_statistic, resolve_alpha
from pdscli.sample.model import check_filters_fit
from pdscli.settings import SamplingSettings


def bench_filters(cfg: BenchConfig, model: BenchModel, reference: torch.Tensor | None) -> tuple[Filters, dict]:
    """(Filters, info): --masks; the analytic model's exact spectrum; the built-in model's own;
    statistics of --reference; else a synthetic natural-image spectrum, which times PDS
    exactly as real filters would (the cost does not depend on the values) but makes no
    meaningful images."""
    c, size, _ = model.shape
    if cfg.masks is not None:
        filters, source, meaningful = load_filters(cfg.masks), f"--masks {cfg.masks}", True
    elif model.kind == ANALYTIC:
        exact = model.gaussian if model.gaussian is not None else model.mixture.moment_matched()
        filters, source, meaningful = spectrum_filters(exact), "the analytic model's exact spectrum", True
    elif model.is_builtin:
        filters, source, meaningful = builtin.default_filters(), "the built-in model's own filters", True
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
