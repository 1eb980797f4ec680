"""Recipes: the supervised warm start, the CPU demo and the study (GRPO vs CPPO vs PAPO).

Each recipe is a sequence of LightningCLI runs (:func:`~recipes.lightning_cli.build_cli`) with the
command-line arguments of ``cppo fit``; ``cppo warmstart``, ``cppo demo`` and ``cppo study`` call them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shlex
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from callbacks.evaluation import EvaluationReport
from cppo_lightning.module import CPPOModule
from recipes.lightning_cli import build_cli, lightning_cli, warmstart_cli

__all__ = ["HeldOut", "demo", "fit_and_test", "held_out", "held_out_accuracy", "study", "warm_start"]

#: The configs of the demo and the study (relative to the working directory, the project root).
DEMO_CONFIG = "configs/demo/cppo.yaml"
WARMSTART_CONFIG = "configs/demo/warmstart.yaml"
STUDY_CONFIG = "configs/demo/{objective}.yaml"
#: The training curves the demo draws.
DEMO_CURVES = ("train/reward_mean", "train/accuracy", "train/cpl")
#: What the auxiliary losses saw (CPPO: divergences to I+ and I-): the study averages each over a run.
STUDY_DIAGNOSTICS = (
    "train/cpl",
    "train/divergence_preserving",
    "train/divergence_removing",
    "train/perception_fraction",
    "train/implicit_perception_loss",
    "train/kl",
)


def warm_start(args: list[str], output: str | Path) -> Path:
    """Run the supervised warm start (``warmstart_cli`` arguments) and save the model to ``output``.

    Skipped when ``output`` already holds a warm start made from the same arguments and config text.
    """
    output = Path(output)
    stamp = hashlib.sha256(json.dumps([config_texts(args), args]).encode()).hexdigest()
    marker = output / "warmstart.json"
    if marker.exists() and json.loads(marker.read_text()).get("stamp") == stamp:
        print(f"warm start: reusing {output} (made from the same config)")
        return output
    started = time.perf_counter()
    cli = warmstart_cli(["fit", *args])
    if cli.trainer.is_global_zero:
        cli.model.save_pretrained(output)
        marker.write_text(
            json.dumps({"stamp": stamp, "args": args, "seconds": time.perf_counter() - started})
        )
    return output


def _warm_start_under(output: Path, config: str, extra_args: str) -> Path:
    """The warm start of a recipe: logged under ``output``, its model in ``output/warmstart/model``."""
    args = ["--config", config, "--trainer.logger.init_args.save_dir", str(output), *shlex.split(extra_args)]
    return warm_start(args, output / "warmstart" / "model")


def config_texts(args: list[str]) -> list[str]:
    """Contents of the config files named in ``args`` (a changed file invalidates a cached result)."""
    return [Path(args[i + 1]).read_text() for i, arg in enumerate(args[:-1]) if arg == "--config"]


@dataclass
class HeldOut:
    """avg@k on the test split, over all questions and per value of a dataset column.

    Attributes:
        accuracy: avg@k over the test questions.
        groups: avg@k of each value of the ``group_by`` column (empty when not grouped).
        run: the run folder (None for an evaluation that writes nothing).
    """

    accuracy: float
    groups: dict[str, float] = field(default_factory=dict)
    run: Path | None = None

    def __iter__(self):
        """``accuracy, run = fit_and_test(...)``: the tuple ``fit_and_test`` returned before, for one version."""
        warnings.warn(
            "fit_and_test returns a HeldOut now; unpacking it as (accuracy, run) is deprecated: read its "
            ".accuracy and .run",
            DeprecationWarning,
            stacklevel=2,
        )
        return iter((self.accuracy, self.run))


def _grouped(report: EvaluationReport) -> dict[str, float]:
    (result,) = report.results
    return {value: group.avg for value, group in result.groups.items()}


def held_out(args: list[str], model_path: str | Path, group_by: str | None = None) -> HeldOut:
    """avg@k on the test split of a config for the checkpoint at ``model_path`` (no adapter), per ``group_by``.

    Nothing is written: no logger, no report files, and no ``config.yaml`` (it would land in the working
    directory).
    """
    cli = build_cli(
        CPPOModule,
        [
            *args,
            "--model.policy.model_name_or_path",
            str(model_path),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
        ],
        run=False,
        save_config=False,
    )
    report = _group_report(cli.trainer, group_by, write=False)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    accuracy = avg_at_k(cli.trainer.callback_metrics, "test")
    return HeldOut(accuracy, _grouped(report) if report else {})


def _group_report(trainer, group_by: str | None, write: bool = True) -> EvaluationReport | None:
    """An :class:`EvaluationReport` per ``group_by`` added to ``trainer`` (its files in the run folder)."""
    if group_by is None:
        return None
    report = EvaluationReport(write_samples=False, group_by=group_by, write=write)
    trainer.callbacks.append(report)
    return report


def held_out_accuracy(args: list[str], model_path: str | Path) -> float:
    """avg@k on the test split of a config, for the checkpoint at ``model_path`` (no adapter)."""
    return held_out(args, model_path).accuracy


def avg_at_k(metrics, stage: str) -> float:
    """The one ``{stage}/avg@k`` value of a trainer's ``callback_metrics``."""
    (key,) = [key for key in metrics if key.startswith(f"{stage}/avg@")]
    return float(metrics[key])


def fit_and_test(args: list[str], model_path: str | Path, group_by: str | None = None) -> HeldOut:
    """Fit a config from ``model_path``, then avg@k of the trained policy on the test split (per ``group_by``).

    With ``group_by``, ``report.md`` and ``report.json`` of the test (per value of the column) land in the
    run folder.
    """
    cli = lightning_cli(["fit", *args, "--model.policy.model_name_or_path", str(model_path)])
    report = _group_report(cli.trainer, group_by)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    accuracy = avg_at_k(cli.trainer.callback_metrics, "test")
    return HeldOut(accuracy, _grouped(report) if report else {}, Path(cli.trainer.log_dir))


def _limit_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def demo(
    output: str | Path = "runs/demo",
    config: str = DEMO_CONFIG,
    warmstart_config: str = WARMSTART_CONFIG,
    warmstart_args: str = "",
    fit_args: str = "",
) -> dict:
    """The CPU demo: warm-start a tiny VLM on the synthetic task, train it with CPPO, held-out avg@k before and after.

    Args:
        output: where the runs, the warm start and ``summary.json`` go.
        config: the RL config.
        warmstart_config: the warm start's config.
        warmstart_args: extra warm-start arguments, one string (``"--trainer.max_steps 20"``).
        fit_args: extra RL arguments, one string.

    Returns:
        The summary written to ``output/summary.json``: ``warm_start_avg_at_k``, ``trained_avg_at_k``,
        ``run``, ``curves``, ``seconds``.
    """
    from cppo_lightning.plots import plot_runs

    output = Path(output)
    started = time.perf_counter()
    warm = _warm_start_under(output, warmstart_config, warmstart_args)
    rl_args = ["--config", config, "--trainer.logger.init_args.save_dir", str(output), *shlex.split(fit_args)]
    before = held_out_accuracy(rl_args, warm)
    trained = fit_and_test(rl_args, warm)
    after, run = trained.accuracy, trained.run
    curves = plot_runs([run], run / "curves.png", metrics=DEMO_CURVES)
    summary = {
        "warm_start_avg_at_k": before,
        "trained_avg_at_k": after,
        "run": str(run),
        "curves": str(curves),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def study(
    output: str | Path = "runs/study",
    objectives: list[str] | tuple[str, ...] = ("grpo", "papo", "cppo", "cppo_audited"),
    seeds: list[str] | tuple[str, ...] = ("0", "1", "2"),
    warmstart_config: str = WARMSTART_CONFIG,
    warmstart_args: str = "",
    fit_args: str = "",
    tag: str = "",
    group_by: str | None = "family",
    jobs: int = 1,
) -> tuple[str, Path]:
    """GRPO vs CPPO vs PAPO from the same warm start: equal steps and rollouts, several seeds, one table.

    Writes ``study{-tag}.md`` (held-out avg@k, mean ± std over the seeds, overall and per ``group_by``),
    ``study{-tag}.json`` (every seed's figures, the mean of :data:`STUDY_DIAGNOSTICS` per method, the
    settings and the wall time) and ``study{-tag}.png`` (the curves overlaid) to ``output``.

    Args:
        output: where the runs, the warm start and the results go.
        objectives: config names under ``configs/demo/`` (:data:`STUDY_CONFIG`).
        seeds: seeds of each objective (the run's, the module's and the data's).
        warmstart_config: the warm start's config.
        warmstart_args: extra warm-start arguments, one string.
        fit_args: extra RL arguments, one string.
        tag: suffix of run names, table labels and result files.
        group_by: a column of the test data (the synthetic task's question ``family``) to report avg@k per
            value of; None: overall only.
        jobs: runs at a time, each in its own process with ``cores / jobs`` torch threads (1: one after the
            other in this process, with torch's default threads). On a CPU, several single-threaded runs of a
            small model finish sooner than the same runs one after the other; a run's figures can differ in
            the last digits between thread counts (the order of float sums), never between two runs with
            the same thread count.

    Returns:
        ``(table as markdown, plot path)``.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    missing = [name for name in objectives if not Path(STUDY_CONFIG.format(objective=name)).is_file()]
    if missing:
        known = sorted(path.stem for path in Path(STUDY_CONFIG).parent.glob("*.yaml"))
        raise ValueError(f"no study config for objectives {missing} ({STUDY_CONFIG}); there are: {known}")
    started = time.perf_counter()
    output = Path(output)
    suffix = f"-{tag}" if tag else ""
    warm = _warm_start_under(output, warmstart_config, warmstart_args)
    planned = [
        (
            objective,
            seed,
            [
                "--config",
                STUDY_CONFIG.format(objective=objective),
                "--trainer.logger.init_args.save_dir",
                str(output),
                "--trainer.logger.init_args.name",
                f"{objective}{suffix}-seed{seed}",
                "--seed_everything",
                seed,
                "--model.seed",
                seed,
                "--data.init_args.seed",
                seed,
                *shlex.split(fit_args),
            ],
        )
        for objective in objectives
        for seed in seeds
    ]
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    if jobs == 1:
        outcomes = []
        for objective, seed, args in planned:
            outcomes.append(fit_and_test(args, warm, group_by))
            print(f"{objective} seed {seed}: held-out avg@k {outcomes[-1].accuracy:.3f}")
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(
            jobs, mp_context=context, initializer=_limit_threads, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(fit_and_test, args, str(warm), group_by) for _, _, args in planned]
            outcomes = [future.result() for future in futures]
    results: dict[str, list[float]] = {}
    groups: dict[str, dict[str, list[float]]] = {}
    runs: dict[str, list[Path]] = {}
    for (objective, _, _), outcome in zip(planned, outcomes):
        results.setdefault(objective + suffix, []).append(outcome.accuracy)
        for value, accuracy in outcome.groups.items():
            groups.setdefault(objective + suffix, {}).setdefault(value, []).append(accuracy)
        runs.setdefault((objective + suffix).upper(), []).append(outcome.run)
    baseline = held_out(
        ["--config", STUDY_CONFIG.format(objective=objectives[0]), *shlex.split(fit_args)], warm, group_by
    )
    settings = {
        "objectives": list(objectives),
        "seeds": list(seeds),
        "fit_args": fit_args,
        "warmstart_args": warmstart_args,
        "group_by": group_by,
        "jobs": jobs,
        "threads_per_run": threads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return _study_results(output, suffix, baseline, results, groups, runs, settings)


def _mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _study_results(
    output: Path,
    suffix: str,
    baseline: HeldOut,
    results: dict[str, list[float]],
    groups: dict[str, dict[str, list[float]]],
    runs: dict[str, list[Path]],
    settings: dict,
) -> tuple[str, Path]:
    """Write the study's table, JSON summary and plot; return the table and the plot's path."""
    from cppo_lightning.plots import plot_groups, read_metrics

    metrics = {run: read_metrics(run) for group in runs.values() for run in group}
    first = next(iter(runs.values()))[0]
    validation = [key for key in metrics[first] if key.startswith("val/avg@")]
    plot = plot_groups(
        runs, output / f"study{suffix}.png", metrics=("train/accuracy", *validation), smooth=10
    )
    diagnostics = {
        label: {
            name: statistics.mean(float(metrics[run][name][1].mean()) for run in group)
            for name in STUDY_DIAGNOSTICS
            if all(name in metrics[run] for run in group)
        }
        for label, group in runs.items()
    }
    lines = [
        "| method | held-out avg@k (mean ± std) | per seed |",
        "|---|---|---|",
        f"| warm start | {baseline.accuracy:.3f} | - |",
    ]
    for objective, values in results.items():
        lines.append(
            f"| {objective.upper()} | {_mean_spread(values)} | "
            + ", ".join(f"{v:.3f}" for v in values)
            + " |"
        )
    if baseline.groups:
        names = list(baseline.groups)
        lines += [
            "",
            "| method | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
            "| warm start | " + " | ".join(f"{baseline.groups[name]:.3f}" for name in names) + " |",
        ]
        for objective, by_group in groups.items():
            lines.append(
                f"| {objective.upper()} | "
                + " | ".join(_mean_spread(by_group[name]) for name in names)
                + " |"
            )
    table = "\n".join(lines)
    (output / f"study{suffix}.md").write_text(table + "\n")
    summary = {
        "warm_start": baseline.accuracy,
        "results": results,
        "warm_start_groups": baseline.groups,
        "groups": groups,
        "diagnostics": diagnostics,
        "settings": settings,
    }
    (output / f"study{suffix}.json").write_text(json.dumps(summary, indent=2))
    return table, plot
