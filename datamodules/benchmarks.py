"""Evaluation benchmarks as test sets: multiple-choice and free-form questions in one schema.

A :class:`Benchmark` says where a benchmark is (a :class:`~datamodules.sources.DataSource`: hub id, split,
columns) and how its rows read: which questions are multiple choice, where their options are (a column,
the question text, or only the image), and a fixed question for benchmarks whose question is in the image
(MMMU-Pro vision). Every row is turned into ``image, question, answer, id`` plus ``choices`` (a JSON list)
and ``multiple_choice``, which reach the grader as dataset columns
(:func:`cppo_lightning.rewards.choice_accuracy_reward`). A multiple-choice row whose options cannot be
found, where the benchmark needs them, is a counted skip.

:class:`BenchmarkDataModule` makes each benchmark a test dataloader (one avg@k each); the shipped configs
of the paper's seven benchmarks are ``configs/eval/<benchmark>.yaml`` (:func:`load_benchmark_configs`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml

from cppo_lightning.graders import choices_from_question, format_choices, parse_choices
from datamodules.examples import SkipReport, clean_answer, clean_question, example_ids
from datamodules.sources import Columns, DataSource, load_source, resolve_columns
from datamodules.vqa import VisualQADataModule

log = logging.getLogger(__name__)

#: The benchmarks of the paper's Table 1, in its column order.
PAPER_BENCHMARKS = ("MathVista", "DynaMath", "WeMath", "MathVision", "MathVerse", "LogicVista", "MMMU-Pro-V")

MISSING_CHOICES = "multiple choice without choices"


@dataclass
class Benchmark:
    """One evaluation benchmark.

    Args:
        name: its label in reports and metric names, e.g. ``"MathVista"``.
        source: the split to read (hub id, file or folder) and its image, question, answer and id columns.
        type_column: column giving each question's type (None: the benchmark has none).
        choice_types: values of ``type_column`` that mean multiple choice.
        all_multiple_choice: every question is multiple choice (benchmarks without a type column).
            Without either, a question is multiple choice when it has options.
        choices_column: column holding the options: a list, its string form, or ``"A. x; B. y"``.
        options_in_question: the question text already lists the options: they are not appended again,
            and are read from it when there is no ``choices_column``.
        append_choices: append the options (``Choices:\nA. ...``) to a question that does not list them.
            False when the image shows them and the benchmark is about reading them there (MMMU-Pro
            vision); the options then only serve to grade an answer given as text.
        require_choices: a multiple-choice row whose options cannot be found is a counted skip. False for
            benchmarks that may show the options only in the image; those rows are graded by letter.
        question: a fixed question for every row, for benchmarks whose question is in the image.
    """

    name: str
    source: DataSource
    type_column: str | None = None
    choice_types: list[str] = field(default_factory=list)
    all_multiple_choice: bool = False
    choices_column: str | None = None
    options_in_question: bool = False
    append_choices: bool = True
    require_choices: bool = True
    question: str | None = None

    @property
    def display_name(self) -> str:
        """Label in logs, metric names and reports."""
        return self.name

    def describe(self) -> str:
        """Where the data comes from, e.g. ``AI4Math/MathVerse (testmini, split testmini)``."""
        parts = [f"config {self.source.name}"] if self.source.name else []
        parts.append(f"split {self.source.split}")
        if self.source.max_samples is not None:
            parts.append(f"first {self.source.max_samples}")
        return f"{self.source.path} ({', '.join(parts)})"


def prepare_benchmark(
    benchmark: Benchmark, report: SkipReport, strict: bool = False, dataset: datasets.Dataset | None = None
) -> datasets.Dataset:
    """The benchmark's rows as ``image, question, answer, id, choices, multiple_choice``.

    Multiple-choice rows get their options as a JSON list in ``choices`` and, when the question text does
    not list them, appended to the question (``Choices:\\nA. ...``). Rows dropped here are counted in
    ``report`` (``total`` and reason), so the data module's checks add to the same summary.

    Args:
        benchmark: the benchmark.
        report: skip counts of this source.
        strict: raise on the first unusable row instead of skipping it.
        dataset: the loaded split (default: loaded from ``benchmark.source``).

    Raises:
        ValueError: a column named in the benchmark is missing, or ``strict`` and a row is unusable (the
            message names the benchmark, the example and the field).
    """
    dataset = load_source(benchmark.source) if dataset is None else dataset
    if benchmark.question is not None:
        if "question" in dataset.column_names:
            dataset = dataset.remove_columns("question")
        dataset = dataset.add_column("question", [benchmark.question] * len(dataset))
        columns = Columns(**{**vars(benchmark.source.columns), "question": "question"})
    else:
        columns = benchmark.source.columns
    resolved = resolve_columns(dataset, columns, benchmark.name)
    for role, column in (
        ("type_column", benchmark.type_column),
        ("choices_column", benchmark.choices_column),
    ):
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"{benchmark.name}: column {column!r} (for {role}) is not among {dataset.column_names}"
            )
    ids = example_ids(dataset[resolved["id"]] if resolved["id"] else None, benchmark.name, len(dataset))
    wanted = [resolved["question"], resolved["answer"], benchmark.type_column, benchmark.choices_column]
    text_columns = list(dict.fromkeys(column for column in wanted if column is not None))
    kept, prepared = [], {"question": [], "answer": [], "id": [], "choices": [], "multiple_choice": []}
    for row, example in enumerate(dataset.select_columns(text_columns)):
        question = clean_question(example[resolved["question"]])
        raw_choices = example[benchmark.choices_column] if benchmark.choices_column else None
        choices = parse_choices(raw_choices)
        if not choices and benchmark.options_in_question:
            choices = choices_from_question(question)
        multiple_choice = _is_multiple_choice(benchmark, example, choices)
        if not multiple_choice:
            choices = []
        elif not choices and benchmark.require_choices:
            field_name = benchmark.choices_column or resolved["question"]
            message = (
                f"{report.source}: example {ids[row]!r} (row {row}): {MISSING_CHOICES}: the question type "
                f"says multiple choice but field {field_name!r} has no options"
            )
            if strict:
                raise ValueError(message)
            log.warning("skipping %s", message)
            report.total += 1
            report.add(MISSING_CHOICES, ids[row])
            continue
        if choices and benchmark.append_choices and not benchmark.options_in_question:
            question = f"{question}\nChoices:\n{format_choices(choices)}"
        kept.append(row)
        prepared["question"].append(question)
        prepared["answer"].append(clean_answer(example[resolved["answer"]]))
        prepared["id"].append(ids[row])
        prepared["choices"].append(json.dumps(choices) if choices else "")
        prepared["multiple_choice"].append(multiple_choice)
    images = dataset.select_columns([resolved["image"]]).select(kept)
    if resolved["image"] in prepared:
        raise ValueError(f"{benchmark.name}: the image column may not be called {resolved['image']!r}")
    for name, values in prepared.items():
        images = images.add_column(name, values)
    return images.rename_column(resolved["image"], "image") if resolved["image"] != "image" else images


def _is_multiple_choice(benchmark: Benchmark, example: dict[str, Any], choices: list[str]) -> bool:
    if benchmark.type_column is not None:
        return str(example[benchmark.type_column]).strip() in benchmark.choice_types
    return benchmark.all_multiple_choice or bool(choices)


class BenchmarkDataModule(VisualQADataModule):
    """Evaluation benchmarks as test sets: one dataloader, one ``test/avg@k`` and one report row each.

    Args:
        benchmarks: the benchmarks, in report order (names must be unique).
        **kwargs: everything :class:`~datamodules.VisualQADataModule` takes (``test`` sources are evaluated
            after the benchmarks; batch sizes, pixel limits, prompt template ...).

    Raises:
        ValueError: two benchmarks with the same name.
    """

    def __init__(self, benchmarks: list[Benchmark] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.benchmarks = list(benchmarks or [])
        names = [benchmark.name for benchmark in self.benchmarks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"benchmark names must be unique; repeated: {duplicates}")

    def _sources(self, stage: str):
        sources = super()._sources(stage)
        if stage == "test":
            sources = [(benchmark.name, benchmark) for benchmark in self.benchmarks] + sources
        return sources

    def _load(self, name: str, source, report: SkipReport):
        if isinstance(source, Benchmark):
            dataset = prepare_benchmark(source, report, strict=self.strict)
            columns = Columns(image="image", question="question", answer="answer", id="id")
            return dataset, columns, source.source.resolved_image_root()
        return super()._load(name, source, report)

    def describe_sources(self) -> dict[str, str]:
        """Benchmark name -> where its data comes from (for reports)."""
        return {benchmark.name: benchmark.describe() for benchmark in self.benchmarks}


# --------------------------------------------------------------------------------------------------------
# Shipped configs
# --------------------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def load_benchmark_configs(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The benchmark entries of the YAML files in ``folder``: file stem -> ``Benchmark`` arguments.

    A benchmark file is a LightningCLI config whose ``data.init_args.benchmarks`` holds the benchmark
    (``cppo test --config configs/eval/protocol.yaml --config configs/eval/mathvista.yaml`` runs one).

    Raises:
        FileNotFoundError: ``folder`` has no benchmark config.
    """
    configs = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        entries = (((yaml.safe_load(path.read_text()) or {}).get("data") or {}).get("init_args") or {}).get(
            "benchmarks"
        )
        for entry in entries or []:
            configs[path.stem if len(entries) == 1 else _key(entry["name"])] = entry
    if not configs:
        raise FileNotFoundError(f"no benchmark config (data.init_args.benchmarks) in {folder}")
    return configs


def select_benchmarks(configs: dict[str, dict[str, Any]], names: str | list[str]) -> list[dict[str, Any]]:
    """The configs named (``"all"``: every one, the paper's in its Table 1 order, then the others).

    Names match a file stem or a benchmark name, ignoring case and punctuation (``mmmu_pro_vision``,
    ``MMMU-Pro-V``).

    Raises:
        ValueError: a name that matches no benchmark (the message names it and lists the known ones).
    """
    names = [part.strip() for part in names.split(",") if part.strip()] if isinstance(names, str) else names
    if names in (["all"], ["ALL"]):
        order = {_key(name): index for index, name in enumerate(PAPER_BENCHMARKS)}
        return sorted(configs.values(), key=lambda entry: order.get(_key(entry["name"]), len(order)))
    lookup = {}
    for stem, entry in configs.items():
        lookup[_key(stem)] = entry
        lookup[_key(entry["name"])] = entry
    unknown = [name for name in names if _key(name) not in lookup]
    if unknown:
        known = ", ".join(f"{stem} ({entry['name']})" for stem, entry in configs.items())
        raise ValueError(f"unknown benchmark {', '.join(map(repr, unknown))}; known: {known}")
    return [lookup[_key(name)] for name in names]


__all__ = [
    "MISSING_CHOICES",
    "PAPER_BENCHMARKS",
    "Benchmark",
    "BenchmarkDataModule",
    "load_benchmark_configs",
    "prepare_benchmark",
    "select_benchmarks",
]
