"""The command line: every shipped config validates, in-process fit/validate/test, the real `cppo` command."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from callbacks import CPLDirectionMonitor
from cli import lightning_cli, main, warmstart_cli
from cppo_lightning.module import CPPOModule
from cppo_lightning.objectives import CPPO, GRPO, PAPO
from cppo_lightning.warmstart import WarmStartModule
from datamodules import Benchmark, BenchmarkDataModule, VisualQADataModule
from datamodules.benchmarks import PAPER_BENCHMARKS
from helpers import ROOT, VARIED_REWARD, demo_args

# configs/audit/ holds candidate transforms for `cppo audit`, not LightningCLI configs (tests/test_audit.py).
CONFIGS = sorted(path for path in (ROOT / "configs").rglob("*.yaml") if path.parent.name != "audit")


def read_metrics(save_dir):
    (path,) = list(save_dir.rglob("metrics.csv"))
    with open(path) as handle:
        return list(csv.DictReader(handle))


def last_value(rows, key):
    values = [float(row[key]) for row in rows if row.get(key) not in (None, "")]
    return values[-1] if values else None


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_validates(config):
    # GPU configs are parsed and instantiated on the CPU (nothing is loaded until fit).
    args = [
        "--config",
        str(config),
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "1",
        "--trainer.precision",
        "32-true",
        "--trainer.strategy",
        "auto",
        "--trainer.logger",
        "false",
    ]
    if config.parent.name == "eval":
        check_evaluation_config(config, args)
        return
    if config.stem == "warmstart":
        cli = warmstart_cli(args, run=False)
        assert isinstance(cli.model, WarmStartModule) and cli.model.policy_config.finetuning == "full"
        assert cli.datamodule.processor_name_or_path == cli.model.policy_config.model_name_or_path
        assert cli.datamodule.views == ("original",)
        return
    cli = lightning_cli(args, run=False)
    assert isinstance(cli.model, CPPOModule) and isinstance(cli.datamodule, VisualQADataModule)
    objective = type(cli.model.objective)
    assert objective in (CPPO, GRPO, PAPO)
    assert objective.__name__.lower() in config.stem
    # The data's processor follows the policy.
    assert cli.datamodule.processor_name_or_path == cli.model.policy_config.model_name_or_path
    assert cli.model.rollout_config.samples_per_prompt == 5 and cli.model.rollout_config.temperature == 1.0
    if "qlora" in config.stem:
        assert cli.model.policy_config.finetuning == "qlora"
    if config.parent.name == "release":
        check_release_recipe(config, cli)


def check_evaluation_config(config, args):
    """configs/eval: the protocol alone, or the protocol with one benchmark, as `cppo test` reads them."""
    protocol = ROOT / "configs" / "eval" / "protocol.yaml"
    files = ["--config", str(protocol)] + ([] if config == protocol else ["--config", str(config)])
    cli = lightning_cli(files + args[2:], run=False)
    assert isinstance(cli.datamodule, BenchmarkDataModule)
    evaluation = cli.model.evaluation
    assert (evaluation.samples_per_question, evaluation.temperature, evaluation.top_p) == (8, 1.0, 1.0)
    assert evaluation.reward == "cppo_lightning.rewards.choice_accuracy_reward"
    assert not cli.model.objective.needs_reference  # nothing is trained: no reference copy is loaded
    if config != protocol:
        (benchmark,) = cli.datamodule.benchmarks
        assert isinstance(benchmark, Benchmark) and benchmark.name in PAPER_BENCHMARKS


def check_release_recipe(config, cli):
    """configs/release: the release's schedule on 8 GPUs (the test runs them on one CPU device)."""
    raw = yaml.safe_load(config.read_text())
    gpus = raw["trainer"]["devices"] * raw["trainer"]["num_nodes"]
    assert gpus == 8 and raw["trainer"]["max_epochs"] == 2
    # FSDP2 over the 8 GPUs (Lightning's FSDP1 strategy is refused at start-up).
    strategy = raw["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert strategy["init_args"] == {"data_parallel_size": gpus, "tensor_parallel_size": 1}
    assert cli.model.policy_config.finetuning == "full"
    assert gpus * cli.datamodule.batch_size == 512  # prompts per rollout batch
    assert gpus * cli.model.update_config.mini_batch_prompts == 64  # prompts per optimizer step
    assert cli.model.rollout_config.max_new_tokens == 4096
    assert raw["model"]["optimizer"]["init_args"]["lr"] == 1e-6
    assert cli.datamodule.train_source.path == "TIGER-Lab/ViRL39K"


def test_unknown_config_key_is_rejected(capsys):
    with pytest.raises(SystemExit):
        lightning_cli(
            ["fit", "--config", str(CONFIGS[0]), "--model.rollout.samples_per_promt", "4"], run=False
        )
    assert "samples_per_promt" in capsys.readouterr().err


def assert_logged_loss_adds_up(rows, objective):
    """The logged total is the logged terms weighted as the config says (on every step)."""
    weights = {"cppo": ("train/cpl", 0.01), "papo": ("train/implicit_perception_loss", 0.02)}
    steps = [row for row in rows if row.get("train/loss") not in (None, "")]
    assert steps
    for row in steps:
        total = float(row["train/policy_loss"]) + 0.01 * float(row["train/kl"])
        if objective in weights:
            name, weight = weights[objective]
            total += weight * float(row[name])
        assert float(row["train/loss"]) == pytest.approx(total, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("objective", ["grpo", "cppo", "papo"])
def test_fit_each_objective_in_process(objective, tiny_qwen, tmp_path):
    cli = lightning_cli([*demo_args(objective, tiny_qwen, tmp_path, 2), *VARIED_REWARD])
    module = cli.model
    assert cli.trainer.global_step == 2
    rows = read_metrics(tmp_path)
    # varied_reward gives len % 3 in {0, 1, 2}; avg@2 grades with the accuracy reward, in [0, 1].
    assert 0.0 <= last_value(rows, "train/reward_mean") <= 2.0
    assert 0.0 <= last_value(rows, "val/avg@2") <= 1.0
    assert_logged_loss_adds_up(rows, objective)
    assert last_value(rows, "train/kl") >= 0.0  # k3 is non-negative
    if objective == "cppo":
        # Some rows have A > 0, so perception tokens exist; the CPL is a mean of softplus values.
        assert 0.0 < last_value(rows, "train/perception_fraction") <= 1.0
        assert last_value(rows, "train/cpl") > 0.0
        assert module.last_rollout.perception_mask.any()
        assert set(module.last_rollout.batch.views) == {"original", "preserving", "removing"}
        assert 0.0 <= last_value(rows, "train/cpl_direction") <= 1.0
        # The demo config's CPLDirectionMonitor reads what the module logs: it counted every step that
        # had perception tokens (its window of 10 is not reached in 2 steps, so no verdict yet).
        (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, CPLDirectionMonitor)]
        counted = sum(float(row.get("train/perception_fraction") or 0) > 0 for row in rows)
        assert counted > 0 and monitor.state_dict()["steps"] == counted and monitor.summary is None
    if objective == "papo":
        assert last_value(rows, "train/implicit_perception_loss") <= 0.0  # minus a k3 divergence
        assert set(module.last_rollout.batch.views) == {"original", "masked"}
    if objective == "grpo":
        assert module.last_rollout.batch.views == ("original",)
        assert "train/cpl" not in rows[-1]
    # The resolved config, the checkpoint and the PEFT adapter with its processor are in the run folder.
    run = next(tmp_path.rglob("config.yaml")).parent
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "checkpoints" / "adapter" / "adapter_config.json").exists()
    assert (run / "checkpoints" / "adapter" / "tokenizer.json").exists()


def test_cppo_on_the_second_architecture(tiny_llava, tmp_path):
    cli = lightning_cli([*demo_args("cppo", tiny_llava, tmp_path, 2), *VARIED_REWARD])
    assert cli.trainer.global_step == 2
    assert type(cli.model.policy.unwrapped()).__name__ == "LlavaForConditionalGeneration"
    rows = read_metrics(tmp_path)
    assert_logged_loss_adds_up(rows, "cppo")
    assert 0.0 < last_value(rows, "train/perception_fraction") <= 1.0
    mask = cli.model.last_rollout.perception_mask
    assert mask.any() and not mask[cli.model.last_rollout.advantages <= 0].any()


def test_qlora_fit_for_a_couple_of_steps(tiny_qwen, tmp_path):
    cli = lightning_cli(
        demo_args(
            "cppo",
            tiny_qwen,
            tmp_path,
            2,
            "--model.policy.finetuning",
            "qlora",
            "--model.policy.bnb_4bit_compute_dtype",
            "float32",
        )
    )
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in cli.model.policy.model.modules())
    assert cli.trainer.global_step == 2
    assert all(torch.isfinite(p).all() for p in cli.model.policy.trainable_parameters())


def test_full_finetuning_uses_a_frozen_reference(tiny_qwen, tmp_path):
    cli = lightning_cli(
        demo_args(
            "grpo",
            tiny_qwen,
            tmp_path,
            2,
            "--model.policy.finetuning",
            "full",
            "--model.optimizer.init_args.lr",
            "1e-3",
            *VARIED_REWARD,
        )
    )
    policy = cli.model.policy
    assert policy.reference_mode == "frozen_copy" and cli.model.reference_forwards > 0
    trained = dict(policy.model.named_parameters())
    frozen = dict(policy.reference_model.named_parameters())
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained[name], frozen[name])
    assert not any(p.requires_grad for p in frozen.values())
    # The Lightning checkpoint holds the trained weights, not the frozen copy.
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=False)
    assert f"policy.model.{name}" in checkpoint["state_dict"]
    assert not any(key.startswith("policy.reference_model.") for key in checkpoint["state_dict"])


def test_zero_kl_weight_never_runs_the_reference(tiny_qwen, tmp_path):
    cli = lightning_cli(demo_args("cppo", tiny_qwen, tmp_path, 2, "--model.objective.init_args.beta", "0"))
    assert cli.model.policy.reference_mode is None
    assert cli.model.reference_forwards == 0
    assert last_value(read_metrics(tmp_path), "train/kl") is None


def test_validate_and_test_report_avg_at_k(tiny_qwen, tmp_path):
    cli = lightning_cli(demo_args("grpo", tiny_qwen, tmp_path, 2))
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    args = demo_args("grpo", tiny_qwen, tmp_path / "eval", 2)
    args[0] = "validate"
    validate = lightning_cli(args + ["--ckpt_path", str(checkpoint)])
    assert "val/avg@2" in validate.trainer.callback_metrics
    args[0] = "test"
    tested = lightning_cli(args + ["--ckpt_path", str(checkpoint)])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/avg@2"]) <= 1.0
    # The adapter restored from the checkpoint is the trained one.
    trained = {n: p for n, p in cli.model.policy.model.named_parameters() if p.requires_grad}
    restored = dict(tested.model.policy.model.named_parameters())
    assert all(torch.equal(value, restored[name]) for name, value in trained.items())


def test_export_merges_the_adapter_into_a_plain_transformers_model(tiny_qwen, tmp_path):
    from transformers import AutoModelForImageTextToText

    from cppo_lightning.models.scoring import completion_logits
    from helpers import encode

    cli = lightning_cli(
        demo_args("grpo", tiny_qwen, tmp_path, 2, "--model.optimizer.init_args.lr", "5e-2", *VARIED_REWARD)
    )
    adapter = next(tmp_path.rglob("adapter_config.json")).parent
    assert main(["export", str(adapter), str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    policy = cli.model.policy
    inputs = encode(policy.processor, ["How many red shapes?"])
    completion = torch.randint(20, 200, (1, 5))
    mask = torch.ones_like(completion, dtype=torch.bool)
    policy.model.eval()
    with torch.no_grad():
        expected = completion_logits(policy.model, inputs, completion, mask)
        with policy.reference() as base:
            base_logits = completion_logits(base, inputs, completion, mask)
        assert torch.allclose(completion_logits(merged, inputs, completion, mask), expected, atol=1e-4)
    assert not torch.allclose(base_logits, expected, atol=1e-4)  # the adapter mattered


def test_the_real_cppo_command(tiny_qwen, tmp_path):
    """`cppo fit --config configs/demo/cppo.yaml` as a user types it (the console script)."""
    executable = os.path.join(os.path.dirname(sys.executable), "cppo")
    result = subprocess.run(
        [executable, *demo_args("cppo", tiny_qwen, tmp_path, 2)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_value(read_metrics(tmp_path), "train/cpl") is not None
    assert (
        next(tmp_path.rglob("config.yaml")).read_text().count("class_path: cppo_lightning.objectives.CPPO")
        == 1
    )


def test_checkpoint_hyperparameters_are_plain_data(tiny_qwen, tmp_path):
    lightning_cli(demo_args("cppo", tiny_qwen, tmp_path, 1, "--model.objective.init_args.tau", "0.2"))
    path = next(tmp_path.rglob("last.ckpt"))
    checkpoint = torch.load(path, weights_only=True)  # no pickled classes: safe to load
    assert checkpoint["hyper_parameters"]["objective"]["init_args"]["tau"] == 0.2
    module = CPPOModule.load_from_checkpoint(path)
    assert isinstance(module.objective, CPPO) and module.objective.tau == 0.2
    assert module.policy_config.model_name_or_path == str(tiny_qwen)
    assert module.rewards.specification() == {
        "cppo_lightning.rewards.accuracy_reward": 0.9,
        "cppo_lightning.rewards.format_reward": 0.1,
    }


def test_demo_configs_train_on_the_task_the_warm_start_learned():
    import yaml

    def task(name):
        return yaml.safe_load((ROOT / "configs" / "demo" / f"{name}.yaml").read_text())["data"]["init_args"][
            "task"
        ]

    assert task("cppo") == task("grpo") == task("papo") == task("warmstart")


def test_cppo_help_lists_every_command(capsys):
    from cli import _COMMANDS

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.split("commands:\n")[1].splitlines() if line.strip()}
    assert listed == {"fit", "validate", "test", *_COMMANDS}
    assert {"demo", "evaluate", "audit", "export", "plot", "tiny", "predict"} <= listed


def test_cppo_predict_writes_sampled_answers_as_jsonl(tiny_qwen, tmp_path, capsys):
    lightning_cli(demo_args("grpo", tiny_qwen, tmp_path, 1, "--trainer.limit_val_batches", "0"))
    run = tmp_path / "grpo" / "version_0"
    args = [
        "predict",
        "--config",
        str(run / "config.yaml"),
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
    ]
    assert main([*args, "--output", str(tmp_path / "answers")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "answers" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4  # test_size 4, one line per question
    assert all(len(line["completions"]) == 2 and len(line["grades"]) == 2 for line in lines)  # k = 2
    assert {"id", "question", "answer", "extracted"} <= set(lines[0])
    assert f"{tmp_path / 'answers' / 'samples.jsonl'}: 4 questions" in capsys.readouterr().out
    # Lightning's own predict (which needs a forward the module does not have) is not offered.
    with pytest.raises(SystemExit):
        lightning_cli(["predict", "--config", str(run / "config.yaml")])
