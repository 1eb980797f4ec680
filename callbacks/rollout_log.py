"""Rollout samples as JSON lines: what the policy wrote, how it was graded, and its advantage.

One line per logged rollout in ``<log_dir>/rollouts.jsonl``::

    {"step": 12, "id": "geo-0041", "question": "...", "completion": "<think>...", "answer": "3",
     "extracted": "3", "reward": 1.0, "reward_terms": {"accuracy": 1.0, "format": 1.0}, "advantage": 0.87}

``jq`` or ``pandas.read_json(path, lines=True)`` read it back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning.pytorch as pl
from typing_extensions import override

from cppo_lightning.rewards import extract_boxed

log = logging.getLogger(__name__)


def logger_step(trainer: pl.Trainer) -> int:
    """The step the loggers attach to the current training batch's metrics (0-based).

    ``CPPOModule`` optimizes manually and may take several optimizer steps per RL step (mini-batches,
    PPO epochs), so ``trainer.global_step`` counts optimizer steps. The loggers' x-axis counts training
    batches, i.e. RL steps; callbacks name their outputs by that step so that a picture lines up with the
    logged curves. Valid in ``on_train_batch_end`` and in validation hooks run during ``fit``.
    """
    return max(trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1, 0)


def resolve_log_dir(trainer: pl.Trainer, output_dir: str | Path | None) -> Path:
    """``output_dir`` if given, else the trainer's log folder (its ``default_root_dir`` without a logger).

    Call this on every rank (e.g. in ``setup``): ``trainer.log_dir`` broadcasts from rank zero, so calling
    it on rank zero alone would hang a multi-process run.
    """
    if output_dir is not None:
        return Path(output_dir)
    log_dir = trainer.log_dir
    return Path(log_dir if log_dir is not None else trainer.default_root_dir)


class RolloutSamplesLogger(pl.Callback):
    """Append rollout samples of every ``every_n_steps``-th training step to ``<log_dir>/rollouts.jsonl``.

    Rank zero writes its own rollouts (the other ranks' differ only in their prompts). Lines are appended,
    so a resumed run continues the same file.

    Args:
        every_n_steps: write the rollouts of one step in this many.
        max_rows_per_step: at most this many rollouts per step (the first ones: whole groups of ``G``
            completions of the same prompt stay together).
        max_bytes: stop writing (with one warning) before the file would grow beyond this size.
        output_dir: folder of ``rollouts.jsonl``; default: the trainer's ``log_dir``.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        max_rows_per_step: int = 8,
        max_bytes: int = 50_000_000,
        output_dir: str | Path | None = None,
    ) -> None:
        if every_n_steps < 1 or max_rows_per_step < 1 or max_bytes < 1:
            raise ValueError(
                f"every_n_steps ({every_n_steps}), max_rows_per_step ({max_rows_per_step}) and max_bytes "
                f"({max_bytes}) must be >= 1"
            )
        self.every_n_steps = every_n_steps
        self.max_rows_per_step = max_rows_per_step
        self.max_bytes = max_bytes
        self.output_dir = output_dir
        self.path: Path | None = None
        self.full = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.path = resolve_log_dir(trainer, self.output_dir) / "rollouts.jsonl"

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = logger_step(trainer)
        if self.full or (step + 1) % self.every_n_steps or not trainer.is_global_zero:
            return
        rollout = getattr(pl_module, "last_rollout", None)
        if rollout is None or self.path is None:
            return
        records = rollout_records(rollout, step, self.max_rows_per_step)
        lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        with self.path.open("a", encoding="utf-8") as file:
            for line in lines:
                encoded = len(line.encode("utf-8"))
                if size + encoded > self.max_bytes:
                    self.full = True
                    log.warning(
                        "%s reached its size limit of %d bytes (max_bytes): no more rollout samples are "
                        "written",
                        self.path,
                        self.max_bytes,
                    )
                    break
                file.write(line)
                size += encoded


def rollout_records(rollout, step: int, max_rows: int) -> list[dict]:
    """JSON-ready records of the first ``max_rows`` rollouts of a :class:`~cppo_lightning.rollout.Rollout`."""
    batch = rollout.batch
    rows = range(min(max_rows, len(rollout)))
    example_rows = rollout.example_rows.tolist()
    rewards = rollout.rewards.float().tolist()
    advantages = rollout.advantages.float().tolist()
    terms = {name: values.float().tolist() for name, values in rollout.reward_terms.items()}
    records = []
    for row in rows:
        example = example_rows[row]
        completion = rollout.completions[row]
        records.append(
            {
                "step": step,
                "id": batch.ids[example] if batch is not None else None,
                "question": batch.questions[example] if batch is not None and batch.questions else None,
                "completion": completion,
                "answer": batch.answers[example] if batch is not None else None,
                "extracted": extract_boxed(completion),
                "reward": rewards[row],
                "reward_terms": {name: values[row] for name, values in terms.items()},
                "advantage": advantages[row],
            }
        )
    return records
