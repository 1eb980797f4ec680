"""CPPOModule in other people's projects, resume, avg@k, and what bad input gets."""

import logging

import lightning.pytorch as pl
import pytest
import torch

from cppo_lightning.module import EvaluationConfig, UpdateConfig
from cppo_lightning.objectives import GRPO
from cppo_lightning.sampling import RolloutConfig
from datamodules import SyntheticTaskConfig, SyntheticVQADataModule
from helpers import HandWrittenDataModule, quiet_trainer, small_module

trainer = quiet_trainer


def adapter_state(module):
    return {n: p.detach().clone() for n, p in module.policy.model.named_parameters() if p.requires_grad}


def small_data(tiny_qwen, train_size, val_size=0, **kwargs):
    """The synthetic task at 112 px in batches of 2 prompts, no test split."""
    return SyntheticVQADataModule(
        task=SyntheticTaskConfig(image_size=112),
        train_size=train_size,
        val_size=val_size,
        test_size=0,
        batch_size=2,
        processor_name_or_path=str(tiny_qwen),
        **kwargs,
    )


def test_plugs_into_a_plain_trainer_with_a_foreign_datamodule(tiny_qwen):
    module = small_module(tiny_qwen, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    datamodule = HandWrittenDataModule(tiny_qwen)
    module.configure_model()
    before = adapter_state(module)
    trainer(3).fit(module, datamodule=datamodule)
    after = adapter_state(module)
    assert module.trainer.global_step == 3
    assert any(not torch.equal(before[n], after[n]) for n in before)
    rollout = module.last_rollout
    mask = rollout.perception_mask
    assert mask.any(), "some perception tokens were selected"
    assert not (mask & ~rollout.completion_mask).any()
    # Gated rows (A <= 0) never select perception tokens.
    assert not mask[rollout.advantages <= 0].any()
    # What the callbacks draw is what the loss used: the mask recomputed from the recorded entropies.
    from cppo_lightning.objectives import perception_token_mask

    removed = torch.where(torch.isnan(rollout.entropy_removed), rollout.entropy, rollout.entropy_removed)
    expected = perception_token_mask(
        rollout.entropy, removed, rollout.completion_mask, 0.5, rollout.advantages
    )
    assert torch.equal(mask, expected)


def test_resumed_run_ends_with_the_same_parameters(tiny_qwen, tmp_path):
    def datamodule():
        return small_data(tiny_qwen, train_size=8, seed=5)

    def module():
        return small_module(tiny_qwen, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))

    # 4 batches per epoch: stop mid-epoch at step 3, continue into the second epoch up to step 6.
    straight = module()
    trainer(6).fit(straight, datamodule=datamodule())
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    first = module()
    trainer(3, enable_checkpointing=True, callbacks=[checkpoint]).fit(first, datamodule=datamodule())
    resumed = module()
    trainer(6).fit(resumed, datamodule=datamodule(), ckpt_path=tmp_path / "last.ckpt")
    expected, actual = adapter_state(straight), adapter_state(resumed)
    assert resumed.trainer.global_step == 6
    assert any(
        not torch.equal(adapter_state(first)[n], actual[n]) for n in actual
    )  # it did train after resuming
    assert all(torch.equal(expected[n], actual[n]) for n in expected)
    assert straight.last_rollout.completions == resumed.last_rollout.completions


def always(value):
    def grade(prompts, completions, answers, **columns):
        return [value] * len(completions)

    return grade


def alternating(prompts, completions, answers, **columns):
    """Correct on every other sample: avg@k is exactly 0.5 when k is even."""
    return [float(i % 2 == 0) for i in range(len(completions))]


@pytest.mark.parametrize(
    "grader, expected", [("always_right", 1.0), ("never_right", 0.0), ("alternating", 0.5)]
)
def test_validate_reports_avg_at_k(tiny_qwen, grader, expected):
    module = small_module(
        tiny_qwen,
        evaluation=EvaluationConfig(samples_per_question=4, max_new_tokens=4, reward=f"test_module.{grader}"),
    )
    datamodule = small_data(tiny_qwen, train_size=4, val_size=6, eval_batch_size=4)
    (metrics,) = trainer(1).validate(module, datamodule=datamodule)
    assert metrics["val/avg@4"] == pytest.approx(expected)


always_right = always(1.0)
never_right = always(0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rollout=RolloutConfig(samples_per_prompt=1)), "G >= 2"),
        (
            dict(update=UpdateConfig(mini_batch_prompts=3)),
            r"mini_batch_prompts \(3\) does not divide the batch \(2 prompts\)",
        ),
    ],
)
def test_sizes_that_do_not_divide_fail_at_start_up(tiny_qwen, kwargs, message):
    datamodule = small_data(tiny_qwen, train_size=4)
    with pytest.raises(ValueError, match=message):
        module = small_module(tiny_qwen, **kwargs)
        trainer(1).fit(module, datamodule=datamodule)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(micro_batch_rollouts=0), "micro_batch_rollouts must be a positive integer or null, got 0"),
        (dict(max_tokens_per_forward=-5), "max_tokens_per_forward must be a positive integer"),
        (dict(ppo_epochs=0), "ppo_epochs must be a positive integer"),
        (dict(gradient_clip_val=0.0), "gradient_clip_val must be positive or null"),
    ],
)
def test_update_settings_that_cannot_work_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UpdateConfig(**kwargs)


def broken_reward(prompts, completions, answers, **columns):
    raise KeyError("solution")


def test_a_reward_function_that_raises_is_named(tiny_qwen):
    module = small_module(tiny_qwen, reward_functions={broken_reward: 1.0})
    with pytest.raises(RuntimeError, match="reward function 'broken' raised KeyError"):
        trainer(1).fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=2))


class NonFiniteOnce(GRPO):
    """GRPO whose loss is NaN on its first call (as after an overflow)."""

    calls = 0

    def __call__(self, inputs):
        output = super().__call__(inputs)
        type(self).calls += 1
        if type(self).calls == 1:
            output.loss = output.loss * float("nan")
        return output


def test_a_non_finite_loss_skips_the_step_and_training_continues(tiny_qwen, caplog):
    NonFiniteOnce.calls = 0
    module = small_module(
        tiny_qwen, objective=NonFiniteOnce(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)
    )
    module.configure_model()
    before = adapter_state(module)
    with caplog.at_level(logging.WARNING, logger="cppo_lightning.module"):
        trainer(3).fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=6))
    assert module.skipped_steps == 1
    assert "skipping an optimizer step (non-finite loss)" in caplog.text
    after = adapter_state(module)
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the later steps trained


class RecordingGRPO(GRPO):
    """GRPO that remembers the importance ratio of every micro-batch it sees."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ratios = []

    def __call__(self, inputs):
        output = super().__call__(inputs)
        self.ratios.append(float(output.metrics["ratio_mean"]))
        return output


def test_several_optimizer_steps_per_rollout_use_the_sampling_policy_as_old_policy(tiny_qwen):
    # 2 prompts x G=4 rollouts in mini-batches of 1 prompt and 2 PPO epochs: 4 optimizer steps per rollout.
    objective = RecordingGRPO()
    module = small_module(
        tiny_qwen,
        objective=objective,
        update=UpdateConfig(mini_batch_prompts=1, micro_batch_rollouts=4, ppo_epochs=2),
        optimizer=lambda p: torch.optim.AdamW(p, lr=5e-2),
    )
    trainer(8).fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=4))
    assert module.trainer.global_step == 8  # optimizer steps: 2 batches x 4
    first_rollout = objective.ratios[:4]
    # Before any update the policy is the sampling policy: the ratio is exactly 1.
    assert first_rollout[0] == pytest.approx(1.0, abs=1e-6)
    # After an optimizer step the old log-probs (from before the update) no longer match the policy.
    assert any(abs(r - 1.0) > 1e-4 for r in first_rollout[1:])
    # A new rollout starts again from the policy that sampled it.
    assert objective.ratios[4] == pytest.approx(1.0, abs=1e-6)
