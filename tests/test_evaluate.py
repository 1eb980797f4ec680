"""`cppo evaluate`: the seven shipped benchmark configs on local copies, the report's rows and figures."""

import json

import pytest

from benchmark_data import EXPECTED, write_local_configs
from callbacks.evaluation import benchmark_result, format_report, mean_result
from cli import main
from cppo_lightning.rewards import choice_accuracy_reward
from datamodules.benchmarks import PAPER_BENCHMARKS

CPU = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.policy.dtype", "float32"]
# The fixtures skip one example of four on purpose (a multiple-choice row without its options).
CPU += ["--data.init_args.max_skip_fraction", "0.5"]


@pytest.fixture(scope="module")
def local_configs(tmp_path_factory):
    return write_local_configs(tmp_path_factory.mktemp("eval"))


def test_cppo_evaluate_reports_every_benchmark_in_the_papers_layout(tiny_qwen, local_configs, tmp_path):
    output = tmp_path / "report"
    # A grader that scores exactly the multiple-choice questions whose options reached it: every figure of
    # the report is then known (EXPECTED), whatever the random tiny model writes.
    grader = ["--model.evaluation.reward", "benchmark_data.choices_grader"]
    args = ["evaluate", "--model", f"tiny={tiny_qwen}", "--config-dir", str(local_configs), "--samples", "2"]
    assert main([*args, "--max-new-tokens", "6", "--output", str(output), *CPU, *grader]) == 0

    report = json.loads((output / "report.json").read_text())
    assert report["protocol"]["samples_per_question"] == 2 and report["protocol"]["temperature"] == 1.0
    results = report["models"]["tiny"]["benchmarks"]
    assert list(results) == list(PAPER_BENCHMARKS)  # the paper's column order
    expected_means = []
    for name, kept, skipped, with_options in EXPECTED.values():
        result = results[name]
        assert result["questions"] == kept and result["samples_per_question"] == 2
        assert sum(result["skipped"].values()) == skipped
        assert result["per_sample"] == [pytest.approx(with_options / kept)] * 2
        assert result["avg"] == pytest.approx(with_options / kept) and result["std"] == 0
        expected_means.append(with_options / kept)
    assert results["MathVista"]["skipped"] == {"multiple choice without choices": 1}
    assert report["models"]["tiny"]["mean"]["avg"] == pytest.approx(sum(expected_means) / 7)

    table = (output / "report.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| model |"))
    assert header == "| model | " + " | ".join(PAPER_BENCHMARKS) + " | Avg |"
    row = next(line for line in table if line.startswith("| tiny |"))
    assert row.split(" | ")[1] == f"{100 * 2 / 3:.1f} ± 0.0"  # MathVista: 2 of 3
    assert "GPT-4o-mini judge" in "\n".join(table)
    # The per-model folder holds the same report and every question's completions.
    samples = [json.loads(line) for line in (output / "tiny" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == sum(kept for _, kept, _, _ in EXPECTED.values())
    assert all(len(sample["completions"]) == len(sample["grades"]) == 2 for sample in samples)


def test_cppo_evaluate_with_the_default_grader(tiny_qwen, local_configs, tmp_path):
    output = tmp_path / "report"
    args = ["evaluate", "--model", str(tiny_qwen), "--config-dir", str(local_configs), "--samples", "2"]
    args += ["--benchmarks", "wemath,mathverse", "--max-samples", "2", "--max-new-tokens", "6"]
    assert main([*args, "--output", str(output), *CPU]) == 0
    report = json.loads((output / "report.json").read_text())
    assert report["protocol"]["reward_function"] == "cppo_lightning.rewards.choice_accuracy_reward"
    assert report["protocol"]["max_samples_per_benchmark"] == 2
    (model,) = report["models"].values()
    assert list(model["benchmarks"]) == ["WeMath", "MathVerse"]
    assert [result["questions"] for result in model["benchmarks"].values()] == [2, 2]
    # Every recorded grade is the choice grader's verdict on that completion.
    (folder,) = [path for path in output.iterdir() if path.is_dir()]
    for line in (folder / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        regraded = choice_accuracy_reward(
            [sample["question"]] * 2, sample["completions"], [sample["answer"]] * 2
        )
        assert all(grade in (0.0, 1.0) for grade in sample["grades"])
        if sample["benchmark"] == "MathVerse" and sample["id"] == "3":  # free form: no options needed
            assert sample["grades"] == regraded


def test_an_unknown_benchmark_is_an_error_naming_it(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["evaluate", "--model", "any", "--benchmarks", "mathvista,mathvsta"])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert "unknown benchmark 'mathvsta'" in error and "mathvista (MathVista)" in error


# ------------------------------------------------------------------------------------------------
# The figures, by hand
# ------------------------------------------------------------------------------------------------


def test_avg_at_k_and_its_spread_over_the_k_samples():
    # 4 questions x 2 samples. Sample 1 is right on 3 of 4 questions, sample 2 on 1 of 4:
    # avg@2 = (0.75 + 0.25) / 2 = 0.5; std over the 2 samples = |0.75 - 0.25| / sqrt(2) = 0.3536.
    first = benchmark_result("A", [[1, 0], [1, 1], [0, 0], [1, 0]])
    assert first.per_sample == [0.75, 0.25] and first.avg == 0.5
    assert first.std == pytest.approx(0.5 / 2**0.5)
    # A second benchmark: 1 question, right in both samples -> per sample [1, 1], std 0.
    second = benchmark_result("B", [[1, 1]])
    # Mean over benchmarks per sample index: [(0.75 + 1) / 2, (0.25 + 1) / 2] = [0.875, 0.625]:
    # avg 0.75, std 0.25 / sqrt(2) = 0.1768.
    mean = mean_result([first, second])
    assert mean.per_sample == [0.875, 0.625] and mean.avg == 0.75
    assert mean.std == pytest.approx(0.25 / 2**0.5)
    table = format_report({"m": [first, second]}, {"samples_per_question": 2, "temperature": 1.0})
    assert "| m | 50.0 ± 35.4 | 100.0 ± 0.0 | 75.0 ± 17.7 |" in table
    with pytest.raises(ValueError, match="different k"):
        mean_result([first, benchmark_result("C", [[1, 1, 1]])])


def test_avg_at_k_per_group_of_questions():
    # 4 questions x 2 samples in two groups. Group "a" (questions 1 and 3): sample 1 right on both, sample 2
    # on neither -> per sample [1, 0], avg 0.5, std 1 / sqrt(2). Group "b" (questions 2 and 4): sample 1 right
    # on one, sample 2 on one -> [0.5, 0.5], avg 0.5, std 0. The whole benchmark is unchanged by grouping.
    grades = [[1, 0], [1, 1], [1, 0], [0, 0]]
    result = benchmark_result("A", grades, groups=["a", "b", "a", "b"])
    assert result.per_sample == benchmark_result("A", grades).per_sample == [0.75, 0.25]
    assert list(result.groups) == ["a", "b"]
    assert result.groups["a"].per_sample == [1.0, 0.0] and result.groups["a"].questions == 2
    assert result.groups["a"].std == pytest.approx(2**-0.5)
    assert result.groups["b"].per_sample == [0.5, 0.5] and result.groups["b"].std == 0
    data = result.to_dict()
    assert data["groups"]["a"]["avg"] == 0.5 and "groups" not in data["groups"]["a"]
    assert "groups" not in benchmark_result("A", grades).to_dict()
    table = format_report(
        {"m": [result]}, {"samples_per_question": 2, "temperature": 1.0, "group_by": "family"}
    )
    assert "m, per family:" in table
    assert "| A | a | 2 | 50.0 ± 70.7 |" in table and "| A | b | 2 | 50.0 ± 0.0 |" in table
    with pytest.raises(ValueError, match="A: 3 group values for 4 questions"):
        benchmark_result("A", grades, groups=["a", "b", "a"])
