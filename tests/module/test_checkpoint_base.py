"""A checkpoint records its base model and fine-tuning mode; loading it onto another base is an error."""

import logging
import shutil

import pytest
import torch

from cli import lightning_cli
from cppo_lightning.checkpoint_base import BaseMismatchError, base_record, check_base, weights_fingerprint
from cppo_lightning.models import PolicyConfig, build_tiny_vlm
from cppo_lightning.module import CPPOModule
from helpers import demo_args


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """The same tiny architecture with other weights (seed 1): LoRA keys identical, weights not."""
    return build_tiny_vlm(tmp_path_factory.mktemp("other-base"), "qwen2_5_vl", "smoke", seed=1)


@pytest.fixture(scope="module")
def trained(tiny_qwen, tmp_path_factory):
    """A one-step LoRA run on a copy of the tiny model (as the demo trains on its warm-start folder)."""
    root = tmp_path_factory.mktemp("base-run")
    warm = root / "warmstart"
    shutil.copytree(tiny_qwen, warm)
    lightning_cli(demo_args("grpo", warm, root, 1))
    return warm, root / "grpo" / "version_0"


def test_the_fingerprint_follows_the_weights_not_the_name(tiny_qwen, other_base, tmp_path):
    copy = shutil.copytree(tiny_qwen, tmp_path / "copy")
    assert weights_fingerprint(str(copy)) == weights_fingerprint(str(tiny_qwen))
    assert weights_fingerprint(str(other_base)) != weights_fingerprint(str(tiny_qwen))
    assert weights_fingerprint(str(tmp_path / "nowhere")) is None


def test_the_checkpoint_records_its_base(trained):
    warm, run = trained
    record = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["cppo"]["base"]
    assert record == {
        "model_name_or_path": str(warm),
        "revision": None,
        "fingerprint": weights_fingerprint(str(warm)),
        "finetuning": "lora",
    }


def test_loading_onto_another_base_is_an_error_naming_both(trained, other_base, caplog):
    warm, run = trained
    checkpoint = run / "checkpoints" / "last.ckpt"
    with pytest.raises(BaseMismatchError) as raised:
        CPPOModule.load_from_checkpoint(checkpoint, policy=PolicyConfig(str(other_base)))
    message = str(raised.value)
    assert f"trained on '{warm}' (weights {weights_fingerprint(str(warm))}, lora)" in message
    assert f"the policy is '{other_base}' (weights {weights_fingerprint(str(other_base))}, lora)" in message
    assert "allow_base_mismatch" in message
    # The explicit flag loads it, with a warning naming both.
    with caplog.at_level(logging.WARNING, logger="cppo_lightning.checkpoint_base"):
        module = CPPOModule.load_from_checkpoint(
            checkpoint, policy=PolicyConfig(str(other_base)), allow_base_mismatch=True
        )
    assert module.policy_config.model_name_or_path == str(other_base)
    assert "allow_base_mismatch" in caplog.text and str(warm) in caplog.text


def test_validate_after_the_base_folder_was_rewritten_is_refused(trained, other_base, tmp_path):
    # `make demo` with a changed warm-start config rewrites the warm-start folder under the same name:
    # the RL checkpoints trained on the old one no longer fit it.
    warm, run = trained
    rewritten = shutil.copytree(warm, tmp_path / "warmstart")
    shutil.copy(other_base / "model.safetensors", rewritten / "model.safetensors")
    args = ["validate", "--config", str(run / "config.yaml")]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path / "eval")]
    args += ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
    shutil.move(warm, tmp_path / "original")
    shutil.move(rewritten, warm)
    try:
        with pytest.raises(BaseMismatchError, match="other base weights"):
            lightning_cli(args)
    finally:
        shutil.rmtree(warm)
        shutil.move(tmp_path / "original", warm)


@pytest.mark.parametrize(
    ("saved", "current", "problem"),
    [
        (("a", "f1", "lora"), ("a", "f1", "lora"), None),
        (("a", "f1", "lora"), ("b", "f1", "lora"), None),  # a copy elsewhere: the same weights
        (("a", "f1", "qlora"), ("a", "f1", "lora"), None),  # QLoRA adapters on the unquantized base
        (("a", "f1", "lora"), ("a", "f2", "lora"), "other base weights"),
        (("a", None, "lora"), ("b", None, "lora"), "another base model"),  # no fingerprint: names decide
        (("a", "f1", "lora"), ("a", "f1", "full"), "another fine-tuning mode"),
    ],
)
def test_what_counts_as_another_base(saved, current, problem):
    def record(name, fingerprint, finetuning):
        return {"model_name_or_path": name, "fingerprint": fingerprint, "finetuning": finetuning}

    if problem is None:
        check_base(record(*saved), record(*current))
    else:
        with pytest.raises(BaseMismatchError, match=problem):
            check_base(record(*saved), record(*current))


def test_base_record_is_plain_data(tiny_qwen):
    record = base_record(str(tiny_qwen), "qlora")
    assert set(map(type, record.values())) <= {str, type(None)}


def test_another_base_on_the_command_line_is_refused_when_resuming(trained, other_base, tmp_path):
    # `cppo fit ... --model.policy.model_name_or_path OTHER --ckpt_path RUN/last.ckpt` (issue 22): the
    # command line's base is the one loaded, so the base check sees it and refuses.
    warm, run = trained
    args = demo_args("grpo", other_base, tmp_path, 2, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    with pytest.raises(BaseMismatchError) as raised:
        lightning_cli(args)
    assert f"trained on '{warm}'" in str(raised.value) and f"the policy is '{other_base}'" in str(
        raised.value
    )
