"""Math verifier: extraction, normalisation and exact comparison on a table of tricky answers."""

import math
import random
from fractions import Fraction

import pytest

from kanana_jax.rewards.expr import ExprError, evaluate, numbers_equal
from kanana_jax.rewards.math import answers_match, extract_answer, extract_boxed, math_reward, normalize_answer

# (response, expected extracted answer string)
EXTRACTION = [
    ("so the result is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),
    ("\\boxed{\\frac{1}{\\frac{1}{2}}}", "\\frac{1}{\\frac{1}{2}}"),  # nested braces
    ("first \\boxed{1} then corrected: \\boxed{2}", "2"),  # last box wins
    ("\\boxed 5", "5"),
    ("\\fbox{7}", "7"),
    ("Natalia sold 48 clips. #### 72", "72"),
    ("work...\n#### 1,234", "1,234"),
    ("Answer: 42", "42"),
    ("**Final Answer:** 3.50", "3.50"),
    ("The answer is 17 apples.", "17 apples."),
    ("answer = -3", "-3"),
    ("정답: 42개", "42개"),
    ("따라서 답은 15입니다.", "15입니다."),
    ("최종 답: 2억 3000만 원", "2억 3000만 원"),
    ("Answer: 12\nAnswer: 13", "13"),  # last answer line wins
    ("I computed 12, then 13, and finally 14", "14"),  # last-number fallback
    ("The answer is 42.\nConfidence: 80%", "42."),  # confidence line ignored
    ("It is 7.\nConfidence: 90%", "7"),  # fallback does not pick the 90
    ("no numbers here", None),
]


@pytest.mark.parametrize("response,expected", EXTRACTION)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# (prediction, gold, should match)
MATCHING = [
    ("\\frac{3}{4}", "0.75", True),
    ("3/4", "\\frac34", True),
    ("\\dfrac{6}{8}", "3/4", True),
    ("0.333", "1/3", False),  # exact: no rounding
    ("1,234", "1234", True),
    ("$1,234.50", "1234.5", True),
    ("1{,}000", "1000", True),
    ("75%", "0.75", True),  # percent matches p/100 ...
    ("75%", "75", True),  # ... and p
    ("75", "0.75", False),
    ("-5", "−5", True),  # unicode minus
    ("-5", "5", False),
    ("2^3", "8", True),
    ("2**10", "1024", True),
    ("2 * 3", "6", True),
    ("**42**", "42", True),
    ("\\sqrt{16}", "4", True),
    ("2\\sqrt{2}", "sqrt(8)", True),  # irrational: float comparison
    ("\\frac{\\sqrt{3}}{2}", "sqrt(3)/2", True),
    ("10^{3}", "1e3", True),
    ("3.0", "3", True),
    ("2.50", "2.5", True),
    ("x = 2^3", "8", True),
    ("17 apples", "17", True),
    ("42개", "42", True),
    ("15입니다", "15", True),
    ("2억 3000만 원", "230000000", True),
    ("1만 2천", "12000", True),
    ("25\\pi", "25*pi", True),
    ("120!", "120", True),  # trailing "!" is punctuation in answers
    ("2, 3", "3, 2", True),  # lists match as multisets
    ("(1, 2)", "1, 3", False),
    ("(B)", "B", True),  # non-numeric: normalised text
    ("Paris", "paris", True),
    ("Paris", "Rome", False),
    (None, "1", False),
]


@pytest.mark.parametrize("pred,gold,expected", MATCHING)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_math_reward_end_to_end():
    assert math_reward("We add them: 3 + 4 = 7. The answer is \\boxed{7}.", "7") == 1.0
    assert math_reward("We add them: 3 + 4 = 7. The answer is \\boxed{8}.", "7") == 0.0
    assert math_reward("사과는 모두 118개입니다.\n정답: 118", 118) == 1.0
    assert math_reward("The probability is 0.25", Fraction(1, 4)) == 1.0


def test_extract_boxed_unbalanced_is_none():
    assert extract_boxed("\\boxed{1 + {2}") is None


def test_evaluator_exact_arithmetic_random():
    """Random rational expressions evaluate exactly, matching a Fraction computation."""
    rng = random.Random(0)
    for _ in range(200):
        a, b, c = (Fraction(rng.randint(-50, 50), rng.randint(1, 9)) for _ in range(3))
        n = rng.randint(0, 4)
        frac = [f"({x.numerator}/{x.denominator})" for x in (a, b, c)]
        text = f"{frac[0]} * {frac[1]} - {frac[2]}^{n}"
        assert evaluate(text) == a * b - c ** n


def test_evaluator_precedence_and_roots():
    assert evaluate("-2^2") == -4
    assert evaluate("2^-1") == Fraction(1, 2)
    assert evaluate("2^3^2") == 512  # right-associative
    assert evaluate("8^(1/3)") == 2 and isinstance(evaluate("8^(1/3)"), Fraction)
    assert evaluate("(-8)^(1/3)") == -2 and evaluate("(-8)^(2/3)") == 4
    assert evaluate("2(3+4)") == 14 and evaluate("(1+2)(3+4)") == 21
    assert evaluate("10%") == Fraction(1, 10)
    assert evaluate("√16") == 4 and evaluate("3×4÷6") == 2
    assert math.isclose(evaluate("2pi"), 2 * math.pi)
    assert numbers_equal(evaluate("sqrt(2)^2"), Fraction(2))
    assert evaluate("max(1, 7/2, 3)") == Fraction(7, 2) and evaluate("round(2.567, 2)") == Fraction("2.57")


@pytest.mark.parametrize("bad", ["__import__('os')", "1/0", "2^10^10", "9" * 3000, "(" * 200 + "1" + ")" * 200,
                                 "sqrt(-4)", "1 2", "", "foo(1)", "1000!", "open('x')"])
def test_evaluator_rejects_unsafe_or_invalid(bad):
    with pytest.raises(ExprError):
        evaluate(bad)


def test_normalize_answer_percent_alternatives():
    assert normalize_answer("50%").values == ((Fraction(1, 2), Fraction(50)),)
    assert normalize_answer("hello").values is None
