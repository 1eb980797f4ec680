"""The two graders on tricky answer pairs, and multiple-choice grading by letter and by text.

Each row of GRADER_TABLE says what each grader decides and why (mathruler's rules: string normalisation
that strips ``\\%``, ``\\$``, ``^\\circ``, a list of units, then sympy; an integer reference must be matched
by an integer string, fractions must be reduced the same way, ``^{`` and ``^NN`` are never evaluated.
math-verify: LaTeX parsing and symbolic equivalence, sets unordered, trailing period and ``\\text{}``
units dropped). The README's grader table lists the rows where they differ.
"""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cppo_lightning.graders import (
    choices_from_question,
    format_choices,
    get_grader,
    grade_choice,
    math_verify_grade,
    mathruler_grade,
    option_letters,
    parse_choices,
)
from cppo_lightning.rewards import (
    accuracy_reward,
    choice_accuracy_reward,
    extract_boxed,
    math_verify_accuracy_reward,
    resolve_reward_function,
)

# (predicted, reference, mathruler, math-verify, why)
GRADER_TABLE = [
    # numbers and their spellings
    ("5", "5", True, True, "identical"),
    ("5.0", "5", True, True, "mathruler turns an integral float into an int string"),
    ("5.00", "5", True, True, "same"),
    ("2+3", "5", False, True, "mathruler: an integer reference needs an integer string, no sympy"),
    ("2/4", "1/2", False, True, "mathruler: two fractions must be written the same (unreduced is wrong)"),
    ("1/2", "0.5", True, True, "sympy: 1/2 - 0.5 = 0"),
    ("0.5", "1/2", True, True, "same, the other way"),
    (r"\frac{1}{2}", "1/2", True, True, "LaTeX fraction"),
    (r"\dfrac{1}{2}", r"\frac12", True, True, "dfrac and brace-less frac"),
    ("0.5", r"50\%", False, True, "mathruler strips % without dividing: 0.5 vs the integer 50"),
    (r"50\%", "50", True, True, "mathruler strips %; math-verify too"),
    ("50%", "0.5", False, True, "mathruler: 50 (integer) vs 0.5"),
    ("60", "60°", False, True, "mathruler does not strip the degree sign, only ^\\circ and 'degree'"),
    (r"60^\circ", "60", True, True, "^\\circ is stripped by both"),
    ("60 degrees", "60", True, True, "'degree(s)' is in mathruler's unit list"),
    ("18 units", "18", False, True, "'units' is not in mathruler's unit list"),
    ("8 cm^2", "8", True, False, "mathruler strips 'cm^2'; math-verify reads c*m^2"),
    (r"8\text{ cm}^2", "8", True, True, "mathruler strips 'cm', math-verify the \\text unit"),
    ("1e3", "1000", True, False, "mathruler: float('1e3') = 1000; math-verify reads 1*e*3"),
    ("1,000", "1000", True, True, "thousands separator"),
    ("1000", "1,000", True, True, "same, in the reference"),
    (
        r"\$5",
        "5",
        True,
        False,
        "mathruler strips \\$; with a dollar sign math-verify gets no delimiters: no number",
    ),
    ("5 dollars", "5", False, False, "'dollars' is no unit for either"),
    ("\u22123", "-3", False, True, "Unicode minus: only math-verify normalises it"),
    ("3.14", r"\pi", False, False, "approximation"),
    (r"\pi", "3.14159", False, False, "approximation"),
    (r"2\pi", r"2 \pi", True, True, "spacing"),
    (r"\sqrt{2}", "1.414", False, False, "approximation"),
    (r"\sqrt{2}", r"\sqrt2", True, True, "brace-less sqrt"),
    (r"2\sqrt{3}", r"\sqrt{12}", True, True, "sympy: 2 sqrt 3 - sqrt 12 = 0"),
    ("x=5", "5", True, True, "a short 'x=' prefix is dropped by both"),
    ("5", "x=5", True, True, "same, in the reference"),
    ("(1,2)", "(1, 2)", True, True, "tuple spacing"),
    ("(2,1)", "(1,2)", False, False, "tuples are ordered"),
    ("[1,2]", "(1,2)", False, False, "closed vs open interval"),
    ("1, 2", "2, 1", False, True, "math-verify compares bare lists as sets"),
    (r"\{1,2\}", "{1,2}", True, True, "set braces"),
    ("x^2+2x+1", "(x+1)^2", True, True, "sympy expands"),
    ("2x", "x*2", True, True, "implicit multiplication"),
    ("a+b", "b+a", True, True, "commutativity"),
    ("0.333", "1/3", False, False, "approximation"),
    ("0.3333", r"\frac{1}{3}", False, False, "approximation"),
    (r"33.3\%", "1/3", False, False, "approximate percentage"),
    ("12", "12.0001", False, False, "close is not equal"),
    ("3.0", "3", True, True, "integral float"),
    ("007", "7", True, True, "leading zeros"),
    ("+5", "5", True, True, "explicit plus sign"),
    ("5.", "5", True, True, "trailing period after a number"),
    # words
    ("Yes", "yes", True, True, "case"),
    ("yes", "Yes.", False, True, "mathruler keeps the period of a word; math-verify drops it"),
    (r"\text{yes}", "yes", True, True, "\\text wrapper"),
    ("True", "yes", False, False, "different words"),
    ("red", "Red", True, True, "case"),
    ("the red one", "red", False, False, "extra words"),
    # option letters graded as plain answers (grade_choice below accepts more)
    ("B", "B", True, True, "identical"),
    ("(B)", "B", True, True, "parentheses around one element"),
    ("B.", "B", False, True, "mathruler keeps the period of a letter"),
    ("B) 5", "B", False, False, "label with text: only grade_choice reads it"),
    ("b", "B", True, True, "case"),
    ("Option B", "B", False, False, "a prefix word: only grade_choice reads it"),
    (r"\text{B}", "B", True, True, "\\text wrapper"),
    ("C", "B", False, False, "another option"),
    # LaTeX forms
    (r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt3}{2}", True, True, "nested brace-less sqrt"),
    (r"\left(1,2\right)", "(1,2)", True, True, "\\left/\\right"),
    ("10^3", "1000", False, True, "mathruler: integer reference, and ^NN is never evaluated"),
    ("10^{3}", "1000", False, True, "mathruler never evaluates ^{"),
    ("2^{10}", "1024", False, True, "same"),
    (r"\infty", r"\infty", True, True, "identical"),
    (r"\infty", "inf", True, True, "mathruler maps the infinity symbol to 'inf'"),
    (r"-\infty", "-inf", True, True, "same, negative"),
    (
        r"\emptyset",
        r"\varnothing",
        True,
        False,
        "both are the symbol ∅ for mathruler; math-verify: a variable",
    ),
    (r"3 \times 4", "12", False, True, "mathruler: integer reference needs an integer string"),
    (r"3\cdot 4", "12", False, True, "same"),
    (r"1\frac{1}{2}", "3/2", True, True, "mixed number in LaTeX"),
    ("1 1/2", "3/2", True, False, "mathruler reads '1 1/2' as 1 + 1/2; math-verify parses only the 1"),
    (r"\text{None}", "None", True, True, "the word None"),
    ("5 m/s", "5", False, False, "a unit neither strips"),
    (r"5\,\text{m}", "5", False, True, "math-verify drops \\text units; 'm' is not in mathruler's list"),
    ("45°", "45", False, True, "the degree sign again"),
    (r"\angle ABC = 45", "45", False, True, "mathruler drops only short left-hand sides"),
    ("2.5", "5/2", True, True, "sympy: 2.5 - 5/2 = 0"),
    ("1e-3", "0.001", True, False, "sympy reads 1e-3 as a float; math-verify as 1*e - 3"),
    (r"\log_2 8", "3", False, True, "mathruler: integer reference needs an integer string"),
    (r"\sin(30°)", "1/2", False, False, "the degree sign breaks both"),
]


def test_the_table_has_the_84_cases_and_25_disagreements():
    assert len(GRADER_TABLE) == 84
    assert len({(p, r) for p, r, *_ in GRADER_TABLE}) == 84
    assert sum(row[2] != row[3] for row in GRADER_TABLE) == 25


@pytest.mark.parametrize("predicted, reference, mathruler, math_verify, why", GRADER_TABLE)
def test_grader_table(predicted, reference, mathruler, math_verify, why):
    assert mathruler_grade(predicted, reference) is mathruler, why
    assert math_verify_grade(predicted, reference) is math_verify, why


def test_the_reward_uses_mathruler_by_default_and_math_verify_on_request():
    completions = [r"<think>x</think> \boxed{2+3}", r"<think>x</think> \boxed{1e3}"]
    answers = ["5", "1000"]
    assert accuracy_reward(["q"] * 2, completions, answers) == [0.0, 1.0]
    assert accuracy_reward(["q"] * 2, completions, answers, grader="math-verify") == [1.0, 0.0]
    assert math_verify_accuracy_reward(["q"] * 2, completions, answers) == [1.0, 0.0]
    # Both log as `accuracy`.
    assert (
        resolve_reward_function("cppo_lightning.rewards.math_verify_accuracy_reward")[0] == "accuracy_reward"
    )
    with pytest.raises(ValueError, match="unknown grader 'sympy'.*math-verify"):
        get_grader("sympy")


@pytest.mark.parametrize("grader", ["mathruler", "math-verify"])
def test_an_unbalanced_last_box_scores_zero_with_either_grader(grader):
    completions = [
        r"<think>..</think> \boxed{3} wait, \boxed{3",  # an earlier complete box does not rescue it
        r"<think>..</think> \boxed{\frac{1}{2}",
        r"<think>..</think> the answer is 3",  # no box at all
        r"<think>..</think> \boxed{3}",
    ]
    answers = ["3", r"\frac{1}{2}", "3", "3"]
    assert accuracy_reward(["q"] * 4, completions, answers, grader=grader) == [0.0, 0.0, 0.0, 1.0]


def test_no_box_scores_zero_even_for_the_reference_none():
    # mathruler's extract_boxed_content returns the string "None" when there is no box, which
    # grade_answer accepts against a reference "None"; a missing answer is not an answer here.
    assert accuracy_reward(["q"], ["<think>x</think> nothing boxed"], ["None"]) == [0.0]
    assert accuracy_reward(["q"], [r"<think>x</think> \boxed{None}"], ["None"]) == [1.0]
    assert extract_boxed(r"\boxed{None}") == "None" and extract_boxed(r"\boxed{None") is None


def test_a_boxed_reference_is_unwrapped_as_in_the_release_preprocessing():
    assert accuracy_reward(["q"], [r"\boxed{12}"], [r"\boxed{12}"]) == [1.0]
    assert accuracy_reward(["q"], [r"\boxed{12}"], [r"\boxed{13}"]) == [0.0]


@given(st.lists(st.sampled_from(["a", "{", "}", "\\", " ", "None", r"\boxed{"]), max_size=12).map("".join))
def test_extraction_is_mathrulers_except_for_its_none_placeholder(text):
    from mathruler.grader import extract_boxed_content

    ours = extract_boxed(text)
    theirs = extract_boxed_content(text)
    # The same content; where there is none, mathruler says "None" (and so it does for \boxed{None}).
    assert ours == theirs if ours is not None else theirs == "None"


# ------------------------------------------------------------------------------------------------
# Multiple choice
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (["3", "5", None, ""], ["3", "5"]),
        ("['$6', '$7', 'eight']", ["$6", "$7", "eight"]),  # MMMU-Pro stores the Python repr
        ('["1.8", "2.0"]', ["1.8", "2.0"]),
        ("A. 4cm; B. 5cm; C. 6cm; D. No correct answer", ["4cm", "5cm", "6cm", "No correct answer"]),
        ({"B": "5", "A": "3"}, ["3", "5"]),
        ("", []),
        (None, []),
        ("just text", []),
    ],
)
def test_parse_choices(value, expected):
    assert parse_choices(value) == expected


@pytest.mark.parametrize(
    "question, expected",
    [
        ("Find x.\nChoices:\nA:40°\nB:50°\nC:60°\nD:70°", ["40°", "50°", "60°", "70°"]),  # MathVerse
        ("Hint: ...\nQuestion: Which?\nChoices:\n(A) 1.8\n(B) 2.0\n(C) 2.2", ["1.8", "2.0", "2.2"]),
        ("Which shape? A. circle B. square C. star", ["circle", "square", "star"]),
        ("Point A: the vertex. What is the angle?", []),  # one label is not a list of options
        ("Select from A, B, C, D in the figure.", []),  # the options are in the image
    ],
)
def test_choices_from_question(question, expected):
    assert choices_from_question(question) == expected


def test_format_choices():
    assert format_choices(["3", "5"]) == "A. 3\nB. 5"


@pytest.mark.parametrize(
    "answer, count, expected",
    [
        ("B", 4, {"B"}),
        ("(b)", 4, {"B"}),
        ("B.", 4, {"B"}),
        ("Option B", 4, {"B"}),
        ("The answer is (C)", 4, {"C"}),
        (r"\text{B}", 4, {"B"}),
        ("B) 5", 4, {"B"}),
        ("(B) 5 cm", 4, {"B"}),
        ("A, C", 4, {"A", "C"}),
        ("A and C", 4, {"A", "C"}),
        ("E", 4, None),  # not an option
        ("b", None, None),  # a bare lower-case letter needs the option count
        ("5", 4, None),
        ("Blue", 4, None),
    ],
)
def test_option_letters(answer, count, expected):
    result = option_letters(answer, count)
    assert (set(result) if result is not None else None) == expected


CHOICES = ["3", "5", "7", r"\frac{1}{2}"]


@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        ("B", "B", True),  # letter vs letter
        ("5", "B", True),  # the option's text
        ("5.0", "B", True),  # the text, graded by the grader
        ("(B) 5", "B", True),  # label and text
        ("C", "B", False),
        ("7", "B", False),
        ("B", "5", True),  # MathVista: the reference is the option text
        ("5", "5", True),
        ("0.5", r"\frac{1}{2}", True),  # the text of option D by value
        ("D", r"\frac{1}{2}", True),
        ("A", r"\frac{1}{2}", False),
        ("B) 7", "B", True),  # the label decides when label and text disagree
        ("", "B", False),
    ],
)
def test_grade_choice_by_letter_and_by_text(predicted, reference, expected):
    assert grade_choice(predicted, reference, CHOICES) is expected


def test_grade_choice_without_choices_and_with_several_answers():
    # MathVerse's vision-only questions show their options in the image: letters only.
    assert grade_choice("C", "C", [])
    assert not grade_choice("12", "C", [])
    # LogicVista has questions with several correct options.
    assert grade_choice("A, C", "A, C", ["x", "y", "z", "w"])
    assert grade_choice("C, A", "A,C", ["x", "y", "z", "w"])
    assert not grade_choice("A", "A, C", ["x", "y", "z", "w"])


def test_choice_accuracy_reward_mixes_choice_and_free_form_rows():
    completions = [r"\boxed{B}", r"\boxed{5}", r"\boxed{2+3}", r"\boxed{C}", r"\boxed{C}", "no box"]
    answers = ["B", "B", "5", "C", "C", "B"]
    choices = [json.dumps(CHOICES), json.dumps(CHOICES), "", "", "", json.dumps(CHOICES)]
    multiple = [True, True, False, True, False, True]
    rewards = choice_accuracy_reward(
        ["q"] * 6, completions, answers, choices=choices, multiple_choice=multiple
    )
    # Free-form row 3 is graded by mathruler (2+3 is not the integer 5); row 5 is free form with the
    # reference C; row 6 has no box.
    assert rewards == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert choice_accuracy_reward(["q"], [r"\boxed{2+3}"], ["5"], grader="math-verify") == [1.0]
