"""Checkpoints that are complete or absent; the adapter export only after a complete checkpoint;
SIGTERM/SIGINT save at the step boundary and exit with 128 + signal."""

import csv
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from callbacks.checkpointing import checkpoint_problem, latest_checkpoint
from cli import lightning_cli
from helpers import ROOT, TRAINING_CONFIGS, VARIED_REWARD, demo_args

CALLBACKS = [
    {"class_path": "callbacks.AtomicCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 1}},
    {"class_path": "callbacks.AdapterExport"},
    {"class_path": "callbacks.PreemptionCheckpoint"},
]


def fit_args(model, save_dir, steps, callbacks=CALLBACKS, *extra):
    return demo_args(
        "grpo", model, save_dir, steps, "--trainer.callbacks", json.dumps(callbacks), *VARIED_REWARD, *extra
    )


def adapter_matches(adapter_folder, checkpoint):
    """Whether the exported PEFT adapter holds exactly the LoRA weights of a Lightning checkpoint."""
    exported = load_file(adapter_folder / "adapter_model.safetensors")
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    lora = {key: value for key, value in state.items() if "lora_" in key}
    # PEFT drops the adapter name ("lora_A.default.weight" -> "lora_A.weight") and the module prefix.
    by_suffix = {
        key.replace(".default", "").split("base_model.model.")[-1]: value for key, value in lora.items()
    }
    return len(exported) == len(lora) and all(
        torch.equal(value, by_suffix[key.split("base_model.model.")[-1]]) for key, value in exported.items()
    )


def test_complete_checkpoints_are_recognised_and_truncated_ones_named(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"global_step": 7, "epoch": 0, "weights": torch.ones(1000)}, path)
    assert checkpoint_problem(path) is None
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 10):
        (tmp_path / "cut.ckpt").write_bytes(data[:cut])
        assert "truncated" in checkpoint_problem(tmp_path / "cut.ckpt")
    # The newest complete one is chosen by step; the cut one is reported, never chosen.
    torch.save({"global_step": 3, "epoch": 0}, tmp_path / "b.ckpt")
    found = latest_checkpoint(tmp_path)
    assert found.checkpoint.path == path and found.checkpoint.step == 7
    assert [c.path.name for c in found.passed_over] == ["cut.ckpt"]


def test_a_checkpoint_write_that_fails_part_way_leaves_the_previous_one_and_its_adapter(
    tiny_qwen, tmp_path, monkeypatch
):
    import lightning.fabric.plugins.io.torch_io as torch_io

    written = []

    def disk_fills_up(checkpoint, filepath):
        # The third file (step 2's): half of it reaches the disk, then ENOSPC.
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        written.append(filepath)
        with open(filepath, "wb") as handle:
            if len(written) == 3:
                handle.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            handle.write(data)

    monkeypatch.setattr(torch_io, "_atomic_save", disk_fills_up)
    with pytest.raises(OSError, match="No space left"):
        lightning_cli(fit_args(tiny_qwen, tmp_path, 3))
    folder = tmp_path / "grpo" / "version_0" / "checkpoints"
    # Written beside the target (same file system), never under the final name, and cleaned up.
    assert all(
        os.path.dirname(path) == str(folder) and os.path.basename(path).startswith(".") for path in written
    )
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "epoch=0-step=1.ckpt", "last.ckpt"]
    assert checkpoint_problem(folder / "last.ckpt") is None
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1
    # The adapter was not updated for the step whose checkpoint failed.
    assert adapter_matches(folder / "adapter", folder / "last.ckpt")


def test_ctrl_c_mid_step_finishes_the_step_saves_and_exits_130(tiny_qwen, tmp_path):
    callbacks = [
        *CALLBACKS[1:],
        {"class_path": "helpers.SignalAtStep", "init_args": {"step": 1, "signum": 2}},
    ]
    callbacks.insert(
        0,
        {
            "class_path": "callbacks.AtomicCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 50},
        },
    )
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exited:
        lightning_cli(fit_args(tiny_qwen, tmp_path, 5, callbacks))
    assert exited.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    run = tmp_path / "grpo" / "version_0"
    # No periodic checkpoint was due: this one is the preemption's, of the completed step 2.
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    with open(run / "metrics.csv") as handle:
        steps = [row["step"] for row in csv.DictReader(handle) if row.get("train/loss")]
    assert steps == ["0", "1"]  # the saved step's metrics row is there
    assert adapter_matches(run / "checkpoints" / "adapter", run / "checkpoints" / "last.ckpt")


def test_sigterm_during_validation_stops_it_and_saves(tiny_qwen, tmp_path, capsys):
    from helpers import SignalDuringValidation

    # Validation after step 2 over 4 batches; SIGTERM arrives after its first batch.
    callbacks = [*CALLBACKS, {"class_path": "helpers.SignalDuringValidation", "init_args": {"batch": 0}}]
    args = fit_args(tiny_qwen, tmp_path, 4, callbacks, "--trainer.val_check_interval", "2")
    args += ["--trainer.limit_val_batches", "4", "--data.init_args.val_size", "8"]
    args += ["--data.init_args.eval_batch_size", "2"]
    with pytest.raises(SystemExit) as exited:
        lightning_cli(args)
    assert exited.value.code == 128 + signal.SIGTERM
    assert SignalDuringValidation.ran == [0]  # the other three batches were not run
    run = tmp_path / "grpo" / "version_0"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert "SIGTERM: validation stopped after 1 batches; its metrics at global step 2 are not logged" in (
        capsys.readouterr().err
    )
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert not any(row.get("val/avg@2") for row in rows)  # no partial validation logged as a whole one
    assert [row["step"] for row in rows if row.get("train/loss")] == ["0", "1"]


def test_a_second_ctrl_c_stops_at_once_with_status_130(tiny_qwen, tmp_path):
    callbacks = [
        {
            "class_path": "callbacks.AtomicCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 50},
        },
        {"class_path": "callbacks.PreemptionCheckpoint"},
        {"class_path": "helpers.SignalAtStep", "init_args": {"step": 1, "signum": 2, "times": 2}},
    ]
    with pytest.raises(SystemExit) as exited:
        lightning_cli(fit_args(tiny_qwen, tmp_path, 5, callbacks))
    assert exited.value.code == 130  # a shell's "interrupted", not Lightning's status 1
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped without saving


def test_the_real_cppo_fit_sent_sigterm_saves_a_resumable_checkpoint_and_exits_143(tiny_qwen, tmp_path):
    """A scheduler's preemption of `cppo fit --config configs/demo/cppo.yaml` (its shipped callbacks)."""
    executable = os.path.join(os.path.dirname(sys.executable), "cppo")
    process = subprocess.Popen(
        [executable, *demo_args("cppo", tiny_qwen, tmp_path, 200, "--trainer.val_check_interval", "4")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "cppo" / "version_0" / "metrics.csv"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)  # at some point of the next step(s)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "received SIGTERM" in stderr and "saved" in stderr
    checkpoint = metrics.parent / "checkpoints" / "last.ckpt"
    assert checkpoint_problem(checkpoint) is None
    state = torch.load(checkpoint, weights_only=True)
    with open(metrics) as handle:
        trained = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    # The checkpoint is of the last step whose metrics were logged: nothing done is lost.
    assert state["global_step"] == len(trained) >= 1
    assert (metrics.parent / "checkpoints" / "adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_saves_on_preemption_and_writes_atomically(config):
    trainer = yaml.safe_load(config.read_text())["trainer"]
    classes = [callback["class_path"] for callback in trainer.get("callbacks", [])]
    assert "callbacks.PreemptionCheckpoint" in classes
    assert "lightning.pytorch.callbacks.ModelCheckpoint" not in classes
    if trainer.get("enable_checkpointing", True):
        assert "callbacks.AtomicCheckpoint" in classes
    # Metrics reach the disk every step: a killed run keeps the rows of every step it finished.
    assert trainer["logger"]["init_args"]["flush_logs_every_n_steps"] == 1
