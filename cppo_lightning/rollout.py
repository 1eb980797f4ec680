"""Sampling rollouts and scoring them with reward functions.

A :class:`Rollout` is what one RL step works on: ``G`` sampled completions for each prompt of a
:class:`~cppo_lightning.batch.PromptBatch`, their rewards and advantages. The module keeps the last one
(with entropies and the perception mask after the update) where callbacks can read it.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from cppo_lightning.batch import PromptBatch
from cppo_lightning.models.scoring import completion_mask
from cppo_lightning.rewards import resolve_reward_function, short_name


@dataclass
class RolloutConfig:
    """How rollouts are sampled.

    Args:
        samples_per_prompt: ``G``, completions sampled for each prompt (the release uses 5).
        temperature: sampling temperature (also divides the logits when re-scoring).
        top_p: nucleus sampling threshold (1.0: off).
        top_k: top-k sampling (0: off).
        max_new_tokens: completion length limit.
        min_new_tokens: sample at least this many tokens (end-of-sequence tokens are masked until then);
            equal to ``max_new_tokens``, every completion has exactly that length (benchmarks use this
            to measure a given length with a random model). 0: no minimum.
    """

    samples_per_prompt: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"rollout: min_new_tokens must be in 0..max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens}"
            )


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


def derived_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes and Python runs."""
    words = [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Run a block with torch's RNG (CPU and the current CUDA device) seeded, then restore it."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def sampling_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradient for ``generate``; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    config: RolloutConfig,
    eos_token_ids: list[int],
    pad_token_id: int,
    synced_gpus: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample one completion per input row.

    Returns:
        ``(completion_ids [R, C], completion_mask [R, C])``.
    """
    sampling = config.temperature > 0
    kwargs = dict(do_sample=sampling, max_new_tokens=config.max_new_tokens, use_cache=True)
    if config.min_new_tokens:
        kwargs["min_new_tokens"] = config.min_new_tokens
    if sampling:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    sequences = model.generate(
        **inputs, eos_token_id=eos_token_ids, pad_token_id=pad_token_id, synced_gpus=synced_gpus, **kwargs
    )
    completion = sequences[:, inputs["input_ids"].shape[1] :]
    return completion, completion_mask(completion, eos_token_ids)


class RewardModel:
    """Weighted reward functions, called with the prompts, completions, answers and dataset columns.

    Args:
        functions: import path (or callable) -> weight.
    """

    def __init__(self, functions: Mapping[str | Callable, float]) -> None:
        if not functions:
            raise ValueError("at least one reward function is needed")
        self.functions: list[tuple[str, Callable, float]] = []
        self.paths: list[str] = []
        for spec, weight in functions.items():
            name, function = resolve_reward_function(spec)
            self.functions.append((short_name(name), function, float(weight)))
            self.paths.append(
                spec if isinstance(spec, str) else f"{function.__module__}.{function.__qualname__}"
            )

    def specification(self) -> dict[str, float]:
        """Import path -> weight (what the YAML says; callables by their qualified name)."""
        return {path: weight for path, (_, _, weight) in zip(self.paths, self.functions)}

    def __call__(
        self, batch: PromptBatch, example_rows: Tensor, completions: list[str]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Rewards of completions of the batch's prompts.

        Args:
            batch: the prompts.
            example_rows: [N] prompt index of each completion.
            completions: N decoded completions.

        Returns:
            ``(rewards [N], terms)``: the weighted sum and each function's values.

        Raises:
            RuntimeError: a reward function raised (the message names it).
            ValueError: a reward function returned the wrong number of values or a non-finite one.
        """
        prompts, columns = reward_inputs(batch, example_rows)
        total = torch.zeros(len(completions), dtype=torch.float32)
        terms = {}
        for name, function, weight in self.functions:
            try:
                values = function(prompts, completions, **columns)
            except Exception as error:
                raise RuntimeError(
                    f"reward function {name!r} raised {type(error).__name__}: {error}"
                ) from error
            values = torch.as_tensor(list(values), dtype=torch.float32)
            if values.shape != (len(completions),):
                raise ValueError(
                    f"reward function {name!r} returned {values.numel()} values for {len(completions)} completions"
                )
            if not torch.isfinite(values).all():
                raise ValueError(f"reward function {name!r} returned non-finite values: {values.tolist()}")
            terms[name] = values
            total += weight * values
        return total, terms


def reward_inputs(batch: PromptBatch, example_rows: Tensor) -> tuple[list[str], dict[str, list]]:
    """What a reward function is called with besides the completions, one entry per completion.

    Args:
        batch: the prompts.
        example_rows: [N] prompt index of each completion.

    Returns:
        ``(prompts, columns)``: the questions, and ``answers``, ``ids`` and every metadata column of the
        batch (None where an example lacks it), for ``fn(prompts, completions, **columns)``.
    """
    rows = example_rows.tolist()
    columns: dict[str, list] = {
        "answers": [batch.answers[i] for i in rows],
        "ids": [batch.ids[i] for i in rows],
    }
    for key in sorted({key for metadata in batch.metadata for key in metadata}):
        columns.setdefault(key, [batch.metadata[i].get(key) for i in rows])
    return [batch.questions[i] if batch.questions else "" for i in rows], columns


def decode(tokenizer, completion_ids: Tensor, mask: Tensor) -> list[str]:
    """Decode completions, dropping special tokens and everything after EOS."""
    return [
        tokenizer.decode(ids[row_mask].tolist(), skip_special_tokens=True)
        for ids, row_mask in zip(completion_ids.cpu(), mask.cpu())
    ]


def repeat_rows(batch: PromptBatch, samples: int, device: torch.device) -> Tensor:
    """[B * samples] prompt index of each sample: ``0, 0, ..., 1, 1, ...``."""
    return torch.arange(len(batch), device=device).repeat_interleave(samples)
