"""The shipped benchmark configs read a local copy of each benchmark in its own schema; counted skips."""

import json
import logging

import pytest
import yaml

from benchmark_data import BUILDERS, EVAL_CONFIGS, EXPECTED
from datamodules.benchmarks import (
    MISSING_CHOICES,
    PAPER_BENCHMARKS,
    Benchmark,
    BenchmarkDataModule,
    load_benchmark_configs,
    prepare_benchmark,
    select_benchmarks,
)
from datamodules.examples import SkipReport
from datamodules.sources import Columns, DataSource


def shipped(stem, path=None):
    """The Benchmark of configs/eval/<stem>.yaml, its hub id replaced by ``path``."""
    (entry,) = yaml.safe_load((EVAL_CONFIGS / f"{stem}.yaml").read_text())["data"]["init_args"]["benchmarks"]
    source = dict(entry["source"])
    source["columns"] = Columns(**source.get("columns", {}))
    if path is not None:
        source["path"] = path
    return Benchmark(**{**entry, "source": DataSource(**source)})


@pytest.fixture(scope="module")
def local_copies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmarks")
    return {stem: build(folder) for stem, build in BUILDERS.items()}


@pytest.mark.parametrize("stem", sorted(BUILDERS))
def test_every_shipped_benchmark_reads_its_schema(stem, local_copies):
    benchmark = shipped(stem, local_copies[stem])
    name, kept, skipped, with_options = EXPECTED[stem]
    assert benchmark.name == name
    report = SkipReport(source=f"test:{name}")
    prepared = prepare_benchmark(benchmark, report)
    assert prepared.column_names == ["image", "question", "answer", "id", "choices", "multiple_choice"]
    # Rows dropped here are counted; the kept ones are counted by the data module's example checks.
    assert len(prepared) == kept and report.skipped == skipped and report.total == skipped
    assert sum(bool(choices) for choices in prepared["choices"]) == with_options
    assert all(prepared["question"]) and all(prepared["answer"]) and len(set(prepared["id"])) == kept
    for choices, multiple in zip(prepared["choices"], prepared["multiple_choice"]):
        assert not choices or (multiple and len(json.loads(choices)) >= 2)


def test_what_each_schema_becomes(local_copies):
    def rows(stem):
        return prepare_benchmark(shipped(stem, local_copies[stem]), SkipReport("x")).to_list()

    mathvista = {row["id"]: row for row in rows("mathvista")}
    assert (
        json.loads(mathvista["1"]["choices"]) == ["1.8", "2.0", "2.2"] and mathvista["1"]["answer"] == "2.0"
    )
    assert mathvista["1"]["question"].count("(A) 1.8") == 1  # the query lists them: not appended again
    assert mathvista["2"]["choices"] == "" and not mathvista["2"]["multiple_choice"]

    wemath = rows("wemath")[0]
    assert json.loads(wemath["choices"]) == ["30°", "45°", "60°", "90°", "No correct answer"]
    assert wemath["question"].endswith("Choices:\nA. 30°\nB. 45°\nC. 60°\nD. 90°\nE. No correct answer")

    mathvision = {row["id"]: row for row in rows("mathvision")}
    assert not mathvision["1"]["question"].startswith("<image1>")  # placeholders removed
    assert mathvision["3"]["question"].endswith("Choices:\nA. the circle\nB. the square")
    assert not mathvision["2"]["multiple_choice"]  # no options: free form

    mathverse = {row["id"]: row for row in rows("mathverse")}
    assert json.loads(mathverse["1"]["choices"]) == ["40°", "50°", "60°", "70°"]
    # Vision only: the question and its options are in the image; kept, graded by letter.
    assert mathverse["2"]["multiple_choice"] and mathverse["2"]["choices"] == ""
    assert mathverse["2"]["question"].startswith("According to the question shown in the image")

    mmmu = rows("mmmu_pro_vision")
    assert {row["question"] for row in mmmu} == {"Answer the multiple-choice question shown in the image."}
    assert json.loads(mmmu[0]["choices"]) == ["$6", "$7", "$8", "$9"]  # for grading, not shown

    logicvista = {row["id"]: row for row in rows("logicvista")}
    assert logicvista["lv-2"]["answer"] == "A, C" and logicvista["lv-2"]["multiple_choice"]

    dynamath = rows("dynamath")  # the configured split of the DatasetDict, not variant 2
    assert [row["id"] for row in dynamath] == ["1-1", "1-2"]


def test_multiple_choice_without_choices_is_a_counted_skip_or_a_named_error(local_copies, caplog):
    benchmark = shipped("mathvista", local_copies["mathvista"])
    report = SkipReport(source="test:MathVista")
    with caplog.at_level(logging.WARNING, logger="datamodules.benchmarks"):
        prepared = prepare_benchmark(benchmark, report)
    assert "4" not in prepared["id"]
    assert report.counts == {MISSING_CHOICES: 1} and report.examples[MISSING_CHOICES] == ["4"]
    assert "example '4' (row 3)" in caplog.text
    with pytest.raises(ValueError, match=r"test:MathVista: example '4' \(row 3\).*field 'choices'"):
        prepare_benchmark(benchmark, SkipReport(source="test:MathVista"), strict=True)


def test_a_column_the_config_names_must_exist(local_copies):
    benchmark = shipped("mathvista", local_copies["mathvista"])
    benchmark.choices_column = "options"
    with pytest.raises(ValueError, match="column 'options' \\(for choices_column\\) is not among"):
        prepare_benchmark(benchmark, SkipReport("x"))


def test_the_data_module_makes_one_test_loader_per_benchmark(local_copies, tiny_qwen):
    benchmarks = [shipped(stem, local_copies[stem]) for stem in ("wemath", "mathvista")]
    dm = BenchmarkDataModule(
        benchmarks=benchmarks, processor_name_or_path=str(tiny_qwen), eval_batch_size=8, max_skip_fraction=0.5
    )  # MathVista's fixture skips one example of four on purpose
    dm.setup("test")
    assert dm.eval_names["test"] == ["WeMath", "MathVista"]
    loaders = dm.test_dataloader()
    batch = next(iter(loaders[1]))
    # The grader's columns travel with the prompts.
    assert {"choices", "multiple_choice", "id"} <= set(batch.metadata[0])
    assert [(report.total, report.skipped) for report in dm.skip_reports] == [(2, 0), (4, 1)]
    assert dm.skip_reports[1].summary() == (
        "test:MathVista: kept 3 of 4 examples; skipped 1 multiple choice without choices (e.g. 4)"
    )
    assert dm.describe_sources()["MathVista"].endswith("(split testmini)")
    with pytest.raises(ValueError, match="repeated: \\['WeMath'\\]"):
        BenchmarkDataModule(benchmarks=benchmarks[:1] * 2)


def test_benchmarks_are_chosen_by_name_in_the_papers_order():
    configs = load_benchmark_configs(EVAL_CONFIGS)
    assert sorted(configs) == sorted(BUILDERS)
    assert [entry["name"] for entry in select_benchmarks(configs, "all")] == list(PAPER_BENCHMARKS)
    assert [entry["name"] for entry in select_benchmarks(configs, "wemath, MMMU-Pro-V,mmmu_pro_vision")] == [
        "WeMath",
        "MMMU-Pro-V",
        "MMMU-Pro-V",
    ]
    with pytest.raises(ValueError, match="unknown benchmark 'mathvsta'; known: dynamath \\(DynaMath\\)"):
        select_benchmarks(configs, "mathvista,mathvsta")
