"""RolloutSamplesLogger on a real (tiny) GRPO run: what it writes, when, and where it stops."""

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger

from callbacks import RolloutSamplesLogger
from cppo_lightning.objectives import GRPO
from cppo_lightning.rewards import extract_boxed

# The tiny data module and module builder live beside the perception tests (one definition for all).
from helpers import HandWrittenDataModule, small_module


@pytest.fixture(scope="module")
def logged_run(tiny_qwen, tmp_path_factory):
    """Four GRPO steps (2 prompts x G=4 = 8 rollouts each) with an unlimited and a size-capped logger."""
    root = tmp_path_factory.mktemp("rollout-log")
    capped_dir = root / "capped"
    every_other = RolloutSamplesLogger(every_n_steps=2, max_rows_per_step=6)
    # The same rows, but room for a few lines only (a line is a few hundred bytes here).
    capped = RolloutSamplesLogger(every_n_steps=2, max_rows_per_step=6, max_bytes=1200, output_dir=capped_dir)
    module = small_module(tiny_qwen, GRPO(beta=0.0))
    trainer = pl.Trainer(
        max_steps=4,
        logger=CSVLogger(root, name="run"),
        callbacks=[every_other, capped],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("callbacks.rollout_log")
    logger.addHandler(handler)
    try:
        trainer.fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=8))
    finally:
        logger.removeHandler(handler)
    return trainer, module, capped_dir / "rollouts.jsonl", records


def read_lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_every_other_step_in_the_log_dir(logged_run):
    trainer, _, _, _ = logged_run
    lines = read_lines(Path(trainer.log_dir, "rollouts.jsonl"))
    # Steps 0..3 as the loggers count them; due after every second step: 1 and 3, 6 rows each.
    assert [line["step"] for line in lines] == [1] * 6 + [3] * 6


def test_lines_are_the_rollouts_of_the_step(logged_run):
    trainer, module, _, _ = logged_run
    rollout = module.last_rollout  # step 3's
    lines = [line for line in read_lines(Path(trainer.log_dir, "rollouts.jsonl")) if line["step"] == 3]
    batch = rollout.batch
    for row, line in enumerate(lines):
        example = int(rollout.example_rows[row])
        assert line["id"] == batch.ids[example]
        assert line["question"] == batch.questions[example]
        assert line["answer"] == batch.answers[example]
        assert line["completion"] == rollout.completions[row]
        assert line["extracted"] == extract_boxed(rollout.completions[row])
        assert line["reward"] == pytest.approx(float(rollout.rewards[row]))
        assert line["advantage"] == pytest.approx(float(rollout.advantages[row]))
        assert line["reward_terms"] == {"varied": pytest.approx(float(rollout.reward_terms["varied"][row]))}
    # The first six rows: G=4 samples of the step's first prompt, then two of the second.
    assert [line["id"] for line in lines] == [batch.ids[0]] * 4 + [batch.ids[1]] * 2


def test_stops_before_exceeding_max_bytes_with_one_warning(logged_run):
    trainer, _, capped_path, records = logged_run
    full = Path(trainer.log_dir, "rollouts.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    kept = capped_path.read_text(encoding="utf-8").splitlines(keepends=True)
    size = capped_path.stat().st_size
    # Whole lines, the same as the unlimited logger's, up to the first one that would not have fitted.
    assert 0 < len(kept) < len(full)
    assert kept == full[: len(kept)]
    assert size <= 1200 < size + len(full[len(kept)].encode("utf-8"))
    warnings = [record for record in records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "max_bytes" in warnings[0].getMessage()
