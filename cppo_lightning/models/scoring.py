"""Re-scoring sampled completions: per-token log-probs, entropies and divergences under any image view.

The prompt (left-padded, with its vision inputs) and the completion (right-padded after EOS) run in one
forward of the model's backbone. The language-model head is then applied **in chunks of response
positions**: each chunk's logits live only while its log-probs (and, on request, entropies or
divergences) are computed, and are recomputed in backward (activation checkpointing of the head). So
no ``[rows, T, vocab]`` logits tensor is ever held: at Qwen2.5-VL's 151,936-token vocabulary, one such
fp32 tensor for 6 rows x 2,048 tokens is 7.5 GB, more than the rest of the update together.

Padding positions never reach the head: only response tokens are scored (0 elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cppo_lightning.architectures import TEXT_KEYS, architecture_of
from cppo_lightning.objectives.functional import (
    DEFAULT_CHUNK_ELEMENTS,
    full_kl,
    log_softmax_at,
    softmax_entropy,
)


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
    for key in TEXT_KEYS[2:]:  # the architecture table's token-axis keys besides input_ids/attention_mask
        if key in prompt_inputs:
            inputs[key] = torch.cat([prompt_inputs[key], torch.zeros_like(completion_ids)], dim=1)
    return inputs


def row_positions(model: nn.Module, inputs: dict) -> dict:
    """``inputs`` with ``position_ids`` counted from each row's first real token, for 1-D RoPE models.

    Left-padded rows would otherwise count positions from the first padding column. RoPE depends on
    position differences only, but computes its angles in float32, so a shift changes the rounding:
    counting as ``generate`` does (from the attention mask) makes the scores independent of how much
    padding a micro-batch adds, and equal to the grouped forward's. Models with 3-D M-RoPE (a
    ``get_rope_index``) derive their positions from the attention mask themselves.
    """
    backbone = LanguageModelHead.of(model).backbone
    if hasattr(backbone, "get_rope_index") or "position_ids" in inputs:
        return inputs
    mask = inputs["attention_mask"].long()
    inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


def completion_logits(
    model: nn.Module, prompt_inputs: Mapping[str, Tensor], completion_ids: Tensor, mask: Tensor
) -> Tensor:
    """Full next-token logits at the completion positions (the unchunked reference path).

    The update never calls this (see :func:`score_positions`); the supervised warm start, exports and
    tests do.

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
    inputs = row_positions(model, with_completion(prompt_inputs, completion_ids, mask))
    # The logit predicting completion token t sits at position P + t - 1: keep the last C + 1, drop one.
    outputs = model(**inputs, logits_to_keep=length + 1, use_cache=False)
    return outputs.logits[:, :-1]


# ---------------------------------------------------------------------------------------------- the head


@dataclass
class LanguageModelHead:
    """A VLM split into its backbone (everything up to the last hidden state) and its output head.

    Every ``*ForConditionalGeneration`` class of transformers 5 computes
    ``lm_head(self.model(...)[0])`` (some add a final logit soft-cap, applied here too where the
    architecture table says the VLM class applies it), so calling the two parts gives the model's own
    logits.

    Attributes:
        backbone: the inner ``model`` (vision tower + language model + final norm).
        head: the output projection (``get_output_embeddings()``; a LoRA layer if LoRA targets it).
        softcap: ``final_logit_softcapping`` where the VLM class applies it (None otherwise: Gemma 3's
            ``Gemma3ForConditionalGeneration`` ignores the value in its config).
    """

    backbone: nn.Module
    head: nn.Module
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> LanguageModelHead:
        """Split ``model`` (a transformers VLM, possibly inside a PEFT wrapper).

        Raises:
            TypeError: the model has no inner ``model`` and output embeddings to split.
        """
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        backbone = getattr(base, "model", None)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module):
            raise TypeError(
                f"{type(base).__name__} does not split into `.model` and an output head "
                "(get_output_embeddings()): the chunked scoring path needs both"
            )
        softcap = None
        if architecture_of(base).logit_softcap:
            config = getattr(base.config, "text_config", None) or base.config
            softcap = getattr(config, "final_logit_softcapping", None) or getattr(
                base.config, "final_logit_softcapping", None
            )
        return cls(backbone, head, softcap)

    def logits(self, hidden: Tensor) -> Tensor:
        """[..., V] logits of hidden states [..., H], in float32 (or float64)."""
        return self.finish(self.head(hidden))

    def finish(self, logits: Tensor) -> Tensor:
        """The head's output as the model's logits: in float32 (or float64), soft-capped where it applies."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def completion_hidden_states(
    model: nn.Module, prompt_inputs: Mapping[str, Tensor], completion_ids: Tensor, mask: Tensor
) -> Tensor:
    """[R, C, H] last hidden states at the positions that predict each completion token.

    Args:
        model: the VLM (or its PEFT wrapper); only its backbone runs.
        prompt_inputs: see :func:`completion_logits`.
        completion_ids (Tensor): [R, C].
        mask (Tensor): [R, C] completion mask.
    """
    length = completion_ids.shape[1]
    inputs = row_positions(model, with_completion(prompt_inputs, completion_ids, mask))
    hidden = LanguageModelHead.of(model).backbone(**inputs, use_cache=False)[0]
    # The state predicting completion token t sits at position P + t - 1.
    return hidden[:, -length - 1 : -1]


def _chunk_length(vocab: int, chunk_tokens: int | None) -> int:
    if chunk_tokens is not None:
        if chunk_tokens < 1:
            raise ValueError(
                f"logits_chunk_tokens must be a positive number of positions, got {chunk_tokens}"
            )
        return chunk_tokens
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))


def _vocab_size(head: LanguageModelHead) -> int:
    weight = getattr(head.head, "weight", None)
    if isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[0] > 1:
        return int(weight.shape[0])
    return int(getattr(head.head, "out_features", 0) or 0) or 2**17


@dataclass
class PositionScores:
    """Scores of the selected response positions, flat over ``P`` positions.

    Attributes:
        logprobs: [P] sampled-token log-probs (with gradient when the forward had it).
        entropy: [P] full-vocabulary entropies (no gradient), when requested.
    """

    logprobs: Tensor
    entropy: Tensor | None = None


def _score_chunk(
    head: LanguageModelHead,
    hidden: Tensor,
    tokens: Tensor,
    temperature: float,
    entropies: list[Tensor] | None,
) -> Tensor:
    """One chunk's log-probs; its entropies (no gradient) appended to ``entropies`` when given.

    Under checkpointing this runs twice, in the forward and again in backward; the entropy is needed
    once, so the recomputation (which finds ``entropies`` already filled) skips it.
    """
    logits = head.logits(hidden)
    logprobs = log_softmax_at(logits, tokens, temperature)
    if entropies is not None and not entropies:
        entropies.append(softmax_entropy(logits.detach(), temperature))
    return logprobs


def score_positions(
    head: LanguageModelHead,
    hidden: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_tokens: int | None = None,
) -> PositionScores:
    """Log-probs (and entropies) of ``tokens`` from hidden states, the head applied chunk by chunk.

    With gradient enabled each chunk is checkpointed: its logits are freed after the forward and
    recomputed in backward, so memory holds one chunk of logits at a time, never ``[P, V]``.

    Args:
        head: the model's head (:meth:`LanguageModelHead.of`).
        hidden (Tensor): [P, H] hidden states predicting ``tokens``.
        tokens (Tensor): [P] token ids.
        temperature: the sampling temperature; logits are divided by it, as in ``generate``.
        entropy: also return full-vocabulary entropies (no gradient).
        chunk_tokens: positions per chunk; None: about 128 MiB of fp32 logits per chunk.

    Returns:
        PositionScores with ``logprobs`` [P] (and ``entropy`` [P]).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    step = _chunk_length(_vocab_size(head), chunk_tokens)
    differentiable = torch.is_grad_enabled() and hidden.requires_grad
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], step):
        part = (hidden[start : start + step], tokens[start : start + step])
        found: list[Tensor] | None = [] if entropy else None
        if differentiable:
            lp = checkpoint(
                _score_chunk, head, *part, temperature, found, use_reentrant=False, preserve_rng_state=False
            )
        else:
            lp = _score_chunk(head, *part, temperature, found)
        logprobs.append(lp)
        if found is not None:
            entropies.append(found[0])
    if not logprobs:
        empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
        return PositionScores(empty, empty if entropy else None)
    return PositionScores(torch.cat(logprobs), torch.cat(entropies) if entropy else None)


def _divergence_chunk(head: LanguageModelHead, anchor: Tensor, other: Tensor, temperature: float) -> Tensor:
    log_p = torch.log_softmax(head.logits(anchor) / temperature, dim=-1)
    log_q = torch.log_softmax(head.logits(other) / temperature, dim=-1)
    return full_kl(log_p, log_q)


def divergence_positions(
    head: LanguageModelHead,
    anchor: Tensor,
    other: Tensor,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> Tensor:
    """Exact full-vocabulary ``KL(p_anchor || p_other)`` per position, the head applied in chunks.

    The CPPO ``divergence="full_kl"`` ablation: gradient flows into both hidden states; each chunk is
    checkpointed like :func:`score_positions` (two chunks of logits alive at a time).

    Args:
        head: the model's head.
        anchor (Tensor): [P, H] hidden states under the original image.
        other (Tensor): [P, H] hidden states of the same positions under a perturbed view.
        temperature: the sampling temperature.
        chunk_tokens: positions per chunk (None: automatic, halved for the two views).

    Returns:
        Tensor: [P] divergences.
    """
    step = max(1, _chunk_length(_vocab_size(head), chunk_tokens) // (1 if chunk_tokens else 2))
    differentiable = torch.is_grad_enabled() and (anchor.requires_grad or other.requires_grad)
    parts = []
    for start in range(0, anchor.shape[0], step):
        a, b = anchor[start : start + step], other[start : start + step]
        if differentiable:
            parts.append(
                checkpoint(
                    _divergence_chunk, head, a, b, temperature, use_reentrant=False, preserve_rng_state=False
                )
            )
        else:
            parts.append(_divergence_chunk(head, a, b, temperature))
    if not parts:
        return anchor.new_zeros(0, dtype=torch.promote_types(anchor.dtype, torch.float32))
    return torch.cat(parts)
