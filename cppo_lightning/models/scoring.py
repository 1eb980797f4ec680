"""Re-scoring sampled completions: per-token log-probs (and entropies) under any image view.

The prompt (left-padded, with its vision inputs) and the completion (right-padded after EOS) are run in
one forward; logits are computed only over the completion positions (``logits_to_keep``), so a long
prompt full of image tokens never materialises ``[rows, prompt_len, vocab]`` logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Keys laid out along the token axis; everything else a processor returns is a vision input.
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def completion_mask(completion_ids: Tensor, eos_token_ids: Iterable[int]) -> Tensor:
    """Mask of the real completion tokens: everything up to and including the first EOS.

    Args:
        completion_ids (Tensor): [R, C] sampled ids; after the first EOS ``generate`` pads.
        eos_token_ids: ids that end a completion.

    Returns:
        Tensor: [R, C] bool.
    """
    eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), device=completion_ids.device))
    # Number of EOS strictly before each position: 0 means the position is inside the completion.
    before = torch.cumsum(eos.int(), dim=1) - eos.int()
    return before == 0


def with_completion(prompt_inputs: Mapping[str, Tensor], completion_ids: Tensor, mask: Tensor) -> dict:
    """Model inputs for prompt + completion: token-axis keys extended, vision inputs passed through.

    ``mm_token_type_ids``/``token_type_ids`` are extended with zeros: without them Qwen2.5-VL recomputes
    multimodal positions differently from ``generate`` (log-probs then differ by ~1e-3).
    """
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([prompt_inputs["input_ids"], completion_ids], dim=1)
    inputs["attention_mask"] = torch.cat(
        [prompt_inputs["attention_mask"], mask.to(prompt_inputs["attention_mask"].dtype)], dim=1
    )
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in prompt_inputs:
            inputs[key] = torch.cat([prompt_inputs[key], torch.zeros_like(completion_ids)], dim=1)
    return inputs


def completion_logits(
    model: nn.Module, prompt_inputs: Mapping[str, Tensor], completion_ids: Tensor, mask: Tensor
) -> Tensor:
    """Next-token logits at the completion positions.

    Args:
        model: a VLM (or a PEFT wrapper of one) that accepts ``logits_to_keep``.
        prompt_inputs: processor outputs for the prompts: ``input_ids`` [R, P] (left-padded),
            ``attention_mask`` [R, P], optional ``mm_token_type_ids`` [R, P], and vision inputs.
        completion_ids (Tensor): [R, C].
        mask (Tensor): [R, C] completion mask.

    Returns:
        Tensor: [R, C, V]; row t holds the logits that predicted ``completion_ids[:, t]``.
    """
    length = completion_ids.shape[1]
    inputs = with_completion(prompt_inputs, completion_ids, mask)
    # The logit predicting completion token t sits at position P + t - 1: keep the last C + 1, drop one.
    outputs = model(**inputs, logits_to_keep=length + 1, use_cache=False)
    return outputs.logits[:, :-1]


@dataclass
class ScoredCompletions:
    """Per-token scores of completions under one image view.

    Attributes:
        logprobs: [R, C] sampled-token log-probs (with gradient if the forward had it).
        entropy: [R, C] full-vocabulary entropies (no gradient), when requested.
        logits: [R, C, V] the completion logits, when requested.
    """

    logprobs: Tensor
    entropy: Tensor | None = None
    logits: Tensor | None = None


def score_completions(
    model: nn.Module,
    prompt_inputs: Mapping[str, Tensor],
    completion_ids: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    keep_logits: bool = False,
) -> ScoredCompletions:
    """Log-probs (and optionally entropies) of sampled completions under the model.

    Args:
        model: the policy (or reference) network.
        prompt_inputs: see :func:`completion_logits`.
        completion_ids (Tensor): [R, C].
        mask (Tensor): [R, C] completion mask.
        temperature: the sampling temperature; logits are divided by it, as in ``generate``.
        entropy: also return full-vocabulary entropies.
        keep_logits: also return the raw logits (full-distribution ablations).

    Returns:
        ScoredCompletions with ``logprobs`` [R, C] (and ``entropy`` [R, C]).
    """
    from cppo_lightning.objectives import token_entropy, token_logprobs

    logits = completion_logits(model, prompt_inputs, completion_ids, mask)
    logprobs = token_logprobs(logits, completion_ids, temperature=temperature)
    entropies = token_entropy(logits, temperature=temperature) if entropy else None
    return ScoredCompletions(logprobs, entropies, logits if keep_logits else None)
