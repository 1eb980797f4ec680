"""Sampling with Hugging Face ``generate`` on the trained policy itself (the default engine)."""

from __future__ import annotations

from collections.abc import Callable

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
        with sampling_mode(policy.model):
            completion, mask = generate(
                policy.model,
                batch.model_inputs(ORIGINAL, example_rows),
                config,
                eos,
                pad,
                synced_gpus=synced,
            )
        return Generation(completion_ids=completion, completion_mask=mask)

    def sync(self, policy: Policy) -> None:
        """Nothing to do: the sampler is the policy."""
