"""The update's scoring path: chunked head == full logits, log-probs == generate's, stacked == separate."""

import pytest
import torch

from cppo_lightning.batch import ORIGINAL, PRESERVING, REMOVING
from cppo_lightning.models import LanguageModelHead, PolicyConfig, completion_mask, load_policy
from cppo_lightning.models.scoring import (
    completion_hidden_states,
    completion_logits,
    divergence_positions,
    score_positions,
)
from cppo_lightning.objectives import ViewRequest, full_kl, token_entropy, token_logprobs
from cppo_lightning.rollout import Rollout
from cppo_lightning.update import RolloutScorer
from helpers import handmade_rollout, prompt_batch

QUESTIONS = ["How many?", "Is the red circle to the left of the blue square?", "Colour?"]


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    eos = [9, 8]
    ids = torch.tensor([[1, 2, 9, 8, 8], [1, 1, 1, 1, 1], [8, 3, 3, 9, 3]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(completion_mask(ids, eos), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_update_scores_equal_generate_s_own(tiny_vlm, temperature):
    """The scorer the update uses reproduces generate's log-probs and entropies (left-padded prompts)."""
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_vlm)), reference=False)
    model = policy.model.eval()
    batch = prompt_batch(tiny_vlm, QUESTIONS)
    assert (batch.attention_mask.sum(1) != batch.prompt_length).any()  # really left-padded
    torch.manual_seed(0)
    out = model.generate(
        **batch.model_inputs(ORIGINAL),
        max_new_tokens=12,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    completion = out.sequences[:, batch.prompt_length :]
    mask = completion_mask(completion, policy.unwrapped().generation_config.eos_token_id)
    rollout = Rollout(
        torch.arange(len(batch)), completion, mask, [""] * len(batch), torch.zeros(3), {}, torch.zeros(3), 1
    )
    # Micro-batches of one row: each trims the prompt to its own length (no left padding at all).
    scorer = RolloutScorer(model, batch, rollout, temperature=temperature, max_rows=1, chunk_tokens=5)
    for micro in scorer.plan(range(len(batch)), [1] * len(batch)):
        with torch.no_grad():
            inputs = scorer.inputs(micro, [], torch.zeros(3, dtype=torch.bool), entropy=True)
        rows = torch.as_tensor(micro.rows)
        raw = torch.stack(out.logits, dim=1)[rows, : micro.completion_length].float() / temperature
        expected = torch.log_softmax(raw, -1).gather(-1, completion[rows, : micro.completion_length, None])[
            ..., 0
        ]
        response = inputs.response_mask
        torch.testing.assert_close(inputs.logprobs[response], expected[response], atol=1e-5, rtol=1e-5)
        entropy = -(torch.softmax(raw, -1) * torch.log_softmax(raw, -1)).sum(-1)
        torch.testing.assert_close(inputs.entropy[response], entropy[response], atol=1e-5, rtol=1e-5)


def _hidden_and_tokens(policy, batch, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    completion = torch.randint(10, 200, (len(batch), length), generator=generator)
    mask = torch.ones_like(completion, dtype=torch.bool)
    mask[1, 4:] = False
    return completion, mask


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_head_equals_the_full_logits_in_values_and_gradients(tiny_vlm, chunk):
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_vlm), finetuning="full"), reference=False)
    model = policy.model.double()
    batch = prompt_batch(tiny_vlm, QUESTIONS)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in batch.model_inputs(ORIGINAL).items()}
    completion, mask = _hidden_and_tokens(policy, batch)
    weights = torch.rand(mask.sum(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def gradients(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits = completion_logits(model, inputs, completion, mask)
    full_lp = token_logprobs(logits, completion, temperature=0.7)[mask]
    full_entropy = token_entropy(logits.detach(), temperature=0.7)[mask]
    full_grads = gradients((full_lp * weights).sum())

    hidden = completion_hidden_states(model, inputs, completion, mask)
    scores = score_positions(
        LanguageModelHead.of(model), hidden[mask], completion[mask], 0.7, entropy=True, chunk_tokens=chunk
    )
    chunk_grads = gradients((scores.logprobs * weights).sum())
    torch.testing.assert_close(scores.logprobs, full_lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scores.entropy, full_entropy, rtol=1e-10, atol=1e-10)
    assert chunk_grads.keys() == full_grads.keys() and len(full_grads) > 10
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_chunked_divergence_equals_the_full_vocabulary_kl(tiny_qwen):
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen), finetuning="full"), reference=False)
    model = policy.model.double()
    batch = prompt_batch(tiny_qwen, QUESTIONS)
    completion, mask = _hidden_and_tokens(policy, batch)
    views = [
        {k: v.double() if v.is_floating_point() else v for k, v in batch.model_inputs(view).items()}
        for view in (ORIGINAL, REMOVING)
    ]
    logits = [completion_logits(model, inputs, completion, mask) for inputs in views]
    expected = full_kl(*(torch.log_softmax(x / 1.3, -1) for x in logits))[mask]
    hidden = [completion_hidden_states(model, inputs, completion, mask)[mask] for inputs in views]
    chunked = divergence_positions(LanguageModelHead.of(model), *hidden, temperature=1.3, chunk_tokens=2)
    torch.testing.assert_close(chunked, expected, rtol=1e-10, atol=1e-12)
    assert (chunked > 0).all()  # the two views really differ


def test_the_head_sees_only_response_tokens_in_chunks(tiny_qwen):
    """No [rows, T, V] logits: the head runs on chunks of at most ``chunk_tokens`` response positions."""
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen)), reference=False)
    batch = prompt_batch(tiny_qwen, QUESTIONS)
    rollout = handmade_rollout(batch, 2, [9, 1, 4, 9, 2, 6])
    head = LanguageModelHead.of(policy.model).head
    seen = []
    handle = head.register_forward_hook(lambda module, args, output: seen.append(tuple(output.shape)))
    scorer = RolloutScorer(policy.model, batch, rollout, max_rows=6, chunk_tokens=4)
    (micro,) = scorer.plan(range(6), [1] * 6)
    inputs = scorer.inputs(micro, [], torch.zeros(6, dtype=torch.bool))
    inputs.logprobs.sum().backward()  # the backward recomputes each chunk
    handle.remove()
    vocab = head.out_features
    assert all(len(shape) == 2 and shape[0] <= 4 and shape[1] == vocab for shape in seen)
    # 31 response tokens: 8 chunks in the forward, recomputed once each in the backward.
    assert sum(shape[0] for shape in seen) == 2 * 31 and len(seen) == 2 * 8
    assert not inputs.logprobs[~inputs.response_mask].any()


def test_a_stacked_forward_over_a_row_subset_equals_separate_forwards(tiny_qwen):
    """The design's claim: [I for all rows; I+ and I- for some rows] in one forward == one forward per view."""
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen)), reference=False)
    batch = prompt_batch(tiny_qwen, QUESTIONS)
    rollout = handmade_rollout(batch, 2, [9, 3, 6, 9, 2, 7], advantages=[1.0, -1.0, 0.5, 0.0, 2.0, -0.5])
    scorer = RolloutScorer(policy.model, batch, rollout, max_rows=6)
    (micro,) = scorer.plan(range(6), [1] * 6)
    view_rows = rollout.advantages > 0
    requests = [ViewRequest(PRESERVING, with_grad=True), ViewRequest(REMOVING, with_grad=True, entropy=True)]
    with torch.no_grad():
        stacked = scorer.inputs(micro, requests, view_rows, entropy=True)
        separate = {view: scorer.score_all(policy.model, view) for view in (ORIGINAL, PRESERVING, REMOVING)}
    order = torch.as_tensor(micro.rows)
    response = stacked.response_mask
    for view, scores in ((ORIGINAL, stacked.logprobs), (PRESERVING, None), (REMOVING, None)):
        expected = separate[view][order, : micro.completion_length]
        if view == ORIGINAL:
            torch.testing.assert_close(scores[response], expected[response], atol=1e-5, rtol=1e-5)
            continue
        dense = stacked.views[view]
        has = dense.rows
        assert has.tolist() == view_rows[order].tolist()
        rows_with = response & has.unsqueeze(-1)
        torch.testing.assert_close(dense.logprobs[rows_with], expected[rows_with], atol=1e-5, rtol=1e-5)
        # Rows without the view hold the original's values: zero divergence there.
        rows_without = response & ~has.unsqueeze(-1)
        assert torch.equal(dense.logprobs[rows_without], stacked.logprobs[rows_without])
    assert torch.equal(stacked.views[REMOVING].entropy[~view_rows[order]], stacked.entropy[~view_rows[order]])
    assert not torch.allclose(separate[ORIGINAL], separate[REMOVING])  # the views do differ
