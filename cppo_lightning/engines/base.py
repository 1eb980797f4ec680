"""The rollout-engine seam: what the module asks of whatever samples its completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from cppo_lightning.objectives.functional import k3_kl

if TYPE_CHECKING:
    from cppo_lightning.batch import PromptBatch
    from cppo_lightning.models.loading import Policy
    from cppo_lightning.sampling import RolloutConfig


@dataclass
class Generation:
    """``N`` sampled completions.

    Attributes:
        completion_ids: [N, C] long, padding (the pad id) after the first EOS.
        completion_mask: [N, C] bool, True up to and including the first EOS.
        sampler_logprobs: [N, C] float32 log-prob of each sampled token under the sampler (0 on
            padding), or None if the engine does not report them.
    """

    completion_ids: Tensor
    completion_mask: Tensor
    sampler_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        if self.completion_ids.shape != self.completion_mask.shape:
            raise ValueError(
                f"completion_mask {tuple(self.completion_mask.shape)} does not match completion_ids "
                f"{tuple(self.completion_ids.shape)}"
            )
        if self.sampler_logprobs is not None and self.sampler_logprobs.shape != self.completion_ids.shape:
            raise ValueError(
                f"sampler_logprobs {tuple(self.sampler_logprobs.shape)} does not match completion_ids "
                f"{tuple(self.completion_ids.shape)}"
            )


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples completions for :class:`~cppo_lightning.module.CPPOModule`.

    ``generate`` is called once per training step (``G`` rows per prompt) and once per evaluation batch
    (``k`` rows per prompt); ``sync`` after every optimizer step. The module uses nothing else.
    """

    #: True when the sampler IS the trained network (HF generate on the policy): then
    #: ``lp_old == lp.detach()`` is exact with one optimizer step per rollout batch.
    samples_from_policy: bool
    #: True when ``generate`` fills ``Generation.sampler_logprobs`` for sampled (temperature > 0) rows.
    reports_logprobs: bool

    def generate(
        self,
        policy: Policy,
        batch: PromptBatch,
        example_rows: Tensor,
        config: RolloutConfig,
        seed: int,
    ) -> Generation:
        """Sample one completion per row.

        Args:
            policy: the trained policy (its processor, generation config and, for HF, the network).
            batch: ``B`` prompts; the original view is sampled from.
            example_rows: [N] prompt index of each row, consecutive rows per prompt.
            config: temperature, top-p/k, max new tokens.
            seed: seed of this call's sampling (reproducible runs).

        Returns:
            A :class:`Generation` of ``N`` rows on the policy's device.
        """
        ...

    def sync(self, policy: Policy) -> None:
        """Make the next ``generate`` sample from the policy's current weights (after an optimizer step)."""
        ...


def sampler_logprob_mismatch(sampler_logprobs: Tensor, policy_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute difference between the sampler's and the trained policy's token log-probs.

    Args:
        sampler_logprobs (Tensor): [N, C] log-probs the engine reported for its sampled tokens.
        policy_logprobs (Tensor): [N, C] the same tokens re-scored by the training policy.
        mask (Tensor): [N, C] bool response mask.

    Returns:
        Tensor: scalar ``mean |lp_sampler - lp_policy|`` over response tokens (0 without any).
    """
    mask = mask.bool()
    difference = (sampler_logprobs.float() - policy_logprobs.float()).abs()
    return (difference * mask).sum() / mask.sum().clamp(min=1)


def sampler_kl(sampler_logprobs: Tensor, policy_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(sampler || policy) per response, averaged over responses.

    The tokens were drawn from the sampler ``mu``; with ``d_t = lp_policy_t - lp_mu_t``, each token's
    ``exp(d_t) - d_t - 1`` (:func:`~cppo_lightning.objectives.functional.k3_kl`, clamped likewise) is an
    unbiased, nonnegative estimate of the KL at that position. A response's KL is the sum over its
    tokens (the KL between the two distributions of whole responses); the result is the mean over the
    rows with at least one response token (0 without any).

    Args:
        sampler_logprobs (Tensor): [N, C] log-probs the engine reported for its sampled tokens.
        policy_logprobs (Tensor): [N, C] the same tokens under the trained policy.
        mask (Tensor): [N, C] bool, the response tokens measured.
    """
    mask = mask.bool()
    per_token = k3_kl(sampler_logprobs.float(), policy_logprobs.float())
    per_row = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=1)
    rows = mask.any(dim=1)
    return (per_row * rows).sum() / rows.sum().clamp(min=1)


def eos_and_pad(policy: Policy) -> tuple[list[int], int]:
    """The ids that end a completion and the padding id, from the policy's generation config."""
    config = policy.unwrapped().generation_config
    tokenizer = policy.processor.tokenizer
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    return [int(token) for token in eos], int(pad)


def suppressed_tokens(policy: Policy) -> list[int]:
    """Token ids ``generate`` never samples for this policy (``generation_config.suppress_tokens``)."""
    tokens = getattr(policy.unwrapped().generation_config, "suppress_tokens", None) or []
    return sorted({int(token) for token in tokens})


def device_of(policy: Policy) -> torch.device:
    """Where the policy's weights (and so the module's tensors) live."""
    return next(policy.model.parameters()).device
