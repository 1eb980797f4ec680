"""ThroughputMonitor on a real (tiny) GRPO run: its metrics follow from the module's timings."""

import csv
import resource
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from callbacks import ThroughputMonitor
from cppo_lightning.objectives import GRPO

# The tiny data module and module builder live beside the perception tests (one definition for all).
from helpers import HandWrittenDataModule, small_module


def peak_rss_gib():
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak * 1024 / 2**30


@pytest.fixture(scope="module")
def monitored_run(tiny_qwen, tmp_path_factory):
    """Two GRPO steps logged at every step; the process's peak RSS before and after."""
    before = peak_rss_gib()
    trainer = pl.Trainer(
        max_steps=2,
        logger=CSVLogger(tmp_path_factory.mktemp("throughput"), name="run"),
        callbacks=[ThroughputMonitor()],
        log_every_n_steps=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(small_module(tiny_qwen, GRPO(beta=0.0)), datamodule=HandWrittenDataModule(tiny_qwen))
    with Path(trainer.log_dir, "metrics.csv").open(newline="") as file:
        rows = [
            {key: float(value) for key, value in row.items() if value != ""} for row in csv.DictReader(file)
        ]
    return [row for row in rows if "time/rollout_s" in row], before, peak_rss_gib()


def test_one_row_per_step_with_every_metric(monitored_run):
    rows, _, _ = monitored_run
    assert [row["step"] for row in rows] == [0, 1]
    for row in rows:
        for name in (
            "throughput/generated_tokens_per_s_all_ranks",
            "throughput/update_rollouts_per_s_all_ranks",
            "throughput/rollout_time_fraction",
            "throughput/step_s",
            "memory/peak_gb",
        ):
            assert name in row, f"{name} missing at step {row['step']}"


def test_values_follow_from_the_module_timings(monitored_run):
    rows, _, _ = monitored_run
    for row in rows:
        rollout, update = row["time/rollout_s"], row["time/update_s"]
        fraction = rollout / (rollout + update)
        assert row["throughput/rollout_time_fraction"] == pytest.approx(fraction, rel=1e-5)
        # One process: the sum over ranks is this rank's rate.
        for name in ("throughput/generated_tokens_per_s", "throughput/update_rollouts_per_s"):
            assert row[f"{name}_all_ranks"] == pytest.approx(row[name], rel=1e-5)
        # The whole step contains its rollout and its update.
        assert row["throughput/step_s"] >= rollout + update


def test_peak_memory_is_the_process_peak_rss_on_cpu(monitored_run):
    rows, before, after = monitored_run
    peaks = [row["memory/peak_gb"] for row in rows]
    # A peak never decreases, and it lies between the peaks measured before and after the run.
    assert peaks == sorted(peaks)
    assert before - 1e-6 <= peaks[0] and peaks[-1] <= after + 1e-6
