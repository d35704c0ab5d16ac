"""Preconditioning: the filters (data statistics and their file formats), the operator M, and alpha.

Imports the base layer only (errors, fsutil, images); `pdscli.samplers` takes a Preconditioner."""

from pdscli.precondition.operator import (
    Filters,
    Preconditioner,
    StatisticsAccumulator,
    compute_statistics,
    filter_from_statistic,
    load_filters,
    load_reference_npy,
)

__all__ = ["Filters", "Preconditioner", "StatisticsAccumulator", "compute_statistics", "filter_from_statistic",
           "load_filters", "load_reference_npy"]
