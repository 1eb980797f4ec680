"""Two CPU processes (DDP, gloo) through the real command line: training and metrics are synced."""

import csv
import os
import subprocess
import sys

import pytest

from datamodules.sampling import ResumableSampler
from datamodules.synthetic import generate_split
from helpers import ROOT, demo_args, demo_task


def test_ddp_two_processes_sync_metrics(tiny_qwen, tmp_path):
    train_size, val_size, batch_size = 16, 6, 2
    args = demo_args(
        "grpo",
        tiny_qwen,
        tmp_path,
        2,
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.limit_val_batches",
        "1.0",
        "--model.reward_functions",
        '{"helpers.answer_is_no": 1.0}',
        "--model.evaluation.reward",
        "helpers.answer_is_no",
        "--data.init_args.val_size",
        str(val_size),
        "--data.init_args.eval_batch_size",
        "2",
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    executable = os.path.join(os.path.dirname(sys.executable), "cppo")
    result = subprocess.run(
        [executable, *args], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (metrics_file,) = list(tmp_path.rglob("metrics.csv"))  # one logger: rank zero's
    rows = list(csv.DictReader(open(metrics_file)))

    # Validation: each rank grades half of the questions; the logged avg@k is over all of them.
    task = demo_task("grpo")
    answers = [example["answer"] for example in generate_split(task, "validation", val_size, 0)]
    everyone = sum(a == "no" for a in answers) / val_size
    rank_zero_only = sum(a == "no" for a in answers[0::2]) / len(answers[0::2])
    assert everyone != rank_zero_only  # otherwise this test could not tell synced from unsynced
    (val,) = [float(r["val/avg@2"]) for r in rows if r.get("val/avg@2")]
    assert val == pytest.approx(everyone, rel=1e-6)

    # Training: the reward statistics cover both ranks' prompts of the first step.
    train_answers = [example["answer"] for example in generate_split(task, "train", train_size, 0)]
    first_batches = [
        list(ResumableSampler(range(train_size), batch_size, num_replicas=2, rank=rank, seed=0))[:batch_size]
        for rank in (0, 1)
    ]
    indices = [index for batch in first_batches for index, _ in batch]
    expected = sum(train_answers[i] == "yes" for i in indices) / len(indices)
    step0 = next(r for r in rows if r["step"] == "0" and r.get("train/reward_mean"))
    assert float(step0["train/reward_mean"]) == pytest.approx(expected, rel=1e-6)
