"""Compare runs: overlay the training curves that Lightning's ``CSVLogger`` wrote.

From the command line::

    cppo plot runs/grpo runs/cppo --metrics train/reward_mean,train/cpl --smooth 10 --output compare.png

Each run folder is searched recursively for ``metrics.csv`` (``run/version_0/metrics.csv``,
``run/metrics.csv`` ...). Several files in one run (a resumed run writes a new ``version_N``) are read in
version order; a step logged twice keeps the later value.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DEFAULT_METRICS = ("train/reward_mean", "train/accuracy", "train/cpl")


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def metric_files(run_dir: str | Path) -> list[Path]:
    """The ``metrics.csv`` files under ``run_dir``, in version order.

    Raises:
        FileNotFoundError: the folder does not exist or holds no ``metrics.csv``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    files = sorted(run_dir.rglob("metrics.csv"), key=_natural_key)
    if not files:
        raise FileNotFoundError(
            f"run folder {run_dir} holds no metrics.csv (searched recursively); was the run logged with "
            "lightning.pytorch.loggers.CSVLogger?"
        )
    return files


def read_metrics(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every metric of a run as ``name -> (steps, values)``, sorted by step, empty cells skipped.

    Raises:
        FileNotFoundError: the run has no ``metrics.csv``.
    """
    points: dict[str, dict[int, float]] = {}
    for path in metric_files(run_dir):
        with path.open(newline="") as file:
            for record in csv.DictReader(file):
                step = record.get("step")
                if step in (None, ""):
                    continue
                for name, cell in record.items():
                    if name in ("step", "epoch") or cell in (None, ""):
                        continue
                    try:
                        value = float(cell)
                    except ValueError:
                        continue
                    points.setdefault(name, {})[int(float(step))] = value
    metrics = {}
    for name, by_step in points.items():
        steps = sorted(by_step)
        metrics[name] = (np.array(steps), np.array([by_step[step] for step in steps]))
    return metrics


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average what exists so far)."""
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def run_labels(run_dirs: Sequence[str | Path]) -> list[str]:
    """Legend labels: each run's folder name, with parent folders added until the labels differ."""
    paths = [Path(run).resolve() for run in run_dirs]
    depth = 1
    while True:
        labels = ["/".join(path.parts[-depth:]) for path in paths]
        if len(set(labels)) == len(labels) or depth >= max(len(path.parts) for path in paths):
            break
        depth += 1
    seen: dict[str, int] = {}
    unique = []
    for label in labels:  # the same folder given twice
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return unique


def runs_figure(
    run_dirs: Sequence[str | Path], metrics: Sequence[str] = DEFAULT_METRICS, smooth: int = 1
) -> Figure:
    """The comparison figure: one subplot per metric, one line per run, legends labelled by run.

    A run that did not log a metric is left out of that subplot and named in its legend's title.

    Raises:
        FileNotFoundError: a run folder holds no ``metrics.csv`` (the message names it).
        ValueError: no runs or no metrics were given, or ``smooth < 1``.
    """
    if not run_dirs or not metrics:
        raise ValueError("plot_runs needs at least one run folder and one metric")
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1 (a window of points), got {smooth}")
    runs = [read_metrics(run) for run in run_dirs]
    labels = run_labels(run_dirs)
    columns = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / columns)
    figure = Figure(figsize=(5.5 * columns, 4.0 * rows), dpi=100, layout="constrained")
    for index, metric in enumerate(metrics):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.set_title(metric + (f" (smoothed over {smooth})" if smooth > 1 else ""), fontsize=10)
        axis.set_xlabel("step")
        missing = []
        for label, run in zip(labels, runs):
            if metric not in run:
                missing.append(label)
                continue
            steps, values = run[metric]
            axis.plot(steps, smoothed(values, smooth), label=label, marker="." if len(steps) < 30 else None)
        if len(missing) == len(runs):
            axis.text(0.5, 0.5, f"no run logged {metric}", ha="center", va="center", transform=axis.transAxes)
            axis.set_xticks([])
            axis.set_yticks([])
            continue
        note = None
        if missing:
            log.warning("%s is not in the metrics of %s: skipped", metric, ", ".join(missing))
            note = "not logged by: " + ", ".join(missing)
        legend = axis.legend(fontsize=8, title=note, title_fontsize=7)
        if note:
            legend.get_title().set_color("grey")
        axis.grid(alpha=0.3)
    return figure


def plot_runs(
    run_dirs: Sequence[str | Path],
    output: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    smooth: int = 1,
) -> Path:
    """Overlay the curves of several runs, one subplot per metric, and save the PNG to ``output``.

    Args:
        run_dirs: run folders (each with a ``metrics.csv`` somewhere below it).
        output: the image to write (parent folders are created).
        metrics: metric names as logged (``train/reward_mean`` ...).
        smooth: trailing moving-average window in points (1: raw).

    Returns:
        ``output``.

    Raises:
        FileNotFoundError: a run folder holds no ``metrics.csv`` (the message names it).
    """
    output = Path(output)
    figure = runs_figure(run_dirs, metrics, smooth)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, facecolor="white")
    return output


def groups_figure(
    groups: dict[str, Sequence[str | Path]],
    metrics: Sequence[str] = ("train/accuracy", "train/reward_mean"),
    smooth: int = 10,
) -> Figure:
    """Mean curve of each group of runs (e.g. one method over several seeds) with a +/- std band.

    Runs of a group are aligned on their common steps; the moving average is at most ``smooth`` points
    and at most a fifth of the points (a handful of validation points stays unsmoothed).

    Raises:
        FileNotFoundError: a run folder holds no ``metrics.csv``.
    """
    figure = Figure(figsize=(5.5 * len(metrics), 4), layout="constrained")
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    loaded = {label: [read_metrics(run) for run in runs] for label, runs in groups.items()}
    for axis, metric in zip(axes, metrics):
        for label, runs in loaded.items():
            curves = [run[metric] for run in runs if metric in run]
            if not curves:
                continue
            common = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in curves)))
            window = min(smooth, max(1, len(common) // 5))
            stacked = np.stack([smoothed(values[np.isin(steps, common)], window) for steps, values in curves])
            mean, spread = stacked.mean(axis=0), stacked.std(axis=0)
            axis.plot(common, mean, label=f"{label} (n={len(curves)})")
            axis.fill_between(common, mean - spread, mean + spread, alpha=0.2)
        axis.set_title(metric)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend()
    return figure


def plot_groups(
    groups: dict[str, Sequence[str | Path]],
    output: str | Path,
    metrics: Sequence[str] = ("train/accuracy", "train/reward_mean"),
    smooth: int = 10,
) -> Path:
    """Save :func:`groups_figure` as a PNG at ``output`` (used by ``cppo study``)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    groups_figure(groups, metrics, smooth).savefig(output, dpi=110)
    return output


def main(argv: list[str] | None = None) -> int:
    """``cppo plot RUN_DIR [RUN_DIR ...] [--output out.png] [--metrics a,b,c] [--smooth N]``.

    Returns:
        0 on success, 2 when a run folder has no metrics or a metric named in ``--metrics`` was logged by
        no run (the message goes to stderr and suggests the closest logged name).
    """
    parser = argparse.ArgumentParser(
        prog="cppo plot", description="Overlay the training curves (CSVLogger metrics.csv) of several runs."
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders to compare")
    parser.add_argument(
        "--output", type=Path, default=Path("runs.png"), help="the PNG to write (default: runs.png)"
    )
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated metric names (default: {','.join(DEFAULT_METRICS)})",
    )
    parser.add_argument(
        "--smooth", type=int, default=1, help="moving-average window in points (default: 1, no smoothing)"
    )
    args = parser.parse_args(argv)
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    if not metrics:
        parser.error("--metrics names no metric")
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    try:
        logged = set().union(*(read_metrics(run) for run in args.run_dirs))
    except FileNotFoundError as error:
        print(f"cppo plot: error: {error}", file=sys.stderr)
        return 2
    # A metric asked for by name that no run logged is a typo, not a blank panel (the defaults may be
    # absent: a GRPO run logs no CPL).
    named = args.metrics != ",".join(DEFAULT_METRICS)
    unknown = [name for name in metrics if name not in logged] if named else []
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(logged), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        parser.error(f"no run logged {', '.join(hints)}; the runs logged: {', '.join(sorted(logged))}")
    path = plot_runs(args.run_dirs, args.output, metrics, args.smooth)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
