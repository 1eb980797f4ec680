"""Re-scored completion log-probs agree with generate's own scores."""

import pytest
import torch

from cppo_lightning.models import PolicyConfig, completion_mask, load_policy, score_completions
from cppo_lightning.models.scoring import completion_logits
from helpers import encode


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    eos = [9, 8]
    ids = torch.tensor([[1, 2, 9, 8, 8], [1, 1, 1, 1, 1], [8, 3, 3, 9, 3]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(completion_mask(ids, eos), expected)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rescored_logprobs_match_generate(tiny_vlm, temperature):
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_vlm)), reference=False)
    model = policy.model.eval()
    # Prompts of different lengths: the batch is left-padded, completions start at the same column.
    inputs = encode(
        policy.processor, ["How many?", "Is the red circle to the left of the blue square?", "Colour?"]
    )
    assert (inputs["attention_mask"].sum(1) != inputs["attention_mask"].shape[1]).any()
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        max_new_tokens=12,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        output_logits=True,
        output_scores=True,
        return_dict_in_generate=True,
    )
    completion = out.sequences[:, inputs["input_ids"].shape[1] :]
    mask = completion_mask(completion, policy.unwrapped().generation_config.eos_token_id)
    with torch.no_grad():
        scored = score_completions(model, inputs, completion, mask, temperature=temperature, entropy=True)
    raw = torch.stack(out.logits, dim=1).float() / temperature
    expected = torch.log_softmax(raw, -1).gather(-1, completion[..., None])[..., 0]
    assert torch.allclose(scored.logprobs[mask], expected[mask], atol=1e-5)
    probs = torch.softmax(raw, -1)
    expected_entropy = -(probs * torch.log_softmax(raw, -1)).sum(-1)
    assert torch.allclose(scored.entropy[mask], expected_entropy[mask], atol=1e-5)


def test_logits_are_computed_only_over_the_completion(tiny_qwen):
    policy = load_policy(PolicyConfig(model_name_or_path=str(tiny_qwen)), reference=False)
    inputs = encode(policy.processor, ["How many?", "Colour of the star?"])
    completion = torch.randint(10, 200, (2, 5))
    logits = completion_logits(
        policy.model, inputs, completion, torch.ones_like(completion, dtype=torch.bool)
    )
    assert logits.shape[:2] == (2, 5)
