"""Answer graders: does an extracted answer equal the reference? Chosen by name.

- ``"mathruler"`` (default): :func:`mathruler.grader.grade_answer`, the grader of the CPPO release
  (``vbdi/cppo``, ``recipe/cppo/reward.py``), of EasyR1 and of PAPO's evaluation: string normalisation
  (units, ``\\text{}``, ``%``, ``$``), then sympy equality. An integer reference must be matched strictly,
  and unreduced fractions are not equal to reduced ones (``2/4`` is not ``1/2``).
- ``"math-verify"``: the package's earlier grader: exact match after :func:`normalize_answer`, then
  :mod:`math_verify` equivalence (more lenient: ``2+3`` = ``5``, ``0.5`` = ``50\\%``; stricter on
  ``1e3`` or units). The README's grader table lists where the two disagree.

Multiple-choice questions are graded by option letter *and* by option text (:func:`grade_choice`); the
choices are parsed from a list, its string form, or an ``"A. x; B. y"`` text (:func:`parse_choices`,
:func:`choices_from_question`).
"""

from __future__ import annotations

import ast
import json
import logging
import re
import string
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

GraderFunction = Callable[[str, str], bool]

_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit)\{([^{}]*)\}")


# --------------------------------------------------------------------------------------------------------
# Free-form answers
# --------------------------------------------------------------------------------------------------------


def mathruler_grade(predicted: str, reference: str) -> bool:
    """The release's grader: :func:`mathruler.grader.grade_answer` (never raises: a failure is wrong)."""
    from mathruler.grader import grade_answer

    try:
        return bool(grade_answer(predicted, reference))
    except Exception as error:  # sympy can fail on odd input; a grader failure is a wrong answer
        log.debug("mathruler failed on %r vs %r: %s", predicted, reference, error)
        return False


def normalize_answer(answer: str) -> str:
    """Lower-case; unwrap ``\\text{}``, ``$`` and a single ``\\boxed{}``; drop spaces, outer parentheses, a final period."""
    from cppo_lightning.rewards import extract_boxed

    boxed = extract_boxed(answer)
    if boxed is not None and answer.strip().startswith("\\boxed{"):
        answer = boxed
    answer = _TEXT_WRAPPERS.sub(r"\1", answer)
    answer = answer.replace("$", "").strip().rstrip(".").strip().lower()
    answer = re.sub(r"\s+", "", answer)
    if len(answer) > 2 and answer[0] == "(" and answer[-1] == ")":
        answer = answer[1:-1]
    return answer


def math_verify_grade(predicted: str, reference: str) -> bool:
    """Exact match after :func:`normalize_answer`, else mathematical equivalence by math-verify."""
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


#: Graders by name (``grader=`` of the reward functions).
GRADERS: dict[str, GraderFunction] = {"mathruler": mathruler_grade, "math-verify": math_verify_grade}


def get_grader(name: str) -> GraderFunction:
    """The grader called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return GRADERS[name]
    except KeyError:
        raise ValueError(f"unknown grader {name!r}; choose one of {sorted(GRADERS)}") from None


# --------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------

LETTERS = string.ascii_uppercase

# An option label at the start of a line or after whitespace/punctuation: "A.", "A:", "(A)", "A)".
_LABEL = re.compile(r"(?:^|(?<=[\s;,]))(?:\(([A-Z])\)|([A-Z])\s*[.:：)])\s*")
_PREFIX = re.compile(r"^(?:the\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:：]?\s*", re.IGNORECASE)
_ONLY_LETTER = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_LETTER_SET = re.compile(r"^\(?[A-Z]\)?(?:\s*(?:,|;|/|&|and)\s*\(?[A-Z]\)?)+$")
_LEADING_LABEL = re.compile(r"^(?:\(([A-Z])\)|([A-Z])\s*[.:：)])\s*(\S.*)$", re.DOTALL)


def _labelled_options(text: str) -> list[str]:
    """Options of the last ``A ... B ... C ...`` run of consecutive labels in ``text`` ([] if none)."""
    matches = list(_LABEL.finditer(text))
    best: list[re.Match] = []
    run: list[re.Match] = []
    for match in matches:
        letter = match.group(1) or match.group(2)
        if letter == "A":
            run = [match]
        elif run and letter == LETTERS[len(run)]:
            run.append(match)
        else:
            continue
        if len(run) >= 2:
            best = list(run)
    if not best:
        return []
    options = []
    for index, match in enumerate(best):
        end = best[index + 1].start() if index + 1 < len(best) else len(text)
        options.append(text[match.end() : end].strip().rstrip(";,").strip())
    # The last option runs to the end of the text: cut it at the first blank line or line break.
    options[-1] = options[-1].split("\n")[0].strip().rstrip(";,").strip()
    return options if all(options) else []


def parse_choices(value) -> list[str]:
    """The options of a multiple-choice question, from the forms benchmarks store them in.

    Args:
        value: a list/tuple of option texts; a JSON or Python list in a string (``"['3', '5']"``); a dict
            ``{"A": "3", ...}``; a labelled string (``"A. 3; B. 5"``); None or empty.

    Returns:
        The option texts in letter order (``[]`` when there are none).
    """
    if value is None:
        return []
    if isinstance(value, dict):
        return [str(value[key]).strip() for key in sorted(value)]
    if isinstance(value, (list, tuple)):
        return [str(option).strip() for option in value if option is not None and str(option).strip()]
    text = str(value).strip()
    if not text:
        return []
    if text[0] in "[{(":
        for loader in (json.loads, ast.literal_eval):
            try:
                parsed = loader(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(parsed, (list, tuple, dict)):
                return parse_choices(parsed)
    return _labelled_options(text)


def choices_from_question(question: str) -> list[str]:
    """Options listed in a question's text (``Choices:\\nA: 40°\\nB: 50°`` or ``(A) 3 (B) 5``), else ``[]``."""
    return _labelled_options(question or "")


def format_choices(choices: Sequence[str]) -> str:
    """``"A. 3\\nB. 5"``: the options as appended to a question that does not list them."""
    return "\n".join(f"{LETTERS[index]}. {option}" for index, option in enumerate(choices))


def _clean_label(text: str) -> str:
    text = _TEXT_WRAPPERS.sub(r"\1", text).replace("$", "").strip()
    return _PREFIX.sub("", text).strip()


def option_letters(answer: str, count: int | None = None) -> frozenset[str] | None:
    """The option letter(s) an answer names, or None when it is not an option label.

    ``"B"``, ``"(b)"``, ``"B."``, ``"Option B"``, ``"\\text{B}"``, ``"B) 5"`` (a label followed by its text)
    and sets ``"A, C"`` are labels. A bare lower-case letter counts only when it is a valid option
    (``count`` given).

    Args:
        answer: the extracted answer.
        count: number of options, if known (letters beyond it are not options).
    """
    text = _clean_label(answer)
    valid = set(LETTERS[:count]) if count else set(LETTERS)
    single = _ONLY_LETTER.match(text)
    if single:
        letter = single.group(1)
        if letter.islower() and not count:
            return None
        letter = letter.upper()
        return frozenset(letter) if letter in valid else None
    if _LETTER_SET.match(text):
        letters = frozenset(re.findall(r"[A-Z]", text))
        return letters if letters <= valid else None
    leading = _LEADING_LABEL.match(text)
    if leading:
        letter = leading.group(1) or leading.group(2)
        return frozenset(letter) if letter in valid else None
    return None


def grade_choice(
    predicted: str, reference: str, choices: Sequence[str], grader: str | GraderFunction = "mathruler"
) -> bool:
    """Grade a multiple-choice answer by option letter and by option text.

    The reference may be a letter (``"B"``), a letter set (``"A, C"``) or the correct option's text. A
    prediction that names option letters is right when they are the reference's letters; a prediction
    given as text is right when the grader finds it equal to the correct option's text. With no
    ``choices`` (options shown only in the image) only letters can be compared, or free-form text.

    Args:
        predicted: the extracted answer.
        reference: the reference answer.
        choices: the option texts in letter order (may be empty).
        grader: grader name or function for texts.
    """
    grade = get_grader(grader) if isinstance(grader, str) else grader
    if not predicted:
        return False
    count = len(choices) or None
    reference_letters = option_letters(reference, count)
    reference_text = None
    if reference_letters is not None:
        if len(reference_letters) == 1 and choices:
            (letter,) = reference_letters
            reference_text = choices[LETTERS.index(letter)]
    else:
        reference_text = reference
        matching = [index for index, option in enumerate(choices) if _same_option(option, reference, grade)]
        if len(matching) == 1:
            reference_letters = frozenset(LETTERS[matching[0]])
    predicted_letters = option_letters(predicted, count)
    if predicted_letters is not None:
        return predicted_letters == reference_letters
    return reference_text is not None and grade(predicted, reference_text)


def _same_option(option: str, reference: str, grade: GraderFunction) -> bool:
    return normalize_answer(option) == normalize_answer(reference) or grade(reference, option)


__all__ = [
    "GRADERS",
    "LETTERS",
    "choices_from_question",
    "format_choices",
    "get_grader",
    "grade_choice",
    "math_verify_grade",
    "mathruler_grade",
    "normalize_answer",
    "option_letters",
    "parse_choices",
]
