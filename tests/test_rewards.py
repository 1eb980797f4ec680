"""Verifiable rewards: the last \\boxed{} answer (mathruler's extraction), the graders, the release's format check.

The two graders on tricky pairs and multiple-choice grading: tests/test_graders.py.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cppo_lightning.graders import math_verify_grade
from cppo_lightning.rewards import (
    accuracy_reward,
    extract_boxed,
    format_reward,
    normalize_answer,
    resolve_reward_function,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{3}", "3"),
        (r"first \boxed{1} then \boxed{2}", "2"),  # the last one counts
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
        (r"\boxed{ red }", "red"),
        (r"no box here", None),
        (r"\boxed{unclosed", None),
        (r"\boxed{a} and \boxed{broken", None),  # only the last box counts, as in mathruler
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@given(st.text(alphabet=st.characters(blacklist_characters="{}\\"), max_size=20))
def test_extract_boxed_returns_what_was_boxed(content):
    assert extract_boxed(f"<think>x</think> \\boxed{{{content}}}") == content.strip()


@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        ("red", "red", True),
        ("Red", "red", True),
        ("yes", "no", False),
        ("(B)", "B", True),
        (r"\text{blue}", "blue", True),
        ("3", r"\boxed{3}", True),  # ViRL39K references are boxed
        ("0.5", r"\frac{1}{2}", True),  # math-verify equivalence
        ("1/2", "0.5", True),
        ("12", "13", False),
        ("", "3", False),
        ("3.", "3", True),
    ],
)
def test_answers_match(predicted, reference, expected):
    assert math_verify_grade(predicted, reference) is expected


def test_the_old_name_answers_match_warns_and_still_grades():
    import cppo_lightning.rewards as rewards

    with pytest.warns(DeprecationWarning, match="math_verify_grade"):
        assert rewards.answers_match("1/2", "0.5") is True


def test_accuracy_reward_grades_the_last_box():
    completions = [r"<think>..</think> \boxed{2}", r"\boxed{2} no wait \boxed{3}", "2", r"\boxed{}"]
    assert accuracy_reward(["q"] * 4, completions, answers=["2", "2", "2", "2"]) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (r"<think> I count. </think> The answer is \boxed{3}.", 1.0),
        ("<think>\nmulti\nline\n</think>\n\\boxed{red}", 1.0),
        (r"\boxed{3}", 0.0),  # no reasoning block
        (r"<think> x </think> 3", 0.0),  # no box
        (r"\boxed{3} <think> x </think>", 0.0),  # box before the reasoning
        ("\n<think> x </think> \\boxed{3}", 0.0),  # the release's fullmatch: nothing before <think>
        (r"<think> x </think> \boxed{3} trailing text", 1.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(["q"], [completion], answers=["3"]) == [expected]


def test_normalize_answer():
    assert normalize_answer(r"\boxed{ (C) }") == "c"
    assert normalize_answer("$ 17 $") == "17"


def test_reward_function_by_import_path_or_callable():
    assert resolve_reward_function("cppo_lightning.rewards.format_reward") == ("format_reward", format_reward)
    assert resolve_reward_function(format_reward)[1] is format_reward
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve_reward_function("cppo_lightning.rewards.no_such_reward")


def test_each_grader_has_its_evaluation_reward():
    from cppo_lightning.graders import GRADERS
    from cppo_lightning.rewards import EVALUATION_REWARDS, evaluation_reward

    assert set(EVALUATION_REWARDS) == set(GRADERS)
    assert evaluation_reward("mathruler") == "cppo_lightning.rewards.choice_accuracy_reward"
    assert evaluation_reward("math-verify") == "cppo_lightning.rewards.math_verify_choice_accuracy_reward"
    for grader, path in EVALUATION_REWARDS.items():
        assert callable(resolve_reward_function(path)[1])
    with pytest.raises(ValueError, match="unknown grader 'sympy'"):
        evaluation_reward("sympy")
