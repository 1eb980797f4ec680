"""Verifiable rewards, as in the release: last-``\\boxed{}`` accuracy and the think/boxed format.

A reward function is any callable ``fn(prompts, completions, answers, **columns) -> list[float]``:
``prompts`` are the question texts, ``completions`` the decoded samples (one per rollout), ``answers``
the reference answers aligned with them, and ``columns`` any other dataset columns (also aligned, one
entry per rollout). Write one in your own module and name it by import path in the YAML.

The release's reward (``vbdi/cppo``, ``recipe/cppo/reward.py``, the same as EasyR1's) is
``0.9 * accuracy + 0.1 * format`` with

- accuracy: mathruler's ``grade_answer(extract_boxed_content(completion), answer)``; the grader is a
  named choice (:mod:`cppo_lightning.graders`): ``accuracy_reward`` uses ``"mathruler"``,
  ``math_verify_accuracy_reward`` the more lenient ``"math-verify"``;
- format: ``re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", completion, re.DOTALL)``.

Benchmarks with multiple-choice questions are graded by :func:`choice_accuracy_reward` (option letter or
option text, from a ``choices`` column).
"""

from __future__ import annotations

import importlib
import json
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from cppo_lightning.graders import (
    get_grader,
    grade_choice,
    math_verify_grade,
    normalize_answer,
    parse_choices,
)

if TYPE_CHECKING:
    from cppo_lightning.batch import PromptBatch

# The release's pattern, matched with fullmatch: nothing (not even whitespace) before <think>.
_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_BOXED_NONE = re.compile(r"\\boxed\{\s*None\s*\}")


class RewardFunction(Protocol):
    """The signature every reward function has."""

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str], **columns
    ) -> list[float]: ...


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None; as mathruler extracts it.

    Only the last ``\\boxed{`` counts: when it is not closed the answer is missing (None), even if an
    earlier box is complete (mathruler's ``extract_boxed_content``, which the release grades with).

    >>> extract_boxed(r"so \\boxed{1} no, \\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    from mathruler.grader import extract_boxed_content

    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    content = extract_boxed_content(text)
    # mathruler returns the string "None" for a missing answer; a real \boxed{None} is an answer.
    if content == "None" and _BOXED_NONE.match(text, start) is None:
        return None
    return content


def reference_answer(answer: str) -> str:
    """The reference to grade against: the content of a boxed reference (ViRL39K's), else the answer.

    The release's ViRL39K preprocessing stores ``extract_boxed_content(answer)`` as ground truth.
    """
    if "\\boxed{" in answer:
        boxed = extract_boxed(answer)
        return boxed if boxed is not None else answer
    return answer


def accuracy_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str],
    grader: str = "mathruler",
    **columns,
) -> list[float]:
    """1.0 when the last ``\\boxed{}`` of the completion equals the reference answer, else 0.0.

    A completion without a complete last box scores 0 (also when the reference is literally "None",
    which the release would accept through mathruler's "None" placeholder).

    Args:
        prompts: questions (unused).
        completions: decoded samples.
        answers: reference answers, one per completion (a ``\\boxed{}`` reference is unwrapped).
        grader: ``"mathruler"`` (the release's) or ``"math-verify"``.
        **columns: other dataset columns (unused).
    """
    grade = get_grader(grader)
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        predicted = extract_boxed(completion)
        rewards.append(float(predicted is not None and grade(predicted, reference_answer(answer))))
    return rewards


def math_verify_accuracy_reward(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str], **columns
) -> list[float]:
    """:func:`accuracy_reward` graded by math-verify (the package's grader before the release's)."""
    return accuracy_reward(prompts, completions, answers, grader="math-verify", **columns)


def choice_accuracy_reward(
    prompts: Sequence[str],
    completions: Sequence[str],
    answers: Sequence[str],
    choices: Sequence | None = None,
    multiple_choice: Sequence[bool] | None = None,
    grader: str = "mathruler",
    **columns,
) -> list[float]:
    """Accuracy for benchmarks that mix multiple-choice and free-form questions.

    A multiple-choice question (``multiple_choice`` true, or ``choices`` not empty) is right when the
    last box names the correct option letter(s) or the correct option's text; any other question is
    graded as :func:`accuracy_reward`.

    Args:
        prompts: questions (unused).
        completions: decoded samples.
        answers: reference answers: a letter, a letter set (``"A, C"``) or the correct option's text.
        choices: per completion, the option texts (a list, or a JSON list as the benchmark data module
            stores it); empty for free-form questions.
        multiple_choice: per completion, whether the question is multiple choice (options may be shown
            only in the image, then only letters can be compared).
        grader: ``"mathruler"`` or ``"math-verify"``, for free-form answers and option texts.
        **columns: other dataset columns (unused).
    """
    grade = get_grader(grader)
    size = len(completions)
    choices = list(choices) if choices is not None else [None] * size
    multiple_choice = list(multiple_choice) if multiple_choice is not None else [None] * size
    rewards = []
    for completion, answer, options, is_choice in zip(
        completions, answers, choices, multiple_choice, strict=True
    ):
        predicted = extract_boxed(completion)
        if predicted is None:
            rewards.append(0.0)
            continue
        options = _decode_choices(options)
        reference = reference_answer(answer)
        if options or is_choice:
            rewards.append(float(grade_choice(predicted, reference, options, grade)))
        else:
            rewards.append(float(grade(predicted, reference)))
    return rewards


def math_verify_choice_accuracy_reward(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str], **columns
) -> list[float]:
    """:func:`choice_accuracy_reward` graded by math-verify."""
    return choice_accuracy_reward(prompts, completions, answers, grader="math-verify", **columns)


# Both graders log their accuracy as ``accuracy`` (``train/accuracy``); see resolve_reward_function.
math_verify_accuracy_reward.reward_name = "accuracy_reward"
math_verify_choice_accuracy_reward.reward_name = "choice_accuracy_reward"


def _decode_choices(value) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value else []
        except ValueError:
            return parse_choices(value)
    return parse_choices(value)


def format_reward(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str], **columns
) -> list[float]:
    """1.0 when the whole completion is ``<think>...</think>`` then text containing ``\\boxed{...}``.

    The release's ``re.fullmatch``: the completion must start with ``<think>`` (no leading whitespace).
    """
    return [float(_FORMAT.fullmatch(completion) is not None) for completion in completions]


#: The release's reward: ``0.9 * accuracy + 0.1 * format``.
DEFAULT_REWARDS = {"cppo_lightning.rewards.accuracy_reward": 0.9, "cppo_lightning.rewards.format_reward": 0.1}


#: The evaluation reward of each grader (``cppo evaluate --grader``, ``model.evaluation.reward``): multiple-
#: choice aware accuracy graded by that grader.
EVALUATION_REWARDS = {
    "mathruler": "cppo_lightning.rewards.choice_accuracy_reward",
    "math-verify": "cppo_lightning.rewards.math_verify_choice_accuracy_reward",
}


def evaluation_reward(grader: str) -> str:
    """The import path of the evaluation reward graded by ``grader`` (:data:`EVALUATION_REWARDS`).

    Raises:
        ValueError: an unknown grader (the message lists the known ones).
    """
    get_grader(grader)
    return EVALUATION_REWARDS[grader]


def resolve_reward_function(spec: str | Callable) -> tuple[str, Callable]:
    """``(name, callable)`` for an import path (``package.module.function``) or a callable.

    The name is the function's (attribute) name, or its ``reward_name`` attribute when it sets one: the
    math-verify variant of the accuracy reward is named ``accuracy_reward`` so its metric stays
    ``accuracy`` (list only one accuracy reward, or their metrics collide).

    Raises:
        ValueError: the path cannot be imported or does not name a callable.
    """
    if callable(spec):
        return getattr(spec, "reward_name", getattr(spec, "__name__", type(spec).__name__)), spec
    module_name, _, attribute = str(spec).rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"reward function {spec!r} cannot be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"reward function {spec!r} is not callable")
    return getattr(function, "reward_name", attribute), function


def short_name(name: str) -> str:
    """Metric name of a reward function: ``accuracy_reward`` -> ``accuracy``."""
    return name.removesuffix("_reward")


__all__ = [
    "DEFAULT_REWARDS",
    "EVALUATION_REWARDS",
    "RewardFunction",
    "accuracy_reward",
    "choice_accuracy_reward",
    "evaluation_reward",
    "extract_boxed",
    "format_reward",
    "math_verify_accuracy_reward",
    "math_verify_choice_accuracy_reward",
    "normalize_answer",
    "reference_answer",
    "resolve_reward_function",
    "short_name",
]


# ---------------------------------------------------------------------------------- weighted sum


class RewardFunctions:
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


def __getattr__(name: str):
    # The earlier grader's old name, importable for one version.
    if name == "answers_match":
        import warnings

        warnings.warn(
            "cppo_lightning.rewards.answers_match is deprecated: use cppo_lightning.graders.math_verify_grade",
            DeprecationWarning,
            stacklevel=2,
        )
        return math_verify_grade
    raise AttributeError(f"module 'cppo_lightning.rewards' has no attribute {name!r}")
