"""Under two-process DDP only rank zero writes: one set of perception files, one rollouts.jsonl, and both
hold rank zero's own prompts only. ``ddp_spawn`` (gloo on CPU) runs inside pytest; the plain ``ddp``
launcher would re-run the pytest command line in each child."""

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import CSVLogger
from test_perception import parse_page
from torch.utils.data import DistributedSampler

import callbacks.perception as perception
from callbacks import PerceptionTokenVisualizer, RolloutSamplesLogger, ThroughputMonitor
from cppo_lightning.objectives import CPPO

# The tiny data module and module builder live beside the perception tests (one definition for all).
from helpers import HandWrittenDataModule, small_module


class RenderSpy(pl.Callback):
    """In each process, wrap the renderer so that every call leaves a file named by the calling rank."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.original = None

    def setup(self, trainer, pl_module, stage):
        self.original = original = perception.render_perception
        folder, rank = self.folder, trainer.global_rank

        def spy(rollout, rows, tokenizer, stem, title):
            (folder / f"rank{rank}-{stem.name}").touch()
            return original(rollout, rows, tokenizer, stem, title)

        perception.render_perception = spy

    def teardown(self, trainer, pl_module, stage):
        perception.render_perception = self.original


@pytest.mark.slow
def test_only_rank_zero_writes_under_ddp(tiny_qwen, tmp_path):
    calls = tmp_path / "calls"
    calls.mkdir()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",  # gloo on CPU
        max_steps=2,
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        callbacks=[
            RenderSpy(calls),
            PerceptionTokenVisualizer(every_n_steps=1, num_rollouts=2, on_validation=False),
            RolloutSamplesLogger(every_n_steps=1, max_rows_per_step=8),
            ThroughputMonitor(),
        ],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(small_module(tiny_qwen, CPPO()), datamodule=HandWrittenDataModule(tiny_qwen, count=8))
    # 8 prompts: Lightning's distributed sampler (shuffled, seed 0) gives each rank four, two steps' worth.
    sampler = DistributedSampler(range(8), num_replicas=2, rank=0, shuffle=True, seed=0)
    rank_zero_ids = {f"ex{index}" for index in sampler}
    assert len(rank_zero_ids) == 4

    run = tmp_path / "run" / "version_0"
    assert sorted(p.name for p in calls.iterdir()) == ["rank0-step_000000", "rank0-step_000001"]
    assert sorted(p.name for p in (run / "perception").iterdir()) == [
        "step_000000.html",
        "step_000000.png",
        "step_000001.html",
        "step_000001.png",
    ]
    for page in ("step_000000.html", "step_000001.html"):
        text = (run / "perception" / page).read_text(encoding="utf-8")
        assert parse_page(run / "perception" / page)
        assert {f"ex{i}" for i in range(8) if f"example ex{i}<" in text} <= rank_zero_ids
    # Appended lines would show another rank's prompts or a third group of rows.
    lines = (run / "rollouts.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * 8
    assert {json.loads(line)["id"] for line in lines} == rank_zero_ids
    assert sorted(p.name for p in tmp_path.rglob("rollouts.jsonl")) == ["rollouts.jsonl"]

    # Whole-job generation rate: the two ranks' rates summed, above rank zero's own.
    with (run / "metrics.csv").open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["throughput/generated_tokens_per_s_all_ranks"]]
    assert len(rows) == 2
    for row in rows:
        rank_zero = float(row["throughput/generated_tokens_per_s"])
        assert float(row["throughput/generated_tokens_per_s_all_ranks"]) > rank_zero
