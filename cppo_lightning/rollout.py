"""Sampling rollouts and scoring them with reward functions.

A :class:`Rollout` is what one RL step works on: ``G`` sampled completions for each prompt of a
:class:`~cppo_lightning.batch.PromptBatch`, their rewards and advantages. The module keeps the last one
(with entropies and the perception mask after the update) where callbacks can read it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from transformers import LogitsProcessorList

from cppo_lightning.batch import PromptBatch
from cppo_lightning.engines.config import VLLMConfig
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
        engine: what samples: ``"hf"`` (``generate`` on the trained policy) or ``"vllm"`` (vLLM colocated
            in the training process, synced after every optimizer step; needs the ``[vllm]`` extra).
        vllm: options of the vLLM engine (:class:`~cppo_lightning.engines.VLLMConfig`).
        generation_rollouts: at most this many rollouts per ``generate`` call of the ``hf`` engine (None:
            the whole batch in one call). Generation holds a KV cache for every row it decodes, so this
            bounds generation memory the way ``update.max_tokens_per_forward`` bounds the update's; the
            completions of several calls are padded to one length. vLLM schedules its own batches within
            ``vllm.kv_cache_memory_gb``, so this is refused with ``engine: vllm``.
    """

    samples_per_prompt: int = 5
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024
    engine: Literal["hf", "vllm"] = "hf"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    min_new_tokens: int = 0
    generation_rollouts: int | None = None

    def __post_init__(self) -> None:
        # From a checkpoint's hyperparameters the nested options arrive as a plain dict.
        if isinstance(self.vllm, Mapping):
            self.vllm = VLLMConfig(**self.vllm)
        if self.engine not in ("hf", "vllm"):
            raise ValueError(f"model.rollout.engine must be 'hf' or 'vllm', got {self.engine!r}")
        # Refused here, at start-up: otherwise they fail after the model, the data and a whole rollout.
        problems = sampling_problems(
            self.samples_per_prompt, self.temperature, self.top_p, self.max_new_tokens, greedy=self._greedy
        )
        limit = self.max_new_tokens if isinstance(self.max_new_tokens, int) else math.inf
        if not isinstance(self.min_new_tokens, int) or not 0 <= self.min_new_tokens <= limit:
            problems.append(
                f"min_new_tokens must be an integer in 0..max_new_tokens ({self.max_new_tokens}), "
                f"got {self.min_new_tokens!r}"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.generation_rollouts is not None:
            count = self.generation_rollouts
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                problems.append(
                    f"generation_rollouts must be an integer >= 1 or null, got {self.generation_rollouts!r}"
                )
            elif self.engine == "vllm":
                problems.append(
                    "generation_rollouts applies to engine: hf; vLLM batches within vllm.kv_cache_memory_gb "
                    "(set generation_rollouts: null)"
                )
        if problems:
            raise ValueError("rollout: " + "; ".join(problems))

    #: Training rollouts are sampled: their log-probs are computed from logits divided by the temperature.
    _greedy = False


@dataclass
class EvaluationSampling(RolloutConfig):
    """Sampling settings of validation and test: as :class:`RolloutConfig`, and temperature 0 is greedy."""

    _greedy = True


def sampling_problems(
    samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int | None,
    samples_name: str = "samples_per_prompt",
    greedy: bool = False,
) -> list[str]:
    """What is wrong with sampling settings (empty when nothing): shared by rollouts and evaluation.

    ``greedy`` allows ``temperature`` 0 (greedy decoding: evaluation only).
    """
    problems = []
    if not isinstance(samples, int) or samples < 1:
        problems.append(f"{samples_name} must be an integer >= 1, got {samples!r}")
    finite = isinstance(temperature, numbers.Real) and math.isfinite(temperature)
    if greedy and finite and temperature == 0:
        pass
    elif not finite or temperature <= 0:
        problems.append(
            f"temperature must be a finite number > 0, got {temperature!r} (completions are sampled, and "
            "their log-probs are computed from logits divided by the temperature)"
            + ("" if not greedy else "; 0 means greedy decoding")
        )
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1] (1: off), got {top_p!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
        problems.append(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return problems


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
    samples: int = 1,
    logits_processor: list | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample ``samples`` completions per input row (consecutive rows of the output).

    ``generate`` encodes each row's image and prefills its prompt once, then expands the batch ``samples``
    times: the same completions as ``samples`` repeated input rows, at a fraction of the prefill.
    ``logits_processor``: transformers logits processors run at every decoding step, after the
    generation config's own and before the sampling warpers (temperature, top-k, top-p).

    Returns:
        ``(completion_ids [R, C], completion_mask [R, C])``.
    """
    sampling = config.temperature > 0
    kwargs = dict(do_sample=sampling, max_new_tokens=config.max_new_tokens, use_cache=True)
    if config.min_new_tokens:
        kwargs["min_new_tokens"] = config.min_new_tokens
    if sampling:
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    if samples > 1 and sampling:
        kwargs["num_return_sequences"] = samples
    if logits_processor:
        kwargs["logits_processor"] = LogitsProcessorList(logits_processor)
    sequences = model.generate(
        **inputs, eos_token_id=eos_token_ids, pad_token_id=pad_token_id, synced_gpus=synced_gpus, **kwargs
    )
    if samples > 1 and not sampling:  # greedy: the samples of a prompt are one completion, decoded once
        sequences = sequences.repeat_interleave(samples, dim=0)
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
            TypeError: a reward function returned something other than numbers (None, strings ...); the
                message names the function and shows the value.
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
            values = _reward_values(name, values, len(completions))
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


def _reward_values(name: str, values, expected: int) -> Tensor:
    """``values`` as a float tensor of ``expected`` numbers, or an error naming the function and the value."""
    shown = repr(values) if len(repr(values)) <= 200 else repr(values)[:200] + "..."
    if isinstance(values, (Tensor, np.ndarray)):
        values = values.tolist() if values.ndim == 1 else values
    if not isinstance(values, (list, tuple)):
        raise TypeError(
            f"reward function {name!r} returned {shown} ({type(values).__name__}); it must return a list of "
            f"{expected} numbers, one per completion"
        )
    if len(values) != expected:
        raise ValueError(
            f"reward function {name!r} returned {len(values)} values for {expected} completions: {shown}"
        )
    for index, value in enumerate(values):
        if isinstance(value, (Tensor, np.ndarray)) and getattr(value, "ndim", 1) == 0:
            value = value.item()
        if not isinstance(value, numbers.Real):  # None, strings, nested lists; bool is a Real (0/1)
            raise TypeError(
                f"reward function {name!r} returned {shown}: value {index} is {value!r} "
                f"({type(value).__name__}), not a number"
            )
    return torch.as_tensor([float(value) for value in values], dtype=torch.float32)


def decode(tokenizer, completion_ids: Tensor, mask: Tensor) -> list[str]:
    """Decode completions, dropping special tokens and everything after EOS."""
    return [
        tokenizer.decode(ids[row_mask].tolist(), skip_special_tokens=True)
        for ids, row_mask in zip(completion_ids.cpu(), mask.cpu())
    ]


def repeat_rows(batch: PromptBatch, samples: int, device: torch.device) -> Tensor:
    """[B * samples] prompt index of each sample: ``0, 0, ..., 1, 1, ...``."""
    return torch.arange(len(batch), device=device).repeat_interleave(samples)
