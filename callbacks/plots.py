"""Deprecated: the plots moved to :mod:`cppo_lightning.plots` (this path goes in the next version)."""

import warnings

from cppo_lightning.plots import (
    groups_figure,
    main,
    metric_files,
    plot_groups,
    plot_runs,
    read_metrics,
    run_labels,
    runs_figure,
    smoothed,
)

warnings.warn("callbacks.plots moved to cppo_lightning.plots", DeprecationWarning, stacklevel=2)

__all__ = [
    "groups_figure",
    "main",
    "metric_files",
    "run_labels",
    "plot_groups",
    "plot_runs",
    "read_metrics",
    "runs_figure",
    "smoothed",
]
