"""Recipes: the supervised warm start, the CPU demo and the study (GRPO vs CPPO vs PAPO).

Each recipe is a sequence of LightningCLI runs (:func:`~recipes.lightning_cli.build_cli`) with the
command-line arguments of ``cppo fit``; ``cppo warmstart``, ``cppo demo`` and ``cppo study`` call them.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import statistics
import time
from pathlib import Path

from cppo_lightning.module import CPPOModule
from recipes.lightning_cli import build_cli, lightning_cli, warmstart_cli

__all__ = ["demo", "fit_and_test", "held_out_accuracy", "study", "warm_start"]

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


def held_out_accuracy(args: list[str], model_path: str | Path) -> float:
    """avg@k on the test split of a config, for the checkpoint at ``model_path`` (no adapter).

    Nothing is written: no logger, and no ``config.yaml`` (it would land in the working directory).
    """
    cli = build_cli(
        CPPOModule,
        [
            "test",
            *args,
            "--model.policy.model_name_or_path",
            str(model_path),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
        ],
        run=True,
        save_config=False,
    )
    return avg_at_k(cli.trainer.callback_metrics, "test")


def avg_at_k(metrics, stage: str) -> float:
    """The one ``{stage}/avg@k`` value of a trainer's ``callback_metrics``."""
    (key,) = [key for key in metrics if key.startswith(f"{stage}/avg@")]
    return float(metrics[key])


def fit_and_test(args: list[str], model_path: str | Path) -> tuple[float, Path]:
    """Fit a config from ``model_path``, then avg@k of the trained policy on the test split."""
    cli = lightning_cli(["fit", *args, "--model.policy.model_name_or_path", str(model_path)])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return avg_at_k(cli.trainer.callback_metrics, "test"), Path(cli.trainer.log_dir)


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
    after, run = fit_and_test(rl_args, warm)
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
    objectives: list[str] | tuple[str, ...] = ("grpo", "cppo", "papo"),
    seeds: list[str] | tuple[str, ...] = ("0", "1", "2"),
    warmstart_config: str = WARMSTART_CONFIG,
    warmstart_args: str = "",
    fit_args: str = "",
    tag: str = "",
) -> tuple[str, Path]:
    """GRPO vs CPPO vs PAPO from the same warm start: equal steps and rollouts, several seeds, one table.

    Writes ``study{-tag}.md`` (held-out avg@k, mean ± std over the seeds), ``study{-tag}.json`` (with the
    mean of :data:`STUDY_DIAGNOSTICS` per method) and ``study{-tag}.png`` (the curves overlaid) to ``output``.

    Args:
        output: where the runs, the warm start and the results go.
        objectives: config names under ``configs/demo/`` (:data:`STUDY_CONFIG`).
        seeds: seeds of each objective (the run's, the module's and the data's).
        warmstart_config: the warm start's config.
        warmstart_args: extra warm-start arguments, one string.
        fit_args: extra RL arguments, one string.
        tag: suffix of run names, table labels and result files.

    Returns:
        ``(table as markdown, plot path)``.
    """
    output = Path(output)
    suffix = f"-{tag}" if tag else ""
    warm = _warm_start_under(output, warmstart_config, warmstart_args)
    results: dict[str, list[float]] = {}
    runs: dict[str, list[Path]] = {}
    for objective in objectives:
        for seed in seeds:
            args = [
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
            ]
            accuracy, run = fit_and_test(args, warm)
            results.setdefault(objective + suffix, []).append(accuracy)
            runs.setdefault((objective + suffix).upper(), []).append(run)
            print(f"{objective} seed {seed}: held-out avg@k {accuracy:.3f}")
    baseline = held_out_accuracy(
        ["--config", STUDY_CONFIG.format(objective=objectives[0]), *shlex.split(fit_args)], warm
    )
    return _study_results(output, suffix, baseline, results, runs)


def _study_results(
    output: Path, suffix: str, baseline: float, results: dict[str, list[float]], runs: dict[str, list[Path]]
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
        f"| warm start | {baseline:.3f} | - |",
    ]
    for objective, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(
            f"| {objective.upper()} | {statistics.mean(values):.3f} ± {spread:.3f} | "
            + ", ".join(f"{v:.3f}" for v in values)
            + " |"
        )
    table = "\n".join(lines)
    (output / f"study{suffix}.md").write_text(table + "\n")
    summary = {"warm_start": baseline, "results": results, "diagnostics": diagnostics}
    (output / f"study{suffix}.json").write_text(json.dumps(summary, indent=2))
    return table, plot
