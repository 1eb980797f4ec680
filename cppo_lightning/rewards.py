"""Verifiable rewards: last-``\\boxed{}`` accuracy graded with math-verify, and the think/boxed format.

A reward function is any callable ``fn(prompts, completions, answers, **columns) -> list[float]``:
``prompts`` are the question texts, ``completions`` the decoded samples (one per rollout), ``answers``
the reference answers aligned with them, and ``columns`` any other dataset columns (also aligned, one
entry per rollout). Write one in your own module and name it by import path in the YAML.

The release's reward is ``0.9 * accuracy + 0.1 * format``.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

_FORMAT = re.compile(r"\s*<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")


class RewardFunction(Protocol):
    """The signature every reward function has."""

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str], **columns
    ) -> list[float]: ...


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None.

    >>> extract_boxed(r"so \\boxed{1} no, \\boxed{\\frac{1}{2}}")
    '\\\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, position = 0, start + len("\\boxed")
        for index in range(position, len(text)):
            if text[index] == "{":
                depth += 1
            elif text[index] == "}":
                depth -= 1
                if depth == 0:
                    return text[position + 1 : index].strip()
        # Unbalanced: look for an earlier, complete one.
        start = text.rfind("\\boxed{", 0, start)
    return None


def normalize_answer(answer: str) -> str:
    """Lower-case; unwrap ``\\text{}``, ``$`` and a single ``\\boxed{}``; drop spaces, outer parentheses, a final period."""
    boxed = extract_boxed(answer)
    if boxed is not None and answer.strip().startswith("\\boxed{"):
        answer = boxed
    answer = _TEXT_WRAPPERS.sub(r"\1", answer)
    answer = answer.replace("$", "").strip().rstrip(".").strip().lower()
    answer = re.sub(r"\s+", "", answer)
    if len(answer) > 2 and answer[0] == "(" and answer[-1] == ")":
        answer = answer[1:-1]
    return answer


def answers_match(predicted: str, reference: str) -> bool:
    """Whether a predicted answer equals the reference.

    Exact match after :func:`normalize_answer` (words, options, yes/no), else mathematical equivalence
    by math-verify (``1/2`` = ``0.5`` = ``\\frac{1}{2}``).
    """
    if not predicted:
        return False
    if normalize_answer(predicted) == normalize_answer(reference):
        return True
    from math_verify import parse, verify

    def as_latex(text: str) -> str:
        return text if "\\boxed" in text or "$" in text else f"${text}$"

    try:
        gold = parse(as_latex(reference))
        guess = parse(as_latex(predicted))
        return bool(gold) and bool(guess) and bool(verify(gold, guess))
    except Exception as error:  # a grader failure is a wrong answer, not a crashed run
        log.debug("math-verify failed on %r vs %r: %s", predicted, reference, error)
        return False


def accuracy_reward(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str], **columns
) -> list[float]:
    """1.0 when the last ``\\boxed{}`` of the completion matches the reference answer, else 0.0."""
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        predicted = extract_boxed(completion)
        rewards.append(float(predicted is not None and answers_match(predicted, answer)))
    return rewards


def format_reward(
    prompts: Sequence[str], completions: Sequence[str], answers: Sequence[str], **columns
) -> list[float]:
    """1.0 when the completion is ``<think>...</think>`` followed by text containing ``\\boxed{...}``."""
    return [float(_FORMAT.fullmatch(completion) is not None) for completion in completions]


#: The release's reward: ``0.9 * accuracy + 0.1 * format``.
DEFAULT_REWARDS = {"cppo_lightning.rewards.accuracy_reward": 0.9, "cppo_lightning.rewards.format_reward": 0.1}


def resolve_reward_function(spec: str | Callable) -> tuple[str, Callable]:
    """``(name, callable)`` for an import path (``package.module.function``) or a callable.

    Raises:
        ValueError: the path cannot be imported or does not name a callable.
    """
    if callable(spec):
        return getattr(spec, "__name__", type(spec).__name__), spec
    module_name, _, attribute = str(spec).rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"reward function {spec!r} cannot be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"reward function {spec!r} is not callable")
    return attribute, function


def short_name(name: str) -> str:
    """Metric name of a reward function: ``accuracy_reward`` -> ``accuracy``."""
    return name.removesuffix("_reward")
