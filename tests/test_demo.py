"""The main job in miniature: warm start -> held-out avg@k -> CPPO fit -> held-out avg@k, with its artefacts."""

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from cli import main
from recipes.demo import HeldOut, study


def test_demo_pipeline_in_miniature(tiny_qwen, tmp_path, capsys):
    small_data = (
        " --data.init_args.train_size 32 --data.init_args.val_size 4 --data.init_args.batch_size 2"
        " --data.init_args.task.image_size 56 --data.init_args.task.max_shapes 1"
    )
    warm_args = (
        f"--model.policy.model_name_or_path {tiny_qwen} --trainer.max_steps 3 --trainer.val_check_interval 3"
        + small_data
    )
    fit_args = (
        "--trainer.max_steps 2 --trainer.val_check_interval 2 --data.init_args.test_size 4"
        " --data.init_args.eval_batch_size 4 --model.rollout.samples_per_prompt 4 --model.rollout.max_new_tokens 8"
        " --model.update.micro_batch_rollouts 8 --model.evaluation.samples_per_question 2" + small_data
    )
    argv = ["demo", "--output", str(tmp_path), "--warmstart-args", warm_args, "--fit-args", fit_args]
    stray = Path("config.yaml")  # the held-out evaluation runs without a logger: nothing may land here
    existed = stray.exists()
    assert main(argv) == 0
    assert stray.exists() == existed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 <= summary["warm_start_avg_at_k"] <= 1.0 and 0.0 <= summary["trained_avg_at_k"] <= 1.0
    run = tmp_path / "cppo" / "version_0"
    assert summary["run"] == str(run)
    for artefact in (
        "config.yaml",
        "metrics.csv",
        "checkpoints/last.ckpt",
        "checkpoints/adapter/adapter_config.json",
    ):
        assert (run / artefact).exists(), artefact
    assert Image.open(run / "curves.png").size[0] > 0
    # The visualisation callback of the demo config draws on validation (and every 20 steps).
    assert list((run / "perception").glob("*step_*.html")) and list((run / "perception").glob("*step_*.png"))
    assert (tmp_path / "warmstart" / "model" / "config.json").exists()
    assert "held-out avg@k: warm start" in capsys.readouterr().out

    # A second demo reuses the warm start made from the same config.
    assert main(argv) == 0
    assert "reusing" in capsys.readouterr().out


def test_study_in_miniature(tiny_qwen, tmp_path):
    small_data = (
        " --data.init_args.train_size 16 --data.init_args.val_size 4 --data.init_args.batch_size 2"
        " --data.init_args.task.image_size 56 --data.init_args.task.max_shapes 1"
    )
    warm_args = (
        f"--model.policy.model_name_or_path {tiny_qwen} --trainer.max_steps 2 --trainer.val_check_interval 2"
        + small_data
    )
    fit_args = (
        "--trainer.max_steps 2 --trainer.val_check_interval 2 --data.init_args.test_size 4"
        " --data.init_args.eval_batch_size 4 --model.rollout.samples_per_prompt 4 --model.rollout.max_new_tokens 6"
        " --model.update.micro_batch_rollouts 8 --model.evaluation.samples_per_question 2" + small_data
    )
    argv = [
        "study",
        "--output",
        str(tmp_path),
        "--objectives",
        "grpo,cppo",
        "--seeds",
        "0,1",
        "--tag",
        "mini",
        "--jobs",
        "2",
    ]
    assert main([*argv, "--warmstart-args", warm_args, "--fit-args", fit_args]) == 0

    summary = json.loads((tmp_path / "study-mini.json").read_text())
    assert set(summary["results"]) == {"grpo-mini", "cppo-mini"}
    assert all(len(values) == 2 for values in summary["results"].values())
    # The diagnostics are each method's own auxiliary losses: CPPO's CPL and divergences, not GRPO's.
    assert {"train/cpl", "train/divergence_preserving", "train/divergence_removing"} <= set(
        summary["diagnostics"]["CPPO-MINI"]
    )
    assert "train/cpl" not in summary["diagnostics"]["GRPO-MINI"]
    # The table row of a method is the mean of its per-seed results.
    table = (tmp_path / "study-mini.md").read_text()
    grpo = summary["results"]["grpo-mini"]
    assert f"| GRPO-MINI | {sum(grpo) / 2:.3f} ± " in table
    assert {p.name for p in tmp_path.iterdir()} >= {"grpo-mini-seed0", "cppo-mini-seed1", "study-mini.png"}
    # Two runs at a time, each in its own process with half the cores.
    assert summary["settings"]["jobs"] == 2
    assert summary["settings"]["threads_per_run"] == max(1, (os.cpu_count() or 1) // 2)
    # Per question family: each run's test report (report.json in its folder, per family) is what the study
    # lists for that seed, and the overall avg@k is the families' question-weighted mean.
    for objective in ("grpo-mini", "cppo-mini"):
        for seed, overall in enumerate(summary["results"][objective]):
            report = json.loads(
                (tmp_path / f"{objective}-seed{seed}" / "version_0" / "report.json").read_text()
            )
            (benchmark,) = next(iter(report["models"].values()))["benchmarks"].values()
            families = benchmark["groups"]
            assert set(families) <= {"colour_of", "count_colour", "presence"} and families
            for family, figures in families.items():
                assert summary["groups"][objective][family][seed] == figures["avg"]
            weighted = sum(figures["avg"] * figures["questions"] for figures in families.values())
            assert overall == pytest.approx(weighted / benchmark["questions"])
    assert set(summary["warm_start_groups"]) == set(summary["groups"]["grpo-mini"])
    assert "| method | " + " | ".join(sorted(summary["warm_start_groups"])) + " |" in table


def test_study_refuses_an_objective_without_a_config_before_any_run(tmp_path):
    # Checked before the warm start: a misspelt arm must not cost minutes of training first.
    with pytest.raises(ValueError, match=r"no study config for objectives \['cppo_audit'\].*'cppo_audited'"):
        study(output=tmp_path, objectives=["grpo", "cppo_audit"])
    with pytest.raises(ValueError, match="jobs must be >= 1, got 0"):
        study(output=tmp_path, jobs=0)
    assert not any(tmp_path.iterdir())


def test_a_held_out_result_still_unpacks_as_the_old_tuple_with_a_warning():
    result = HeldOut(0.5, {"colour_of": 0.75}, Path("runs/x"))
    with pytest.warns(DeprecationWarning, match=r"\.accuracy and \.run"):
        accuracy, run = result
    assert (accuracy, run) == (0.5, Path("runs/x"))
