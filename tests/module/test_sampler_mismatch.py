"""The sampler/learner mismatch in training: ``update.old_logprobs: sampler`` and the rollout correction.

The rollouts come from the HF engine (fp32, so its log-probs equal the policy's to rounding); a mismatch
is injected by an engine that reports the policy's log-probs shifted on chosen tokens.
"""

import math

import pytest
import torch

from cppo_lightning.engines import HFEngine, check_sampler_logprobs
from cppo_lightning.models.scoring import completion_logits
from cppo_lightning.objectives import GRPO, token_logprobs
from cppo_lightning.update import UpdateConfig
from helpers import HandWrittenDataModule, quiet_trainer, small_module

LOG4 = math.log(4.0)


class InjectedMismatch:
    """HF samples; the reported log-probs are the policy's plus ``shift(mask)`` ([N, C], on response tokens).

    Not the trained network as far as the update knows (``samples_from_policy = False``), so with
    ``old_logprobs: policy`` the old policy is scored and the weights are ``exp(-shift)`` to rounding.
    """

    samples_from_policy = False
    reports_logprobs = True

    def __init__(self, shift):
        self.shift = shift
        self.hf = HFEngine()

    def generate(self, policy, batch, example_rows, config, seed):
        generation = self.hf.generate(policy, batch, example_rows, config, seed)
        ids, mask = generation.completion_ids, generation.completion_mask
        with torch.no_grad():
            logits = completion_logits(policy.model, batch.model_inputs("original", example_rows), ids, mask)
            logprobs = token_logprobs(logits, ids, temperature=config.temperature)
        generation.sampler_logprobs = (logprobs + self.shift(mask)) * mask
        return generation

    def sync(self, policy):
        pass


def train(tiny_qwen, steps=1, engine=None, optimizer=None, **module_settings):
    module = small_module(tiny_qwen, **module_settings)
    if optimizer is not None:
        module.optimizer_factory = optimizer
    module.configure_model()
    if engine is not None:
        module.engine = engine
    initial = [parameter.detach().clone() for parameter in module.policy.trainable_parameters()]
    trainer = quiet_trainer(steps, log_every_n_steps=1)
    trainer.fit(module, datamodule=HandWrittenDataModule(tiny_qwen, count=2, batch_size=2))
    return module, trainer, initial


def metric(trainer, name):
    return trainer.callback_metrics[f"train/{name}"].item()


def test_old_logprobs_from_the_sampler_skip_the_old_policy_pass_and_give_the_same_update(tiny_qwen):
    # Two optimizer steps per rollout batch (one prompt each): lp_old is needed.
    update = UpdateConfig(micro_batch_rollouts=8, mini_batch_prompts=1)
    sgd = lambda parameters: torch.optim.SGD(parameters, lr=0.5)  # noqa: E731
    runs = {}
    for source in ("policy", "sampler"):
        settings = dict(update=UpdateConfig(**{**update.__dict__, "old_logprobs": source}))
        runs[source] = train(tiny_qwen, objective=GRPO(beta=0.0), optimizer=sgd, **settings)
    (policy, _, initial), (sampler, sampler_trainer, _) = runs["policy"], runs["sampler"]
    assert policy.old_policy_forwards == 1 and sampler.old_policy_forwards == 0
    assert isinstance(sampler.engine, HFEngine) and sampler.engine.reports_logprobs
    assert torch.equal(policy.last_rollout.completion_ids, sampler.last_rollout.completion_ids)
    moved = max(
        (p.detach() - i).abs().max().item() for p, i in zip(policy.policy.trainable_parameters(), initial)
    )
    gap = max(
        (p.detach() - q.detach()).abs().max().item()
        for p, q in zip(policy.policy.trainable_parameters(), sampler.policy.trainable_parameters())
    )
    assert moved > 1e-3  # the update is visible ...
    assert gap <= 1e-4 * moved  # ... and the same in both, to float rounding
    # fp32 HF sampling: the sampler is the policy up to rounding, measured on the first step's rows.
    assert metric(sampler_trainer, "sampler_logprob_mismatch") < 1e-5
    assert 0 <= metric(sampler_trainer, "sampler_kl") < 1e-6


def quarter(rows=slice(None), tokens=slice(None)):
    """A shift of -ln 4 on ``[rows, tokens]``: the sampler gave those tokens a quarter of the policy's
    probability (weight ``pi_old / mu = 4``)."""

    def shift(mask):
        values = torch.zeros(mask.shape)
        values[rows, tokens] = -LOG4
        return values

    return shift


def test_an_injected_token_mismatch_is_truncated_at_the_cap(tiny_qwen):
    module, trainer, _ = train(
        tiny_qwen,
        engine=InjectedMismatch(quarter(tokens=0)),
        objective=GRPO(beta=0.0, rollout_correction="token_truncate"),
    )
    mask = module.last_rollout.completion_mask
    tokens, rows = mask.sum().item(), mask.any(dim=1).sum().item()
    # Each response's first token has weight 4, truncated to 2; every other token weight 1.
    assert metric(trainer, "is_truncated_fraction") == pytest.approx(rows / tokens, abs=1e-6)
    assert metric(trainer, "is_weight_mean") == pytest.approx((2 * rows + tokens - rows) / tokens, abs=1e-5)
    # k3 of KL(sampler || policy) at a shifted token: d = ln 4, 4 - 1 - ln 4 = 1.6137; one per response.
    assert metric(trainer, "sampler_kl") == pytest.approx(4 - 1 - LOG4, abs=1e-4)
    assert module.old_policy_forwards == 1  # lp_old from the policy: the sampler is not the trained network


def test_an_injected_sequence_mismatch_masks_whole_responses(tiny_qwen):
    module, trainer, _ = train(
        tiny_qwen,
        engine=InjectedMismatch(quarter(rows=slice(None, None, 2))),
        objective=GRPO(beta=0.0, rollout_correction="sequence_mask"),
    )
    mask = module.last_rollout.completion_mask
    responses = mask.any(dim=1)
    shifted = responses[::2].sum().item()
    # The even rows' sequence weight is 4, outside [0.5, 2]: masked; the odd rows keep weight 1.
    assert metric(trainer, "is_masked_fraction") == pytest.approx(shifted / responses.sum().item(), abs=1e-6)
    kept = responses.sum().item() - shifted
    assert metric(trainer, "is_weight_mean") == pytest.approx(kept / responses.sum().item(), abs=1e-5)
    assert "train/is_truncated_fraction" not in trainer.callback_metrics


def test_a_correction_of_a_matched_sampler_changes_nothing(tiny_qwen):
    # HF samples and reports in fp32: every weight is 1 to rounding, nothing truncated.
    module, trainer, _ = train(tiny_qwen, objective=GRPO(beta=0.0, rollout_correction="token_truncate"))
    assert module.engine.reports_logprobs
    assert metric(trainer, "is_truncated_fraction") == 0.0
    assert metric(trainer, "is_weight_mean") == pytest.approx(1.0, abs=1e-5)


def test_the_sampler_as_old_policy_and_a_correction_are_refused_together(tiny_qwen):
    with pytest.raises(
        ValueError, match="old_logprobs: sampler.*rollout_correction: token_mask.*would all be 1"
    ):
        small_module(
            tiny_qwen,
            objective=GRPO(rollout_correction="token_mask"),
            update=UpdateConfig(old_logprobs="sampler"),
        )


def test_an_engine_without_log_probs_is_refused_at_start_up():
    needed = ["model.update.old_logprobs: sampler"]
    with pytest.raises(
        ValueError, match="old_logprobs: sampler need .* engine 'hf' \\(HFEngine\\) reports none"
    ):
        check_sampler_logprobs(HFEngine(), "hf", needed)
    check_sampler_logprobs(HFEngine(), "hf", [])
    check_sampler_logprobs(HFEngine(report_logprobs=True), "hf", needed)


def test_old_logprobs_must_name_a_source():
    with pytest.raises(ValueError, match="old_logprobs must be one of policy, sampler, got 'rollout'"):
        UpdateConfig(old_logprobs="rollout")
