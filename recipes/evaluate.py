"""The paper's evaluation (``cppo evaluate``) and answers for a config's test data (``cppo predict``).

Both are ``cppo test`` runs with :class:`~callbacks.evaluation.EvaluationReport` writing the report: avg@k
(``k`` samples per question at the evaluation temperature) per benchmark, graded rule-based.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from callbacks.evaluation import EvaluationReport, write_report
from cppo_lightning.module import CPPOModule
from cppo_lightning.rewards import evaluation_reward
from datamodules.benchmarks import load_benchmark_configs, select_benchmarks
from recipes.lightning_cli import build_cli

__all__ = ["EVAL_CONFIGS", "evaluate", "predict", "slug"]

#: The paper's protocol (``protocol.yaml``) and its seven benchmark configs.
EVAL_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "eval"


def evaluate(
    models: dict[str, str],
    benchmarks: str | list[str] = "all",
    *,
    samples: int | None = None,
    max_new_tokens: int | None = None,
    max_samples: int | None = None,
    grader: str = "mathruler",
    output: str | Path = "runs/eval",
    config_dir: str | Path = EVAL_CONFIGS,
    ckpt_path: str | None = None,
    extra_args: list[str] | tuple[str, ...] = (),
) -> dict[str, list]:
    """The paper's evaluation of one or more models: ``cppo test`` over the benchmarks, one report.

    Runs ``configs/eval/protocol.yaml`` with the chosen benchmark configs of ``config_dir`` for each model,
    writes each model's report to ``output/<label>/`` and all of them, one row per model, to
    ``output/report.md`` and ``report.json``.

    Args:
        models: row label -> model (hub id or folder; a LoRA run: ``cppo export`` it first, or ``ckpt_path``).
        benchmarks: ``"all"`` or names (file stems or benchmark names), e.g. ``"mathvista,wemath"``.
        samples: ``k`` samples per question (default: the protocol's 8).
        max_new_tokens: completion limit (default: the protocol's 4,096).
        max_samples: evaluate only the first N questions of each benchmark (a quick look, not the protocol).
        grader: ``"mathruler"`` (the release's) or ``"math-verify"``.
        output: report folder.
        config_dir: folder with ``protocol.yaml`` and the benchmark configs.
        ckpt_path: a Lightning checkpoint to test (with a single model).
        extra_args: further LightningCLI arguments, e.g. ``["--trainer.devices", "8"]``.

    Returns:
        Row label -> its :class:`callbacks.evaluation.BenchmarkResult` list.

    Raises:
        ValueError: an unknown benchmark name or grader, or ``ckpt_path`` with several models.
    """
    config_dir = Path(config_dir)
    reward = evaluation_reward(grader)
    if ckpt_path is not None and len(models) != 1:
        raise ValueError("ckpt_path tests one model; give a single --model")
    chosen = copy.deepcopy(select_benchmarks(load_benchmark_configs(config_dir), benchmarks))
    if max_samples is not None:
        for entry in chosen:
            entry["source"]["max_samples"] = max_samples
    output = Path(output)
    results, protocol, global_zero = {}, {}, True
    for label, model in models.items():
        args = [
            "--config",
            str(config_dir / "protocol.yaml"),
            "--model.policy.model_name_or_path",
            model,
            "--data.init_args.benchmarks",
            json.dumps(chosen),
            "--model.evaluation.reward",
            reward,
            *(["--model.evaluation.samples_per_question", str(samples)] if samples else []),
            *(["--model.evaluation.max_new_tokens", str(max_new_tokens)] if max_new_tokens else []),
            *extra_args,
        ]
        cli = build_cli(CPPOModule, args, run=False, save_config=False)
        reports = [callback for callback in cli.trainer.callbacks if isinstance(callback, EvaluationReport)]
        if not reports:
            reports = [EvaluationReport()]
            cli.trainer.callbacks.append(reports[0])
        reports[0].output_dir, reports[0].label = output / slug(label), label
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
        results[label] = reports[0].results
        evaluation = cli.model.evaluation
        protocol = {
            "samples_per_question": evaluation.samples_per_question,
            "temperature": evaluation.temperature,
            "top_p": evaluation.top_p,
            "max_new_tokens": evaluation.max_new_tokens,
            "grader": grader,
            "reward_function": reward,
            "max_samples_per_benchmark": max_samples,
        }
        global_zero = cli.trainer.is_global_zero
    if global_zero:
        write_report(results, output, protocol)
    return results


def slug(label: str) -> str:
    """A folder name for a report row's label."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_.") or "model"


def predict(args: list[str], output: str | Path, ckpt_path: str | None = None) -> Path:
    """Sample answers for the test data of a config and write them as JSON lines (``cppo predict``).

    Every question of the config's test sources gets ``model.evaluation.samples_per_question`` completions
    at the evaluation temperature; ``output/samples.jsonl`` holds one line per question (benchmark, id,
    question, reference answer, completions, extracted answers, grades), beside ``report.md``/``.json``.

    Args:
        args: LightningCLI arguments (``["--config", "RUN/config.yaml", ...]``).
        output: folder to write.
        ckpt_path: a Lightning checkpoint of the policy (verified, then loaded onto the config's base).

    Returns:
        The ``samples.jsonl`` written.

    Raises:
        SystemExit: the config has no test data, or the checkpoint is incomplete or corrupt.
    """
    report = {"class_path": "callbacks.EvaluationReport", "init_args": {"output_dir": str(output)}}
    # `cppo test` with the report as its only callback: the checkpoint is verified and its hyperparameters
    # fill what the config leaves silent, as for test.
    cli = build_cli(
        CPPOModule,
        [
            "test",
            *args,
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            json.dumps([report]),
            *(["--ckpt_path", str(ckpt_path)] if ckpt_path is not None else []),
        ],
        run=True,
        save_config=False,
    )
    if not cli.datamodule.eval_names["test"]:
        sys.exit("cppo predict: the config has no test data (data.init_args.test, or a test_size)")
    return Path(output) / "samples.jsonl"
