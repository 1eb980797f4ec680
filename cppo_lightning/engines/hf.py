"""Sampling with Hugging Face ``generate`` on the trained policy itself (the default engine)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cppo_lightning.batch import ORIGINAL, PromptBatch
from cppo_lightning.engines.base import Generation, eos_and_pad
from cppo_lightning.models.loading import Policy
from cppo_lightning.rollout import RolloutConfig, generate, sampling_mode


class HFEngine:
    """``policy.model.generate`` on the original view, one row per rollout.

    The sampler is the trained network, so nothing needs syncing and ``lp_old == lp.detach()`` holds
    exactly with one optimizer step per rollout batch. Sampling draws from torch's global generator,
    which the module seeds per step and rank; ``seed`` is therefore not used. The vision inputs are
    repeated for every row (each prompt's image is encoded ``G`` times).

    Args:
        synced_gpus: whether every rank must run the same number of decoding steps (sharded
            strategies: FSDP, DeepSpeed); a callable is asked at every call.
    """

    samples_from_policy = True

    def __init__(self, synced_gpus: bool | Callable[[], bool] = False) -> None:
        self.synced_gpus = synced_gpus

    def generate(
        self, policy: Policy, batch: PromptBatch, example_rows: Tensor, config: RolloutConfig, seed: int
    ) -> Generation:
        """See :meth:`cppo_lightning.engines.RolloutEngine.generate` (``sampler_logprobs`` is None)."""
        eos, pad = eos_and_pad(policy)
        synced = self.synced_gpus() if callable(self.synced_gpus) else self.synced_gpus
        # Rows in calls of at most `generation_rollouts` (the KV cache grows with the rows decoded at once).
        # Under synced_gpus every rank makes as many calls: ranks hold equal batches.
        step = config.generation_rollouts or max(1, len(example_rows))
        parts = []
        with sampling_mode(policy.model):
            for start in range(0, max(1, len(example_rows)), step):
                rows = example_rows[start : start + step]
                parts.append(
                    generate(
                        policy.model, batch.model_inputs(ORIGINAL, rows), config, eos, pad, synced_gpus=synced
                    )
                )
        if len(parts) == 1:
            completion, mask = parts[0]
        else:
            width = max(ids.shape[1] for ids, _ in parts)
            completion = torch.cat([pad_right(ids, width, pad) for ids, _ in parts])
            mask = torch.cat([pad_right(part_mask, width, False) for _, part_mask in parts])
        return Generation(completion_ids=completion, completion_mask=mask)

    def sync(self, policy: Policy) -> None:
        """Nothing to do: the sampler is the policy."""


def pad_right(tensor: Tensor, width: int, value: int | bool) -> Tensor:
    """``[R, C]`` padded on the right with ``value`` to ``[R, width]``."""
    if tensor.shape[1] == width:
        return tensor
    padding = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), value)
    return torch.cat([tensor, padding], dim=1)
