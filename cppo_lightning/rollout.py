"""The rollouts of one RL step: ``G`` sampled completions per prompt, their rewards and advantages.

A :class:`Rollout` is what one RL step works on: ``G`` sampled completions for each prompt of a
:class:`~cppo_lightning.batch.PromptBatch`, their rewards and advantages. The module keeps the last one
(with entropies and the perception mask after the update) where callbacks can read it.

The sampling settings live in :mod:`cppo_lightning.sampling`, seeding in :mod:`cppo_lightning.seeding`,
HF ``generate`` in :mod:`cppo_lightning.engines.hf` and the weighted reward functions in
:mod:`cppo_lightning.rewards`; their old names here still work for one version, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cppo_lightning.batch import PromptBatch

__all__ = ["Rollout", "decode", "repeat_rows"]


@dataclass
class Rollout:
    """``N = B * G`` sampled completions of one batch of ``B`` prompts, and what was computed on them.

    Attributes:
        example_rows: [N] index of each rollout's prompt in the batch (``G`` consecutive rows each).
        completion_ids: [N, C] sampled ids (padding after EOS).
        completion_mask: [N, C] bool, True up to and including EOS.
        completions: N decoded texts.
        rewards: [N] weighted sum of the reward functions.
        reward_terms: reward-function name -> [N] unweighted values.
        advantages: [N] group-normalised advantages.
        group_size: ``G``.
        diagnostics: per-token values the objective reported during the update (first PPO epoch),
            name -> [N, C] (NaN, or False for masks, where not computed). CPPO: ``entropy`` (under
            ``I``), ``entropy_removed`` (under ``I-``), ``perception_mask``.
        sampler_logprobs: [N, C] log-probs the rollout engine reported for its samples (None for HF).
        sampler_logprob_mismatch: mean ``|lp_sampler - lp_policy|`` over response tokens, set by the
            update when the engine is not the policy.
    """

    example_rows: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    completions: list[str]
    rewards: Tensor
    reward_terms: dict[str, Tensor]
    advantages: Tensor
    group_size: int
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    batch: PromptBatch | None = field(default=None, repr=False)
    sampler_logprobs: Tensor | None = None
    sampler_logprob_mismatch: Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def entropy(self) -> Tensor | None:
        """[N, C] full-vocabulary entropy under the original image (CPPO), from the update."""
        return self.diagnostics.get("entropy")

    @property
    def entropy_removed(self) -> Tensor | None:
        """[N, C] entropy under ``I-`` (NaN for rows where it was not computed)."""
        return self.diagnostics.get("entropy_removed")

    @property
    def perception_mask(self) -> Tensor | None:
        """[N, C] bool, the perception tokens CPPO used."""
        return self.diagnostics.get("perception_mask")

    def record(self, diagnostics: Mapping[str, Tensor], rows: Tensor) -> None:
        """Store an objective's per-token diagnostics ([R, T] for rollout ``rows``) in ``diagnostics``."""
        for name, values in diagnostics.items():
            buffer = self.diagnostics.get(name)
            if buffer is None:
                fill = False if values.dtype == torch.bool else float("nan")
                dtype = torch.bool if values.dtype == torch.bool else torch.float32
                buffer = torch.full(self.completion_ids.shape, fill, dtype=dtype, device=values.device)
                self.diagnostics[name] = buffer
            buffer[rows, : values.shape[1]] = values.detach().to(buffer.dtype)


def decode(tokenizer, completion_ids: Tensor, mask: Tensor) -> list[str]:
    """Decode completions, dropping special tokens and everything after EOS."""
    return [
        tokenizer.decode(ids[row_mask].tolist(), skip_special_tokens=True)
        for ids, row_mask in zip(completion_ids.cpu(), mask.cpu())
    ]


def repeat_rows(batch: PromptBatch, samples: int, device: torch.device) -> Tensor:
    """[B * samples] prompt index of each sample: ``0, 0, ..., 1, 1, ...``."""
    return torch.arange(len(batch), device=device).repeat_interleave(samples)


# Names that moved out in 0.3 (one home per concept), importable from here for one version.
_MOVED = {
    "RolloutConfig": ("cppo_lightning.sampling", "RolloutConfig"),
    "EvaluationSampling": ("cppo_lightning.sampling", "EvaluationSampling"),
    "sampling_problems": ("cppo_lightning.sampling", "sampling_problems"),
    "derived_seed": ("cppo_lightning.seeding", "derived_seed"),
    "seeded": ("cppo_lightning.seeding", "seeded"),
    "generate": ("cppo_lightning.engines.hf", "generate"),
    "sampling_mode": ("cppo_lightning.engines.hf", "sampling_mode"),
    "RewardModel": ("cppo_lightning.rewards", "RewardFunctions"),
    "reward_inputs": ("cppo_lightning.rewards", "reward_inputs"),
}


def __getattr__(name: str):
    if name in _MOVED:
        module, new = _MOVED[name]
        warnings.warn(
            f"cppo_lightning.rollout.{name} moved to {module}.{new}; the old name goes in the next version",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(__import__(module, fromlist=[new]), new)
    raise AttributeError(f"module 'cppo_lightning.rollout' has no attribute {name!r}")
