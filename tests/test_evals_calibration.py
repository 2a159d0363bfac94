"""Calibration: ECE on a hand-computed example, bins, Brier, confidence parsing and log-prob mapping."""

import math
import random

import pytest

from kanana_jax.evals.calibration import (brier_score, confidence_from_logprob, expected_calibration_error,
                                          parse_stated_confidence, reliability_bins, strip_confidence)


def test_ece_hand_computed():
    conf = [0.05, 0.15, 0.25, 0.35, 0.85, 0.95, 0.95, 0.55, 0.55, 1.0]
    correct = [0, 0, 1, 0, 1, 1, 0, 1, 0, 1]
    # bins 0-3 hold one wrong/right item each: |0-.05| + |0-.15| + |1-.25| + |0-.35| = 1.3, weight 1/10
    # bin 5: acc 1/2 vs conf .55 -> .05 * 2/10; bin 8: |1-.85| * 1/10; bin 9: acc 2/3 vs conf 2.9/3 -> .3 * 3/10
    expected = 1.3 / 10 + 0.05 * 0.2 + 0.15 / 10 + 0.3 * 0.3
    assert expected == pytest.approx(0.245)
    assert expected_calibration_error(conf, correct) == pytest.approx(expected, abs=1e-12)


def test_ece_matches_direct_formula_on_random_data():
    rng = random.Random(0)
    conf = [rng.random() for _ in range(500)]
    correct = [rng.random() < c ** 2 for c in conf]
    direct = 0.0
    for b in range(10):
        idx = [i for i, c in enumerate(conf) if b / 10 <= c < (b + 1) / 10]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            mean = sum(conf[i] for i in idx) / len(idx)
            direct += len(idx) / len(conf) * abs(acc - mean)
    assert expected_calibration_error(conf, correct) == pytest.approx(direct, abs=1e-12)


def test_perfect_calibration_and_bins():
    assert expected_calibration_error([0.8] * 5, [1, 1, 1, 1, 0]) == pytest.approx(0.0, abs=1e-12)
    bins = reliability_bins([0.0, 0.1, 0.999, 1.0], [0, 1, 1, 1])
    assert [b.count for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]  # [lo, hi) with 1.0 in the last bin
    assert bins[9].mean_confidence == pytest.approx(0.9995) and bins[9].accuracy == 1.0


def test_brier_and_validation():
    assert brier_score([1.0, 0.0, 0.5], [1, 0, 1]) == pytest.approx(0.25 / 3)
    with pytest.raises(ValueError, match="one per item"):
        expected_calibration_error([0.5], [1, 0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([1.5], [1])
    with pytest.raises(ValueError, match="at least one"):
        expected_calibration_error([], [])


@pytest.mark.parametrize("text,expected", [
    ("The answer is 4.\nConfidence: 80%", 0.8),
    ("**Confidence:** 0.65", 0.65),
    ("Confidence level: 85", 0.85),
    ("confidence = 7/10", 0.7),
    ("확신도: 90%", 0.9),
    ("신뢰도는 75퍼센트", 0.75),
    ("I am 70% confident in this.", 0.7),
    ("Confidence: 60%\n...\nConfidence: 40%", 0.4),
    ("Confidence: 150%", None),
    ("The answer is 42.", None),
])
def test_parse_stated_confidence(text, expected):
    got = parse_stated_confidence(text)
    assert got == (pytest.approx(expected) if expected is not None else None)


def test_strip_confidence():
    assert strip_confidence("Answer: 7\nConfidence: 90%\n") == "Answer: 7"
    assert strip_confidence("no statement") == "no statement"


def test_confidence_from_logprob():
    assert confidence_from_logprob([-0.1, -0.2]) == pytest.approx(math.exp(-0.3))
    assert confidence_from_logprob([-0.1, -0.2], reduce="mean") == pytest.approx(math.exp(-0.15))
    assert confidence_from_logprob(-2.0) == pytest.approx(math.exp(-2.0))
    assert confidence_from_logprob(0.0) == 1.0
    with pytest.raises(ValueError, match="<= 0"):
        confidence_from_logprob([0.5])
    with pytest.raises(ValueError, match="reduce"):
        confidence_from_logprob([-1.0], reduce="max")
