"""Runs that resume: `cppo fit --ckpt_path last` / `--resume RUN_DIR` continue the same run folder and
metrics file from the newest complete checkpoint, and end where an uninterrupted run ends."""

import csv
import json
import shutil
import struct
import subprocess
import sys
import zipfile

import pytest
import torch

from cli import lightning_cli
from helpers import VARIED_REWARD, demo_args

EVERY_STEP = json.dumps(
    [
        {
            "class_path": "callbacks.AtomicCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 1},
        },
        {"class_path": "callbacks.AdapterExport"},
        {"class_path": "callbacks.PreemptionCheckpoint"},
    ]
)


def fit_args(model, save_dir, steps, *extra):
    # GRPO, the cheapest objective, with a reward that varies (so every step changes the adapters);
    # validation every 2 steps so that resumed runs cross a validation.
    return demo_args(
        "grpo",
        model,
        save_dir,
        steps,
        "--trainer.val_check_interval",
        "2",
        "--trainer.callbacks",
        EVERY_STEP,
        *VARIED_REWARD,
        *extra,
    )


def rows(run):
    """metrics.csv without the wall-clock columns (timings differ between any two runs)."""
    with open(run / "metrics.csv") as handle:
        return [
            {key: value for key, value in row.items() if not key.startswith(("time/", "throughput/"))}
            for row in csv.DictReader(handle)
        ]


def trained(checkpoint):
    return torch.load(checkpoint, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def straight(tiny_qwen, tmp_path_factory):
    """An uninterrupted 4-step run: what every resumed run must reproduce."""
    save_dir = tmp_path_factory.mktemp("straight")
    lightning_cli(fit_args(tiny_qwen, save_dir, 4))
    return save_dir / "grpo" / "version_0"


def test_a_crashed_run_continues_in_its_folder_and_ends_like_an_uninterrupted_one(
    tiny_qwen, tmp_path, straight, capsys
):
    lightning_cli(fit_args(tiny_qwen, tmp_path, 2))  # a run that stopped at step 2 (its last checkpoint)
    run = tmp_path / "grpo" / "version_0"
    capsys.readouterr()
    cli = lightning_cli(fit_args(tiny_qwen, tmp_path, 3, "--ckpt_path", "last"))

    # The same folder: no version_1, and it says what it resumed.
    assert sorted(p.name for p in (tmp_path / "grpo").iterdir()) == ["version_0"]
    assert cli.resumption.run_dir == run and cli.resumption.checkpoint == run / "checkpoints" / "last.ckpt"
    assert cli.resumption.step == 2 and cli.trainer.global_step == 3
    assert f"resuming {run} from last.ckpt (global step 2)" in capsys.readouterr().out
    # One metrics file, each step once (validation after steps 2 and 4, logged at steps 1 and 3).
    assert [row["step"] for row in rows(run)] == ["0", "1", "1", "2"]

    # Then what a non-atomic writer leaves when the disk fills or the job dies mid-write: a truncated file.
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    # `--resume RUN_DIR` without --config: the run folder's own config.yaml, with one override.
    cli = lightning_cli(["fit", "--resume", str(run), "--trainer.max_steps", "4"])
    assert cli.resumption.passed_over[0][0] == last and "truncated" in cli.resumption.passed_over[0][1]
    assert cli.resumption.checkpoint.name == "epoch=0-step=3.ckpt" and cli.resumption.step == 3
    assert cli.trainer.global_step == 4 and cli.trainer.log_dir == str(run)

    # Twice interrupted, it ends with the rows and the parameters of the uninterrupted run
    # (CPU runs are deterministic for a seed).
    resumed, expected = rows(run), rows(straight)
    assert [row["step"] for row in resumed] == ["0", "1", "1", "2", "3", "3"]
    assert resumed == expected
    assert float([row for row in resumed if row["train/grad_norm"]][-1]["train/grad_norm"]) > 0  # it trained
    final, reference = (
        trained(run / "checkpoints" / "last.ckpt"),
        trained(straight / "checkpoints" / "last.ckpt"),
    )
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)


def test_ckpt_path_last_without_any_checkpoint_starts_a_new_run(tiny_qwen, tmp_path, capsys):
    cli = lightning_cli(fit_args(tiny_qwen, tmp_path, 1, "--ckpt_path", "last"))
    assert cli.resumption.checkpoint is None and cli.trainer.global_step == 1
    assert "no complete checkpoint found" in capsys.readouterr().out


def test_an_explicit_incomplete_checkpoint_is_refused_naming_it(tmp_path, tiny_qwen):
    broken = tmp_path / "cut.ckpt"
    broken.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(SystemExit, match=r"cut.ckpt is incomplete: truncated or corrupt"):
        lightning_cli(fit_args(tiny_qwen, tmp_path, 1, "--ckpt_path", str(broken)))


def test_the_readme_validate_command_uses_what_the_run_trained_on(tiny_qwen, straight, tmp_path):
    # README: cppo validate --config RUN/config.yaml --ckpt_path RUN/checkpoints/last.ckpt
    cli = lightning_cli(
        [
            "validate",
            "--config",
            str(straight / "config.yaml"),
            "--ckpt_path",
            str(straight / "checkpoints" / "last.ckpt"),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ]
    )
    assert cli.model.policy_config.model_name_or_path == str(tiny_qwen)
    assert "val/avg@2" in cli.trainer.callback_metrics


# ------------------------------------------------------------------ what wins on resume (issue 22, item 1)


def test_a_checkpoint_of_another_objective_trains_what_the_config_says(tiny_qwen, straight, tmp_path, capsys):
    # `cppo fit --config cppo.yaml --ckpt_path <a GRPO run's last.ckpt>` with G changed on the command line.
    checkpoint = straight / "checkpoints" / "last.ckpt"
    args = demo_args("cppo", tiny_qwen, tmp_path, 5, "--model.rollout.samples_per_prompt", "3")
    args += ["--trainer.limit_val_batches", "0"]
    cli = lightning_cli([*args, "--ckpt_path", str(checkpoint)])
    assert type(cli.model.objective).__name__ == "CPPO" and cli.model.rollout_config.samples_per_prompt == 3
    assert cli.trainer.global_step == 5  # it resumed at step 4 and trained one CPPO step
    saved = (tmp_path / "cppo" / "version_0" / "config.yaml").read_text()
    assert "class_path: cppo_lightning.objectives.CPPO" in saved and "samples_per_prompt: 3" in saved
    # Every difference is listed at start-up, with both values.
    assert ("model.rollout.samples_per_prompt", 4, 3) in cli.hyperparameter_differences
    out = capsys.readouterr().out
    assert (
        f"fit uses the config and command line where they differ from the hyperparameters saved in {checkpoint}"
        in out
    )
    assert "  model.rollout.samples_per_prompt: 4 in the checkpoint -> 3" in out
    assert (
        "  model.objective.class_path: 'cppo_lightning.objectives.objectives.GRPO' in the checkpoint -> "
        "'cppo_lightning.objectives.CPPO'" in out
    )


def test_resume_with_an_override_uses_the_override(tiny_qwen, straight, tmp_path, capsys):
    # `cppo fit --resume RUN --model.rollout.samples_per_prompt 3` (the run trained with G = 4).
    run = shutil.copytree(straight, tmp_path / "grpo" / "version_0")
    cli = lightning_cli(
        ["fit", "--resume", str(run), "--model.rollout.samples_per_prompt", "3", "--trainer.max_steps", "5"]
    )
    assert cli.model.rollout_config.samples_per_prompt == 3 and cli.trainer.global_step == 5
    assert "samples_per_prompt: 3" in (run / "config.yaml").read_text()
    assert cli.hyperparameter_differences == [("model.rollout.samples_per_prompt", 4, 3)]
    assert "  model.rollout.samples_per_prompt: 4 in the checkpoint -> 3" in capsys.readouterr().out


def test_validate_reads_the_checkpoint_where_the_config_is_silent(tiny_qwen, straight, tmp_path):
    # A config that names only data and trainer: the model settings are the checkpoint's; the command
    # line still wins where it speaks.
    config = tmp_path / "data-only.yaml"
    config.write_text(
        "trainer:\n  logger: false\n  enable_progress_bar: false\n  limit_val_batches: 1\n"
        "data:\n  class_path: datamodules.SyntheticVQADataModule\n"
        "  init_args:\n    task:\n      image_size: 112\n    train_size: 4\n    val_size: 2\n    test_size: 2\n"
        "    eval_batch_size: 2\n"
    )
    checkpoint = straight / "checkpoints" / "last.ckpt"
    args = ["validate", "--config", str(config), "--ckpt_path", str(checkpoint)]
    args += ["--trainer.default_root_dir", str(tmp_path)]  # no logger: config.yaml and views go there
    cli = lightning_cli([*args, "--model.evaluation.samples_per_question", "3"])
    assert cli.model.policy_config.model_name_or_path == str(tiny_qwen)  # from the checkpoint
    assert type(cli.model.objective).__name__ == "GRPO" and cli.model.rollout_config.samples_per_prompt == 4
    assert cli.model.evaluation.samples_per_question == 3  # from the command line
    assert cli.hyperparameter_differences == [("model.evaluation.samples_per_question", 2, 3)]
    assert "val/avg@3" in cli.trainer.callback_metrics


def test_validate_with_ckpt_path_last_and_a_changed_setting(tiny_qwen, straight, capsys):
    # The checkpoint's hyperparameters are read where the config is silent; `last` stays the newest file.
    args = ["validate", "--config", str(straight / "config.yaml"), "--ckpt_path", "last"]
    cli = lightning_cli([*args, "--model.evaluation.samples_per_question", "3"])
    assert cli.trainer.ckpt_path == str(straight / "checkpoints" / "last.ckpt")
    assert cli.hyperparameter_differences == [("model.evaluation.samples_per_question", 2, 3)]
    assert "val/avg@3" in cli.trainer.callback_metrics


def flip_tensor_bytes(checkpoint):
    """Flip 16 bytes inside the largest tensor's data, leaving the zip directory intact: what a bad disk
    or a faulty copy does, and what ``torch.load`` accepts without a word."""
    with zipfile.ZipFile(checkpoint) as archive:
        member = max(
            (info for info in archive.infolist() if "/data/" in info.filename),
            key=lambda info: info.file_size,
        )
    data = bytearray(checkpoint.read_bytes())
    name_length, extra_length = struct.unpack(
        "<HH", data[member.header_offset + 26 : member.header_offset + 30]
    )
    start = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    checkpoint.write_bytes(data)
    return member.filename


def test_a_checkpoint_with_flipped_tensor_bytes_is_passed_over(tiny_qwen, straight, tmp_path, capsys):
    run = shutil.copytree(straight, tmp_path / "grpo" / "version_0")
    last = run / "checkpoints" / "last.ckpt"
    member = flip_tensor_bytes(last)
    torch.load(last, weights_only=True)  # it loads: only the checksums tell
    # An explicit path to it is refused, naming the damaged member and the intact checkpoint beside it.
    with pytest.raises(
        SystemExit, match=rf"last.ckpt is incomplete: corrupt: the data of '{member}' does not match"
    ):
        lightning_cli(fit_args(tiny_qwen, tmp_path, 5, "--ckpt_path", str(last)))
    # `--resume` passes over it and continues from the intact step-4 checkpoint of the same state.
    cli = lightning_cli(["fit", "--resume", str(run), "--trainer.max_steps", "5"])
    assert cli.resumption.passed_over == [
        (last, f"corrupt: the data of '{member}' does not match its recorded checksum (CRC-32)")
    ]
    assert cli.resumption.checkpoint.name == "epoch=0-step=4.ckpt" and cli.trainer.global_step == 5
    assert f"checkpoint {last} is incomplete (corrupt: the data of" in capsys.readouterr().out


# A second process holding a run folder's lock, as a `cppo fit` that is still running holds it.
HOLDER = """
import fcntl, os, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
handle.truncate(0)
handle.write(f"pid {os.getpid()} on this host since now\\n")
handle.flush()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_writer_of_a_run_folder_is_refused(tiny_qwen, straight, tmp_path):
    run = shutil.copytree(straight, tmp_path / "grpo" / "version_0")
    metrics, checkpoints = (run / "metrics.csv").read_text(), sorted((run / "checkpoints").iterdir())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run / ".cppo.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        # `cppo fit --ckpt_path last` while the first run still trains in that folder.
        with pytest.raises(SystemExit) as refused:
            lightning_cli(fit_args(tiny_qwen, tmp_path, 5, "--ckpt_path", "last"))
        message = str(refused.value)
        assert message.startswith(f"cppo: the run folder {run} is in use by pid {holder.pid} on this host")
        assert "log every step twice" in message
        # Nothing of the first run was touched: its metrics and checkpoints are as they were.
        assert (run / "metrics.csv").read_text() == metrics
        assert sorted((run / "checkpoints").iterdir()) == checkpoints
    finally:
        holder.communicate("", timeout=30)
    # Once that run has ended (its lock went with its process), the folder can be continued.
    cli = lightning_cli(fit_args(tiny_qwen, tmp_path, 5, "--ckpt_path", "last"))
    assert cli.trainer.global_step == 5 and cli.trainer.log_dir == str(run)
