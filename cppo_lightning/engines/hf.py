"""Sampling with Hugging Face ``generate`` on the trained policy itself (the default engine)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cppo_lightning.batch import ORIGINAL, PromptBatch
from cppo_lightning.engines.base import Generation, eos_and_pad
from cppo_lightning.models.loading import Policy
from cppo_lightning.rollout import RolloutConfig, generate, sampling_mode
from cppo_lightning.sharding import run_gathered


class HFEngine:
    """``policy.model.generate`` on the original view, one row per rollout.

    The sampler is the trained network, so nothing needs syncing and ``lp_old == lp.detach()`` holds
    exactly with one optimizer step per rollout batch. Sampling draws from torch's global generator,
    which the module seeds per step and rank; ``seed`` is therefore not used. A call whose rows are runs
    of one prompt each (``G`` rollouts per prompt) passes each prompt once with
    ``num_return_sequences``: ``generate`` encodes its image and prefills it once, then samples the
    same completions as repeated rows would (tested).

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
        step = config.generation_rollouts or max(1, len(example_rows))
        calls = -(-max(1, len(example_rows)) // step)
        if synced:
            # Under synced_gpus every call's decoding steps are collectives: each rank must make as many
            # calls, also when a rank holds fewer rows (its extra calls decode a row again, discarded).
            calls = most_calls(calls, next(policy.model.parameters()).device)
        parts = []
        with sampling_mode(policy.model):
            for call in range(calls):
                start = call * step
                rows = example_rows[start : start + step] if start < len(example_rows) else example_rows[-1:]
                prompts, samples = prompt_runs(rows)
                # Under FSDP2 the root unit (embeddings, head) is gathered once per call, the layers at
                # every decoding step (synced_gpus keeps the ranks in step).
                generated = run_gathered(
                    policy.model,
                    generate,
                    policy.model,
                    batch.model_inputs(ORIGINAL, prompts),
                    config,
                    eos,
                    pad,
                    synced_gpus=synced,
                    samples=samples,
                )
                if start < len(example_rows) or not parts:
                    parts.append(generated)
        if len(parts) == 1:
            completion, mask = parts[0]
        else:
            width = max(ids.shape[1] for ids, _ in parts)
            completion = torch.cat([pad_right(ids, width, pad) for ids, _ in parts])
            mask = torch.cat([pad_right(part_mask, width, False) for _, part_mask in parts])
        return Generation(completion_ids=completion, completion_mask=mask)

    def sync(self, policy: Policy) -> None:
        """Nothing to do: the sampler is the policy."""


def prompt_runs(rows: Tensor) -> tuple[Tensor, int]:
    """``(prompts, k)`` when ``rows`` is runs of ``k`` equal prompts each, else ``(rows, 1)``."""
    values = rows.tolist()
    changes = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
    starts = [0, *changes]
    lengths = {end - begin for begin, end in zip(starts, [*changes, len(values)])}
    if len(lengths) != 1 or len(set(values)) != len(starts):
        return rows, 1
    return rows[starts], lengths.pop()


def pad_right(tensor: Tensor, width: int, value: int | bool) -> Tensor:
    """``[R, C]`` padded on the right with ``value`` to ``[R, width]``."""
    if tensor.shape[1] == width:
        return tensor
    padding = tensor.new_full((tensor.shape[0], width - tensor.shape[1]), value)
    return torch.cat([tensor, padding], dim=1)


def most_calls(calls: int, device: torch.device) -> int:
    """The largest number of ``generate`` calls of any rank (``calls`` itself outside distributed runs)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return calls
    count = torch.tensor([calls], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())
