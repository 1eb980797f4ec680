"""plot_runs / ``cppo plot`` on two real tiny runs logged by CSVLogger, and on hand-written metric files."""

import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from cppo_lightning.objectives import CPPO, GRPO
from cppo_lightning.plots import main, plot_runs, read_metrics, runs_figure, smoothed

# The tiny data module and module builder live beside the perception tests (one definition for all).
from helpers import HandWrittenDataModule, small_module


@pytest.fixture(scope="module")
def two_runs(tiny_qwen, tmp_path_factory):
    """``<root>/cppo`` and ``<root>/grpo``: two steps each, metrics logged at every step."""
    root = tmp_path_factory.mktemp("runs")
    data = HandWrittenDataModule(tiny_qwen, count=4)
    for name, objective in (("cppo", CPPO()), ("grpo", GRPO(beta=0.0))):
        trainer = pl.Trainer(
            max_steps=2,
            logger=CSVLogger(root, name=name),
            log_every_n_steps=1,
            limit_val_batches=0,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(small_module(tiny_qwen, objective), datamodule=data)
    return root / "cppo", root / "grpo"


def legend_texts(axis):
    legend = axis.get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def test_one_subplot_per_metric_one_line_per_run(two_runs):
    figure = runs_figure(two_runs, metrics=("train/reward_mean", "train/cpl", "train/not_a_metric"))
    reward, cpl, missing = figure.axes
    assert legend_texts(reward) == ["cppo", "grpo"]
    # Each line is the run's logged values, step by step.
    for line, run in zip(reward.get_lines(), two_runs):
        steps, values = read_metrics(run)["train/reward_mean"]
        assert steps.tolist() == [0, 1]
        np.testing.assert_allclose(line.get_xdata(), steps)
        np.testing.assert_allclose(line.get_ydata(), values)
    # GRPO has no contrastive perception loss: skipped for that run, and said so.
    assert legend_texts(cpl) == ["cppo"]
    assert cpl.get_legend().get_title().get_text() == "not logged by: grpo"
    # No run has it: the subplot says so instead of drawing an empty legend.
    assert legend_texts(missing) == []
    assert [text.get_text() for text in missing.texts] == ["no run logged train/not_a_metric"]


def test_plot_runs_and_main_write_a_png(two_runs, tmp_path, capsys):
    written = plot_runs(two_runs, tmp_path / "sub" / "compare.png")
    assert written == tmp_path / "sub" / "compare.png"
    assert Image.open(written).format == "PNG"

    output = tmp_path / "cli.png"
    options = ["--output", str(output), "--metrics", "train/reward_mean,train/kl", "--smooth", "2"]
    argv = [str(run) for run in two_runs] + options
    assert main(argv) == 0
    assert Image.open(output).size[0] > Image.open(output).size[1]  # two subplots side by side
    assert capsys.readouterr().out.strip() == str(output)


def test_equal_folder_names_get_their_parent_in_the_label(two_runs, tmp_path):
    first, second = tmp_path / "seed0" / "run", tmp_path / "seed1" / "run"
    shutil.copytree(two_runs[0], first)
    shutil.copytree(two_runs[1], second)
    (axis,) = runs_figure([first, second], metrics=["train/reward_mean"]).axes
    assert legend_texts(axis) == ["seed0/run", "seed1/run"]


def test_a_run_without_metrics_is_an_error_naming_it(two_runs, tmp_path, capsys):
    empty = tmp_path / "crashed-run"
    (empty / "version_0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="crashed-run"):
        plot_runs([two_runs[0], empty], tmp_path / "out.png")
    assert not (tmp_path / "out.png").exists()
    assert main([str(two_runs[0]), str(empty), "--output", str(tmp_path / "out.png")]) == 2
    assert "crashed-run" in capsys.readouterr().err


def test_a_misspelt_metric_is_an_error_with_the_closest_name(two_runs, tmp_path, capsys):
    # `cppo plot RUN --metrics train/acuracy` used to exit 0 with a blank panel.
    output = tmp_path / "typo.png"
    with pytest.raises(SystemExit) as exited:
        main([str(two_runs[0]), "--metrics", "train/reward_mean,train/rewrd_std", "--output", str(output)])
    assert exited.value.code == 2 and not output.exists()
    error = capsys.readouterr().err
    assert "no run logged 'train/rewrd_std' (did you mean 'train/reward_std'?)" in error
    assert "the runs logged: " in error and "train/reward_mean" in error


def test_resumed_run_reads_versions_in_order_and_sparse_rows(tmp_path):
    run = tmp_path / "run"
    for version, text in (
        # version_2 logged steps 0-2; the run was resumed from step 1 into version_10 (not version_1:
        # "10" sorts before "2" as text). Validation rows leave the training columns empty.
        ("version_2", "epoch,step,train/reward_mean,val/avg@8\n0,0,0.1,\n0,1,0.2,\n0,1,,0.5\n0,2,0.9,\n"),
        ("version_10", "epoch,step,train/reward_mean,val/avg@8\n0,1,0.3,\n0,2,0.4,\n0,3,0.6,0.7\n"),
    ):
        (run / version).mkdir(parents=True)
        (run / version / "metrics.csv").write_text(text)
    metrics = read_metrics(run)
    steps, values = metrics["train/reward_mean"]
    assert steps.tolist() == [0, 1, 2, 3]
    # A step logged again by the later version keeps the later value.
    assert values.tolist() == [0.1, 0.3, 0.4, 0.6]
    assert metrics["val/avg@8"][1].tolist() == [0.5, 0.7]


def test_smoothing_is_a_trailing_mean():
    # Window 2: the first point has only itself, then means of neighbours: (1+2)/2, (2+4)/2, (4+8)/2.
    assert smoothed(np.array([1.0, 2.0, 4.0, 8.0]), 2).tolist() == [1.0, 1.5, 3.0, 6.0]
    assert smoothed(np.array([1.0, 2.0, 4.0]), 1).tolist() == [1.0, 2.0, 4.0]


def test_groups_figure_draws_the_mean_over_seeds(tmp_path):
    from cppo_lightning.plots import groups_figure

    def run(name, values):
        folder = tmp_path / name
        folder.mkdir()
        rows = "\n".join(f"0,{step},{value}" for step, value in enumerate(values))
        (folder / "metrics.csv").write_text("epoch,step,train/accuracy\n" + rows + "\n")
        return folder

    groups = {
        "GRPO": [run("g0", [0.0, 0.2, 0.4, 0.6, 0.8]), run("g1", [0.2, 0.4, 0.6, 0.8, 1.0])],
        "CPPO": [run("c0", [0.5] * 5)],
    }
    figure = groups_figure(groups, metrics=("train/accuracy",), smooth=1)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {"GRPO (n=2)", "CPPO (n=1)"}
    # The GRPO line is the per-step mean of its two seeds: 0.1, 0.3, 0.5, 0.7, 0.9.
    assert list(lines["GRPO (n=2)"].get_ydata()) == pytest.approx([0.1, 0.3, 0.5, 0.7, 0.9])
