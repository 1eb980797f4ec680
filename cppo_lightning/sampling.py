"""How completions are sampled: the rollout settings of training, and those of validation and test.

The settings are plain dataclasses, checked when they are built (so a bad value fails at start-up,
before any model is loaded); what samples them is a rollout engine (:mod:`cppo_lightning.engines`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from cppo_lightning.engines.config import VLLMConfig

__all__ = ["EvaluationConfig", "EvaluationSampling", "RolloutConfig", "sampling_problems"]


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
class EvaluationConfig:
    """Validation and test: avg@k accuracy.

    Args:
        samples_per_question: ``k`` samples per question.
        temperature: sampling temperature (1.0 in the papers' protocol; 0: greedy decoding).
        top_p: nucleus sampling threshold.
        max_new_tokens: completion length limit (None: the rollout's).
        reward: import path of the 0/1 grading function.
    """

    samples_per_question: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None
    reward: str = "cppo_lightning.rewards.accuracy_reward"

    def __post_init__(self) -> None:
        problems = sampling_problems(
            self.samples_per_question,
            self.temperature,
            self.top_p,
            self.max_new_tokens,
            "samples_per_question",
            greedy=True,
        )
        if problems:
            raise ValueError("evaluation: " + "; ".join(problems))

    def sampling(self, rollout: RolloutConfig) -> EvaluationSampling:
        """The sampling settings of an evaluation step: these, with the training rollout's engine, its
        options and its bound on rows decoded at once (the card's, not the stage's)."""
        return EvaluationSampling(
            samples_per_prompt=self.samples_per_question,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens or rollout.max_new_tokens,
            engine=rollout.engine,
            vllm=rollout.vllm,
            generation_rollouts=rollout.generation_rollouts,
        )
