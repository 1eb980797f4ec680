"""The evaluation report: avg@k per benchmark with its spread over the k samples, in the paper's layout.

:class:`EvaluationReport` collects every graded sample of a ``trainer.test`` run (``CPPOModule`` grades
``k`` samples per question at the evaluation temperature) and writes, on rank zero:

- ``report.json``: per benchmark the number of questions and skips, avg@k, the accuracy of each of the
  ``k`` samples (sample ``j`` of every question) and their standard deviation; the same for the mean over
  benchmarks;
- ``report.md``: one row per model, one column per benchmark and the mean (the paper's Table 1 layout),
  each cell ``avg@k ± std`` in percent;
- ``samples.jsonl``: every question with its answer, completions, extracted answers and grades.

``avg@k`` is the mean of the ``k`` per-sample accuracies, and ``± std`` their (unbiased) standard
deviation: how much one sampled evaluation of the whole benchmark varies. The mean row averages the
benchmarks with equal weight, per sample index.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from callbacks.rollout_log import resolve_log_dir
from cppo_lightning.rewards import extract_boxed

log = logging.getLogger(__name__)

RULE_BASED_NOTE = (
    "Graded rule-based: the last \\boxed{} answer, compared by {grader}; multiple-choice questions by option "
    "letter or option text. The paper graded with a GPT-4o-mini judge, which also reads answers outside a "
    "box, unboxed option letters and paraphrases: these are wrong here, so scores can be lower."
)


@dataclass
class BenchmarkResult:
    """avg@k of one benchmark.

    Attributes:
        name: the benchmark.
        questions: questions graded.
        samples_per_question: ``k``.
        per_sample: ``k`` accuracies: sample ``j`` of every question.
        skipped: questions left out at set-up, by reason.
        source: where the data came from.
        groups: the same figures per value of a dataset column (``EvaluationReport(group_by=...)``), sorted
            by value; empty when not grouped.
    """

    name: str
    questions: int
    samples_per_question: int
    per_sample: list[float]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""
    groups: dict[str, BenchmarkResult] = field(default_factory=dict)

    @property
    def avg(self) -> float:
        """avg@k: the mean of the per-sample accuracies (= accuracy over all graded samples)."""
        return statistics.fmean(self.per_sample) if self.per_sample else math.nan

    @property
    def std(self) -> float:
        """Standard deviation of the ``k`` per-sample accuracies (0 for ``k = 1``)."""
        return statistics.stdev(self.per_sample) if len(self.per_sample) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {item.name: getattr(self, item.name) for item in fields(self) if item.name != "groups"}
        data = {**data, "avg": self.avg, "std": self.std}
        if self.groups:
            data["groups"] = {value: result.to_dict() for value, result in self.groups.items()}
        return data


def benchmark_result(
    name: str,
    grades: Sequence[Sequence[float]],
    groups: Sequence[str] | None = None,
    **kwargs: Any,
) -> BenchmarkResult:
    """The result of ``Q`` questions with ``k`` grades each (``grades`` ``[Q][k]``, 0/1).

    ``groups``: one value per question (say its question type); the result then also holds the figures of
    each value's questions in :attr:`BenchmarkResult.groups`.
    """
    if groups is not None and len(groups) != len(grades):
        raise ValueError(f"{name}: {len(groups)} group values for {len(grades)} questions")
    by_group = {
        value: benchmark_result(f"{name}/{value}", [g for g, v in zip(grades, groups) if v == value])
        for value in sorted(set(groups or ()))
    }
    grades = torch.as_tensor(grades, dtype=torch.float64).reshape(len(grades), -1)
    per_sample = grades.mean(dim=0).tolist() if len(grades) else []
    return BenchmarkResult(name, len(grades), grades.shape[1], per_sample, groups=by_group, **kwargs)


def mean_result(results: Sequence[BenchmarkResult]) -> BenchmarkResult:
    """The benchmarks' equal-weight mean, per sample index (all must have the same ``k``).

    Raises:
        ValueError: the benchmarks were graded with different ``k``.
    """
    ks = {result.samples_per_question for result in results}
    if len(ks) > 1:
        raise ValueError(f"benchmarks graded with different k: {sorted(ks)}")
    per_sample = [statistics.fmean(column) for column in zip(*(result.per_sample for result in results))]
    return BenchmarkResult("Avg", sum(r.questions for r in results), ks.pop() if ks else 0, per_sample)


def _percent(result: BenchmarkResult) -> str:
    if not result.questions:
        return "-"
    return f"{100 * result.avg:.1f} ± {100 * result.std:.1f}"


def format_report(models: dict[str, list[BenchmarkResult]], protocol: dict[str, Any]) -> str:
    """The markdown report: the Table 1 layout (a row per model), then where each benchmark came from.

    Args:
        models: row label -> that model's results, every model on the same benchmarks in the same order.
        protocol: ``samples_per_question``, ``temperature``, ``grader`` (shown in the header).
    """
    k, grader = protocol.get("samples_per_question"), protocol.get("grader", "mathruler")
    names = [result.name for result in next(iter(models.values()))]
    lines = [
        f"# Evaluation: avg@{k} at temperature {protocol.get('temperature')}",
        "",
        f"Accuracy (%) averaged over {k} samples per question, ± the standard deviation over the {k} samples "
        "(each sample's accuracy on the whole benchmark). Avg: the benchmarks' mean, equal weights.",
        RULE_BASED_NOTE.replace("{grader}", grader),
        "",
        "| model | " + " | ".join(names) + " | Avg |",
        "|---" * (len(names) + 2) + "|",
    ]
    for label, results in models.items():
        cells = [_percent(result) for result in results] + [_percent(mean_result(results))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| benchmark | data | questions | skipped |", "|---|---|---|---|"]
    for result in next(iter(models.values())):
        skipped = ", ".join(f"{count} {reason}" for reason, count in result.skipped.items()) or "0"
        lines.append(f"| {result.name} | {result.source} | {result.questions} | {skipped} |")
    for label, results in models.items():
        grouped = [result for result in results if result.groups]
        if grouped:
            lines += ["", f"{label}, per {protocol.get('group_by', 'group')}:", ""]
            lines += ["| benchmark | group | questions | avg@k ± std (%) |", "|---|---|---|---|"]
        for result in grouped:
            for value, group in result.groups.items():
                lines.append(f"| {result.name} | {value} | {group.questions} | {_percent(group)} |")
    return "\n".join(lines) + "\n"


def write_report(
    models: dict[str, list[BenchmarkResult]], folder: str | Path, protocol: dict[str, Any]
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.json`` to ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "protocol": protocol,
        "models": {
            label: {
                "benchmarks": {result.name: result.to_dict() for result in results},
                "mean": mean_result(results).to_dict(),
            }
            for label, results in models.items()
        },
    }
    json_path, markdown_path = folder / "report.json", folder / "report.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    markdown_path.write_text(format_report(models, protocol))
    return markdown_path, json_path


def _gather(trainer: pl.Trainer, value: Any) -> list[Any]:
    """``value`` of every rank (a list of one where there is a single process)."""
    if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, value)
        return gathered
    return [value]


class EvaluationReport(pl.Callback):
    """Write the evaluation report of ``trainer.test``: avg@k ± std per test dataloader, and the mean.

    Works with ``CPPOModule`` (it reads the graded samples of each test batch from
    ``last_eval_rollout``); names, data sources and skipped questions come from the DataModule when it
    has them (``eval_names``, ``describe_sources``, ``skip_reports``). Every rank's samples are gathered;
    a question seen twice (the padding of a distributed sampler) counts once.

    Args:
        output_dir: folder of the report; default: the trainer's ``log_dir``.
        label: the model's row in the table; default: the policy's ``model_name_or_path``.
        write_samples: also write ``samples.jsonl`` (completions of every question).
        group_by: a dataset column (say the question type: the synthetic task's ``family``, MathVista's
            ``question_type``); the report then also gives avg@k per value of it, per benchmark. Every test
            question must have the column (the error names the first that does not).
        write: write the files (False: keep the figures in :attr:`results` only, as ``cppo study`` does for
            the warm start's evaluation).
    """

    def __init__(
        self,
        output_dir: str | Path | None = None,
        label: str | None = None,
        write_samples: bool = True,
        group_by: str | None = None,
        write: bool = True,
    ) -> None:
        self.output_dir = output_dir
        self.write = write
        self.label = label
        self.write_samples = write_samples
        self.group_by = group_by
        self.results: list[BenchmarkResult] = []
        self._records: list[dict[str, Any]] = []
        self._folder: Path | None = None

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._records, self.results = [], []
        self._folder = resolve_log_dir(trainer, self.output_dir)

    @override
    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        rollout = pl_module.last_eval_rollout
        k = rollout.group_size
        grades = rollout.rewards.view(-1, k).tolist()
        for row, example_id in enumerate(rollout.batch.ids):
            completions = rollout.completions[row * k : (row + 1) * k]
            self._records.append(
                {
                    "dataloader": dataloader_idx,
                    "id": example_id,
                    "question": rollout.batch.questions[row] if rollout.batch.questions else "",
                    "answer": rollout.batch.answers[row],
                    "grades": grades[row],
                    **({"group": self._group(rollout.batch, row)} if self.group_by else {}),
                    **(
                        {
                            "completions": completions,
                            "extracted": [extract_boxed(text) for text in completions],
                        }
                        if self.write_samples
                        else {}
                    ),
                }
            )

    def _group(self, batch, row: int) -> str:
        metadata = batch.metadata[row] if row < len(batch.metadata) else {}
        if self.group_by not in metadata:
            raise KeyError(
                f"EvaluationReport(group_by={self.group_by!r}): test question {batch.ids[row]!r} has no "
                f"{self.group_by!r} column (its columns: {sorted(metadata)})"
            )
        return str(metadata[self.group_by])

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        records = [record for part in _gather(trainer, self._records) for record in part]
        unique: dict[tuple[int, str], dict[str, Any]] = {}
        for record in records:
            unique.setdefault((record["dataloader"], record["id"]), record)
        datamodule = trainer.datamodule
        names = list(getattr(datamodule, "eval_names", {}).get("test", []))
        sources = getattr(datamodule, "describe_sources", dict)()
        skips = {
            report.source.removeprefix("test:"): dict(report.counts)
            for report in getattr(datamodule, "skip_reports", [])
            if report.source.startswith("test:")
        }
        count = max([len(names)] + [index + 1 for index, _ in unique])
        names += [f"test_{index}" for index in range(len(names), count)]
        self.results = []
        for dataloader, name in enumerate(names):
            records_of = [record for (index, _), record in unique.items() if index == dataloader]
            self.results.append(
                benchmark_result(
                    name,
                    [record["grades"] for record in records_of],
                    groups=[record["group"] for record in records_of] if self.group_by else None,
                    skipped=skips.get(name, {}),
                    source=sources.get(name, ""),
                )
            )
        if self.write:
            self._write(trainer, pl_module, list(unique.values()))

    @rank_zero_only
    def _write(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, records: list[dict[str, Any]]
    ) -> None:
        evaluation = getattr(pl_module, "evaluation", None)
        label = self.label or getattr(
            getattr(pl_module, "policy_config", None), "model_name_or_path", "model"
        )
        protocol = {
            "samples_per_question": getattr(evaluation, "samples_per_question", None),
            "temperature": getattr(evaluation, "temperature", None),
            "top_p": getattr(evaluation, "top_p", None),
            "max_new_tokens": getattr(evaluation, "max_new_tokens", None),
            "grader": _grader_name(getattr(evaluation, "reward", "")),
            "reward_function": getattr(evaluation, "reward", None),
            **({"group_by": self.group_by} if self.group_by else {}),
        }
        markdown, _ = write_report({label: self.results}, self._folder, protocol)
        if self.write_samples:
            names = [result.name for result in self.results]
            with open(self._folder / "samples.jsonl", "w") as handle:
                for record in records:
                    line = {"benchmark": names[record["dataloader"]], **record}
                    line.pop("dataloader")
                    handle.write(json.dumps(line) + "\n")
        log.info("evaluation report: %s", markdown)


def _grader_name(reward_path: str) -> str:
    return "math-verify" if re.search(r"math_verify", reward_path or "") else "mathruler"


__all__ = [
    "BenchmarkResult",
    "EvaluationReport",
    "benchmark_result",
    "format_report",
    "mean_result",
    "write_report",
]
