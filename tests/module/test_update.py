"""The update path: gradients independent of micro-batching, token budgets, skipped steps."""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_lightning.objectives import CPPO, GRPO, PAPO
from cppo_lightning.update import UpdateConfig, padding_fraction, plan_micro_batches
from helpers import HandWrittenDataModule, handmade_rollout, prompt_batch, quiet_trainer, small_module

QUESTIONS = ["How many?", "Is the red circle to the left of the blue square above the line?", "Colour?"]
# 3 prompts x G=4: completions of very different lengths, advantages of both signs in every group.
LENGTHS = [11, 2, 7, 5, 1, 9, 4, 11, 6, 3, 10, 8]
ADVANTAGES = [1.0, -1.0, 0.5, -0.5, 2.0, -1.0, -1.0, 0.0, 0.3, 0.7, -0.2, -0.8]
ROWS = len(LENGTHS)


def _gradients(tiny_qwen, objective, plans):
    """The flat gradient of one mini-batch's loss (every rollout) under each plan, in float64.

    float64 so that the only differences left between plans are rounding (about 1e-15): in float32
    the different batch shapes alone move a gradient by about 1e-6.
    """
    torch.manual_seed(0)
    module = small_module(tiny_qwen, objective=objective)
    module.configure_model()
    module.policy.double()
    batch = prompt_batch(tiny_qwen, QUESTIONS)
    batch.vision = {
        view: [
            {k: v.double() if v.is_floating_point() else v for k, v in example.items()} for example in views
        ]
        for view, views in batch.vision.items()
    }
    results = {}
    for name, update in plans.items():
        rollout = handmade_rollout(batch, 4, LENGTHS, advantages=ADVANTAGES)
        module.update_config = update
        updater = module.policy_update()
        scorer = updater.score(batch, rollout)
        module.policy.model.zero_grad(set_to_none=True)
        step, _ = updater.accumulate_gradients(scorer, list(range(len(rollout))), record=True)
        grads = torch.cat([p.grad.flatten() for p in module.policy.trainable_parameters()])
        results[name] = (grads, step, rollout)
    return results


PLANS = {
    "one row per forward": UpdateConfig(micro_batch_rollouts=1),
    "two rows per forward": UpdateConfig(micro_batch_rollouts=2),
    "all rows in one forward": UpdateConfig(micro_batch_rollouts=None),
    "a tight token budget": UpdateConfig(micro_batch_rollouts=None, max_tokens_per_forward=100),
    # Grouped forwards count each prompt once per view: this budget holds about one group.
    "a loose token budget": UpdateConfig(micro_batch_rollouts=None, max_tokens_per_forward=300),
}


@pytest.mark.parametrize(
    "objective, plans",
    [
        (CPPO(cpl_weight=1.0), list(PLANS)),
        (GRPO(), ["one row per forward", "all rows in one forward", "a tight token budget"]),
        (
            PAPO(perception_weight=0.5, entropy_weight_original=0.1),
            ["two rows per forward", "all rows in one forward", "a tight token budget"],
        ),
    ],
    ids=["cppo", "grpo", "papo"],
)
def test_the_gradient_of_a_mini_batch_does_not_depend_on_micro_batching(tiny_qwen, objective, plans):
    results = _gradients(tiny_qwen, objective, {name: PLANS[name] for name in plans})
    reference, reference_step, reference_rollout = results["all rows in one forward"]
    assert reference_step.micro_batches == 1 and reference.norm() > 0
    micro_counts = {name: step.micro_batches for name, (_, step, _) in results.items()}
    assert micro_counts.get("one row per forward", ROWS) == ROWS
    assert all(count > 1 for name, count in micro_counts.items() if name != "all rows in one forward")
    for name, (gradient, step, rollout) in results.items():
        error = (gradient - reference).norm() / reference.norm()
        assert error < 1e-6, f"{name}: relative gradient difference {error:.2e}"
        for key, value in reference_step.sums.items():  # the logged metrics do not move either
            torch.testing.assert_close(step.sums[key], value, rtol=1e-6, atol=1e-9, msg=f"{name}: {key}")
        if isinstance(objective, CPPO):  # the same perception tokens, wherever they were chosen
            assert torch.equal(rollout.perception_mask, reference_rollout.perception_mask)
    if isinstance(objective, CPPO):
        assert reference_rollout.perception_mask.any()


def test_the_release_aggregation_does_depend_on_micro_batching(tiny_qwen):
    """The named exception, kept for exact reproduction of the reference release."""
    release = CPPO(cpl_weight=1.0, aggregation="micro-batch-token-mean")
    plans = {name: PLANS[name] for name in ("all rows in one forward", "two rows per forward")}
    (one, _, _), (many, _, _) = _gradients(tiny_qwen, release, plans).values()
    assert (one - many).norm() / one.norm() > 1e-3


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(1, 300), st.integers(0, 200), st.sampled_from([1, 3])), min_size=1, max_size=30
    ),
    budget=st.integers(50, 2000),
    max_rows=st.one_of(st.none(), st.integers(1, 8)),
)
def test_the_token_budget_is_never_exceeded(data, budget, max_rows):
    prompts, completions, stacked = (list(column) for column in zip(*data))
    rows = list(range(len(data)))
    plans = plan_micro_batches(rows, prompts, completions, stacked, max_rows=max_rows, max_tokens=budget)
    assert sorted(r for plan in plans for r in plan.rows) == rows  # every row exactly once
    for plan in plans:
        assert plan.prompt_length == max(prompts[r] for r in plan.rows)
        assert plan.completion_length == max(completions[r] for r in plan.rows)
        assert plan.stacked_rows == sum(stacked[r] for r in plan.rows)
        assert max_rows is None or len(plan.rows) <= max_rows
        # Only a row that alone is over the budget may exceed it, in a micro-batch of its own.
        assert plan.tokens <= budget or len(plan.rows) == 1


def test_rows_are_grouped_by_length_to_cut_padding():
    # Two long (100 + 100) and two short (100 + 10) rows, two rows per forward.
    prompts, completions, stacked = [100] * 4, [100, 10, 100, 10], [1] * 4
    plans = plan_micro_batches(range(4), prompts, completions, stacked, max_rows=2)
    assert [sorted(plan.rows) for plan in plans] == [[0, 2], [1, 3]]
    # In arrival order the short rows would be padded to 200: (2 x 90) / (4 x 200) = 22.5 % padding.
    grouped = padding_fraction(plans, prompts, completions, stacked)
    sequential = [plan_micro_batches(pair, prompts, completions, stacked)[0] for pair in ([0, 1], [2, 3])]
    assert grouped == 0.0
    assert padding_fraction(sequential, prompts, completions, stacked) == pytest.approx(0.225)


def test_a_row_over_the_budget_gets_a_forward_of_its_own_with_a_warning(tiny_qwen, caplog):
    module = small_module(
        tiny_qwen, update=UpdateConfig(micro_batch_rollouts=None, max_tokens_per_forward=10)
    )
    module.configure_model()
    batch = prompt_batch(tiny_qwen, QUESTIONS)
    with caplog.at_level(logging.WARNING, logger="cppo_lightning.update"):
        scorer = module.policy_update().score(
            batch, handmade_rollout(batch, 4, LENGTHS, advantages=ADVANTAGES)
        )
    with caplog.at_level(logging.WARNING, logger="cppo_lightning.update"):
        plans = scorer.plan(range(12), [1] * 12)
        again = scorer.plan(range(12), [1] * 12)
    assert len(plans) == len(again) == 12 and all(len(plan.rows) == 1 for plan in plans)
    # One line for the rollout batch (the reference pass planned it first), not one per row and pass.
    assert caplog.text.count("12 rollout(s) alone need more than max_tokens_per_forward=10") == 1


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradient is not (as after an overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradientOnce(GRPO):
    calls = 0

    def __call__(self, inputs):
        type(self).calls += 1
        if type(self).calls == 1:
            inputs.logprobs = NaNGradient.apply(inputs.logprobs)
        return super().__call__(inputs)


def test_a_non_finite_gradient_norm_skips_and_counts_the_step(tiny_qwen, caplog):
    NaNGradientOnce.calls = 0
    module = small_module(
        tiny_qwen, objective=NaNGradientOnce(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2)
    )
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.policy.model.named_parameters() if p.requires_grad}
    trainer = quiet_trainer(1)
    with caplog.at_level(logging.WARNING, logger="cppo_lightning.module"):
        trainer.fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=2))
    assert module.skipped_steps == 1
    assert "skipping an optimizer step (non-finite gradient norm)" in caplog.text
    # global_step counts optimizer steps: the skipped one did not count, the next batch trained.
    assert trainer.global_step == 1 and NaNGradientOnce.calls == 2
    after = {n: p.detach() for n, p in module.policy.model.named_parameters() if p.requires_grad}
    assert all(torch.isfinite(p).all() for p in after.values())  # AdamW never saw the NaNs
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
