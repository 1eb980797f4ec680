"""FSDP2 through Lightning's ModelParallelStrategy: two CPU processes (gloo) through the real `cppo fit`.

Every run is CPPO on the tiny Qwen2.5-VL for two RL steps (one optimizer step each), 2 prompts x G=4 per
rank; the FSDP2 runs are compared with DDP runs of the same seeds and data (both strategies hand each rank
the same prompts and seed its sampling by rank, so they see the same rollouts).
"""

import csv
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from callbacks.checkpointing import latest_checkpoint
from cli import lightning_cli
from cli import main as cppo_main
from cppo_lightning.export import checkpoint_state_dict
from cppo_lightning.module import CPPOModule
from cppo_lightning.sharding import check_strategy, shard_units
from helpers import ROOT, VARIED_REWARD, demo_args, encode

FSDP2 = [
    "--trainer.strategy",
    "lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size",
    "2",
    "--trainer.strategy.tensor_parallel_size",
    "1",
]
DDP = ["--trainer.strategy", "ddp"]
CALLBACKS = [
    {"class_path": "callbacks.AtomicCheckpoint", "init_args": {"save_last": True, "every_n_train_steps": 50}},
    {"class_path": "callbacks.AdapterExport"},
    {"class_path": "callbacks.PreemptionCheckpoint"},
]
# SIGTERM in the middle of the first RL step (between its rollout and its optimizer step), on both ranks.
SIGTERM_IN_STEP_0 = [{"class_path": "helpers.SignalAtStep", "init_args": {"step": 0, "signum": 15}}]


def start_fit(model, save_dir, strategy, *extra, callbacks=CALLBACKS):
    """Start a two-process `cppo fit` (its output goes to files in ``save_dir``); :func:`finish` waits for it."""
    args = demo_args(
        "cppo",
        model,
        save_dir,
        2,
        *strategy,
        "--trainer.devices",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.callbacks",
        json.dumps(callbacks),
        *VARIED_REWARD,
        *extra,
    )
    with socket.socket() as probe:  # a port of its own: two launches may run at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # One thread per process: the ranks share the two cores.
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        OMP_NUM_THREADS="1",
        MASTER_PORT=str(port),
    )
    executable = os.path.join(os.path.dirname(sys.executable), "cppo")
    name = f"launch-{len(list(save_dir.glob('launch-*.out')))}"
    stdout, stderr = open(save_dir / f"{name}.out", "w"), open(save_dir / f"{name}.err", "w")
    process = subprocess.Popen(
        [executable, *args], stdout=stdout, stderr=stderr, text=True, cwd=save_dir, env=env
    )
    process.outputs = (stdout, stderr)
    return process


def finish(process):
    """Wait for a launch; returns ``(returncode, stdout, stderr)``."""
    returncode = process.wait(timeout=600)
    texts = []
    for handle in process.outputs:
        handle.close()
        texts.append(open(handle.name).read())
    return returncode, *texts


def cppo_fit(model, save_dir, strategy, *extra, callbacks=CALLBACKS):
    return finish(start_fit(model, save_dir, strategy, *extra, callbacks=callbacks))


def run_folder(save_dir):
    return save_dir / "cppo" / "version_0"


def final_state(save_dir):
    """The trained tensors of the run's last checkpoint (a sharded folder or a file), in this process."""
    return checkpoint_state_dict(run_folder(save_dir) / "checkpoints" / "last.ckpt")[1]


def logged(save_dir, key):
    with open(run_folder(save_dir) / "metrics.csv") as handle:
        return [float(row[key]) for row in csv.DictReader(handle) if row.get(key)]


def greedy(model, processor):
    inputs = encode(processor, ["How many shapes?", "What colour is the shape?"])
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    return out[:, inputs["input_ids"].shape[1] :]


def trained_module(save_dir):
    """The module of a run as it ended (from its last checkpoint), with its policy loaded."""
    metadata, state = checkpoint_state_dict(run_folder(save_dir) / "checkpoints" / "last.ckpt")
    module = CPPOModule(**metadata["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(state, strict=False)
    return module


def check_export(save_dir, reference_dir, output):
    """`cppo export` of the run's sharded checkpoint: a plain transformers folder with the trained weights,
    generating the greedy tokens of the module trained by the reference run."""
    from transformers import AutoModelForImageTextToText

    assert cppo_main(["export", str(run_folder(save_dir) / "checkpoints" / "last.ckpt"), str(output)]) == 0
    exported = AutoModelForImageTextToText.from_pretrained(output).eval()
    module = trained_module(reference_dir)
    processor = module.policy.processor
    expected = greedy(module.policy.model.eval(), processor)
    assert torch.equal(greedy(exported, processor), expected)


@pytest.mark.slow
def test_lora_under_fsdp2_resumes_after_sigterm_to_the_ddp_run_bit_for_bit(tiny_qwen, tmp_path):
    sharded, ddp = tmp_path / "fsdp2", tmp_path / "ddp"
    sharded.mkdir(), ddp.mkdir()

    # The DDP run (the reference) alongside the interrupted FSDP2 run.
    reference = start_fit(tiny_qwen, ddp, DDP)
    returncode, _, stderr = cppo_fit(tiny_qwen, sharded, FSDP2, callbacks=CALLBACKS + SIGTERM_IN_STEP_0)
    assert returncode == 143, stderr[-4000:]  # 128 + SIGTERM
    checkpoint = run_folder(sharded) / "checkpoints" / "last.ckpt"
    # A sharded checkpoint: one shard per rank, the index and Lightning's metadata; found to resume at step 1.
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
    ]
    assert latest_checkpoint(checkpoint.parent).checkpoint.step == 1

    returncode, stdout, stderr = cppo_fit(tiny_qwen, sharded, FSDP2, "--ckpt_path", "last")
    assert returncode == 0, stderr[-4000:]
    assert "from last.ckpt (global step 1)" in stdout
    returncode, _, stderr = finish(reference)
    assert returncode == 0, stderr[-4000:]

    # On two ranks every gradient reduction is one addition, and the gradient norms stay under the clip
    # threshold, so FSDP2 and DDP compute the same bits: the interrupted, resumed FSDP2 run ends with
    # exactly the DDP run's adapters (a resume that lost or changed anything would not).
    final, expected = final_state(sharded), final_state(ddp)
    assert final.keys() == expected.keys() and len(final) == 28  # A and B of 14 adapted projections
    assert all(torch.equal(final[key], expected[key]) for key in final)
    assert any(value.abs().sum() > 0 for key, value in final.items() if "lora_B" in key)  # it trained
    # The global gradient norm over both ranks' shards is DDP's, at both steps.
    assert logged(sharded, "train/grad_norm") == pytest.approx(logged(ddp, "train/grad_norm"), rel=1e-6)
    assert len(logged(sharded, "train/grad_norm")) == 2
    # The adapter written beside the checkpoint (gathered from the shards) is DDP's.
    from safetensors.torch import load_file

    adapters = [
        load_file(run_folder(run) / "checkpoints" / "adapter" / "adapter_model.safetensors")
        for run in (sharded, ddp)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][key], adapters[1][key]) for key in adapters[0])

    check_export(sharded, ddp, tmp_path / "merged")


@pytest.mark.slow
def test_full_finetuning_under_fsdp2_equals_ddp_and_exports(tiny_qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    sharded, ddp = tmp_path / "fsdp2", tmp_path / "ddp"
    sharded.mkdir(), ddp.mkdir()
    # The FSDP2 run with gradient checkpointing, as the release recipes: recomputing each layer in backward
    # gathers its shards again, and must not change a thing.
    checkpointing = ["--model.policy.gradient_checkpointing", "true"]
    launches = [
        start_fit(tiny_qwen, save_dir, strategy, "--model.policy.finetuning", "full")
        for save_dir, strategy in ((sharded, FSDP2 + checkpointing), (ddp, DDP))
    ]
    for launch in launches:
        returncode, _, stderr = finish(launch)
        assert returncode == 0, stderr[-4000:]

    # Every parameter (the reference copy, sharded too, is not checkpointed), to 1e-5 of the update.
    final, expected = final_state(sharded), final_state(ddp)
    loaded = AutoModelForImageTextToText.from_pretrained(tiny_qwen).state_dict()
    base = {f"policy.model.{key}": value for key, value in loaded.items()}
    assert final.keys() == expected.keys() and final.keys() <= base.keys()
    difference = sum(((final[k].double() - expected[k].double()) ** 2).sum() for k in final) ** 0.5
    update = sum(((expected[k].double() - base[k].double()) ** 2).sum() for k in final) ** 0.5
    assert update > 1e-3 and difference < 1e-5 * update
    assert logged(sharded, "train/grad_norm") == pytest.approx(logged(ddp, "train/grad_norm"), rel=1e-5)

    check_export(sharded, ddp, tmp_path / "exported")


def test_a_config_with_fsdp1_fails_at_start_up_naming_the_fsdp2_config(tiny_qwen, tmp_path, capsys):
    args = demo_args(
        "cppo", tiny_qwen, tmp_path, 1, "--trainer.strategy", "lightning.pytorch.strategies.FSDPStrategy"
    )
    with pytest.raises(SystemExit) as stopped:
        lightning_cli(args)
    message = str(stopped.value.code)
    assert "FSDPStrategy (FSDP1) is not supported" in message
    assert "several forwards" in message and "configs/qwen2_5_vl_7b/full_cppo_fsdp.yaml" in message
    assert "tensor_parallel_size: 1" in message
    assert not (tmp_path / "cppo").exists()  # nothing ran


def test_qlora_and_tensor_parallelism_are_refused_under_fsdp2():
    with pytest.raises(ValueError, match="QLoRA under ModelParallelStrategy.*use strategy: ddp"):
        check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "qlora")
    # Lightning's default sizes ("auto") mean tensor parallelism across the node's devices.
    with pytest.raises(ValueError, match="tensor_parallel_size: 1"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), "lora")
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), "full")


def test_the_units_are_each_decoder_layer_and_vision_block(tiny_qwen):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen)
    names = {id(module): name for name, module in model.named_modules()}
    units = [names[id(module)] for module in shard_units(model)]
    text, vision = model.config.text_config.num_hidden_layers, model.config.vision_config.depth
    assert units == [f"model.visual.blocks.{i}" for i in range(vision)] + [
        f"model.language_model.layers.{i}" for i in range(text)
    ]
