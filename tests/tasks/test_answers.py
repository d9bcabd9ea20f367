"""Answer extraction and math-verify checking on tricky, real-looking model outputs."""

from __future__ import annotations

import threading

import pytest

from stars.tasks.answers import answers_match, extract_answer, is_correct, last_boxed, normalize_answer

EXTRACT_CASES = [
    ("She sold 48 + 24 = 72 clips. The answer is 72.", "72"),
    ("Therefore, the final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("So we get \\boxed{\\frac{\\sqrt{3}}{2}} as required.", "\\frac{\\sqrt{3}}{2}"),
    ("First I thought \\boxed{3}, but correcting: \\boxed{4}.", "4"),
    ("Nested: \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("Empty box \\boxed{} then the answer is 12.", "12"),
    ("He now has $1,250 in savings.", "1,250"),
    ("The water is at -7 degrees.", "-7"),
    ("We get 10 - 3 = 7", "7"),
    ("#### 1,335", "1,335"),
    ("Final answer: 18 dollars", "18 dollars"),
    ("The answer is that Tom has 5 apples.", "5"),
    ("It takes 3/4 of an hour", "3/4"),
    ("The answer is: $5.", "$5"),
    ("\\boxed 7", "7"),
    ("I am not sure how to solve this.", None),
    ("", None),
    (None, None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_CASES)
def test_extract_answer(text: str | None, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_last_boxed_handles_unbalanced_and_fbox() -> None:
    assert last_boxed("\\boxed{2} and a broken \\boxed{3") == "2"
    assert last_boxed("\\fbox{9}") == "9"
    assert last_boxed("no box here") is None


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("$1,250$", "1250"),
        ("\\$18.00", "18.00"),
        ("$18", "18"),
        ("1\\,000", "1000"),
        ("18.", "18"),
        ("5 apples", "5"),
        ("(1,2)", "(1,2)"),  # a tuple is not a thousands separator
        ("1, 2", "1, 2"),
    ],
)
def test_normalize_answer(raw: str, normalized: str) -> None:
    assert normalize_answer(raw) == normalized


CORRECT_CASES = [
    # (model output, gold, expected)
    ("The answer is 72.", "72", True),
    ("The answer is 73.", "72", False),
    ("He earns $1,250 per week, so the answer is $1,250.", "1250", True),
    ("The total is \\boxed{\\$1,250}.", "1250", True),
    ("So the cost is \\boxed{18.00} dollars", "18", True),
    ("The probability is \\boxed{0.5}", "\\frac{1}{2}", True),
    ("The probability is \\boxed{\\frac12}", "0.5", True),
    ("The answer is $\\frac{1}{2}$.", "0.5", True),
    ("The answer is \\boxed{\\frac{3}{4}}", "0.75", True),
    ("The answer is \\boxed{3/4}", "\\frac{3}{4}", True),
    ("\\boxed{\\dfrac{14}{3}}", "\\frac{14}{3}", True),
    ("\\boxed{4\\frac{2}{3}}", "\\frac{14}{3}", True),
    ("It is about \\boxed{4.6667}", "\\frac{14}{3}", False),
    ("The temperature is \\boxed{-6}", "-6", True),
    ("The temperature is \\boxed{6}", "-6", False),
    ("It was -6 degrees at midnight.", "-6", True),
    ("The length is \\boxed{12 \\text{ cm}}", "12", True),
    ("Each piece is 0.75 meters long.", "0.75", True),
    ("So there are 1,335 books.", "1335", True),
    ("\\boxed{x = 2}", "2", True),
    ("\\boxed{5\\sqrt{2}}", "\\sqrt{50}", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(2, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("The answer is 10\\%.", "10", True),
    ("The answer is \\boxed{\\text{(C)}}", "C", True),
    ("I cannot determine the answer.", "5", False),
    ("", "5", False),
    ("\\boxed{}", "3", False),
    ("There are 27 miles between them, so 27.0", "27", True),
]


@pytest.mark.parametrize(("text", "gold", "expected"), CORRECT_CASES)
def test_is_correct(text: str, gold: str, expected: bool) -> None:
    assert is_correct(text, gold) is expected


def test_gold_is_checked_first() -> None:
    # verify(gold, pred) is not symmetric: an inequality as gold accepts the interval it describes,
    # an interval as gold does not accept an inequality. Swapping the order would flip both.
    assert answers_match("x<2", "(-\\infty,2)") is True
    assert answers_match("(-\\infty,2)", "x<2") is False


def test_unparseable_gold_is_an_error_not_a_silent_miss() -> None:
    with pytest.raises(ValueError, match="gold answer"):
        answers_match("", "5")


def test_works_off_the_main_thread() -> None:
    """math_verify's SIGALRM timeouts only work in the main thread; evaluation actors may use others."""
    results: list[bool] = []
    t = threading.Thread(target=lambda: results.append(is_correct("so \\boxed{\\frac12}", "0.5")))
    t.start()
    t.join()
    assert results == [True]
