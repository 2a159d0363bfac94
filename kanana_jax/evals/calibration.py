"""Calibration: expected calibration error (equal-width bins), Brier score, AUROC, confidence parsing."""

from __future__ import annotations

import bisect
import dataclasses
import math
import re
from typing import Sequence, Union

CONFIDENCE_INSTRUCTION = (
    "After your answer, on its own last line, state how likely your answer is correct as "
    "'Confidence: NN%'."
)
CONFIDENCE_INSTRUCTION_KO = "답을 쓴 뒤 마지막 줄에 답이 맞을 확률을 'Confidence: NN%' 형식으로 적으세요."

_NUM = r"(\d+(?:\.\d+)?)"
_LABEL = r"(?:confidence(?:\s+level|\s+score)?|확신도|신뢰도|자신감|확신)"
# "Confidence: 80%", "**Confidence**: 0.8", "확신도: 90%", "confidence = 7/10", "Confidence is 85 %"
_LINE_RE = re.compile(
    rf"^[ \t>*_#`-]*{_LABEL}[ \t*_`]*(?:[:：=]|is|는|은)?[ \t*_`]*(?:about|approximately|약)?[ \t]*"
    rf"{_NUM}[ \t]*(%|percent|퍼센트|/[ \t]*(?:100|10|1))?[ \t*_`.]*$",
    re.IGNORECASE | re.MULTILINE,
)
# "I am 90% confident" / "90% 확신"
_INLINE_RE = re.compile(rf"{_NUM}[ \t]*%[ \t]*(?:confident|confidence|확신)", re.IGNORECASE)


def _to_probability(number: str, unit: str | None) -> float | None:
    """Map a stated number and its unit ('%', '/10', '/100' or none) to [0, 1], None if out of range."""
    x = float(number)
    unit = (unit or "").replace(" ", "").replace("\t", "").lower()
    if unit in ("%", "percent", "퍼센트", "/100"):
        x /= 100.0
    elif unit == "/10":
        x /= 10.0
    elif unit == "/1":
        pass
    elif x > 1.0:  # a bare "80" means 80%
        x /= 100.0
    return x if 0.0 <= x <= 1.0 else None


def parse_stated_confidence(text: str) -> float | None:
    """Probability in [0, 1] from the last 'Confidence: 80%'-style statement in `text`, else None."""
    matches = list(_LINE_RE.finditer(text))
    if matches:
        return _to_probability(matches[-1].group(1), matches[-1].group(2))
    inline = list(_INLINE_RE.finditer(text))
    if inline:
        return _to_probability(inline[-1].group(1), "%")
    return None


def strip_confidence(text: str) -> str:
    """`text` without its 'Confidence: NN%' lines (so answer extraction and constraints ignore them)."""
    return _LINE_RE.sub("", text).rstrip()


def confidence_from_logprob(logprobs: Union[float, Sequence[float]], reduce: str = "sum") -> float:
    """Probability from answer token log-probs (nats): exp(sum) = sequence prob, exp(mean) = per token."""
    values = [float(logprobs)] if isinstance(logprobs, (int, float)) else [float(v) for v in logprobs]
    if not values:
        raise ValueError("confidence_from_logprob needs at least one log-prob; got an empty sequence")
    if any(v > 1e-6 or math.isnan(v) for v in values):
        raise ValueError(f"log-probs must be <= 0 (natural log); got {values[:8]}")
    if reduce == "sum":
        total = sum(values)
    elif reduce == "mean":
        total = sum(values) / len(values)
    else:
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return min(1.0, math.exp(total))


@dataclasses.dataclass(frozen=True)
class CalibrationBin:
    """One equal-width confidence bin: [lo, hi) (the last bin includes 1.0)."""

    lo: float
    hi: float
    count: int
    mean_confidence: float
    accuracy: float


def _check(confidences: Sequence[float], correct: Sequence[bool | float]) -> tuple[list[float], list[float]]:
    conf = [float(c) for c in confidences]
    corr = [float(c) for c in correct]
    if len(conf) != len(corr):
        raise ValueError(f"got {len(conf)} confidences but {len(corr)} correctness labels; pass one per item")
    bad = [c for c in conf if not 0.0 <= c <= 1.0]
    if bad:
        raise ValueError(f"confidences must lie in [0, 1]; got {bad[:5]}")
    return conf, corr


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool | float],
                     n_bins: int = 10) -> list[CalibrationBin]:
    """Equal-width bins over [0, 1]: item count, mean confidence and accuracy per bin."""
    conf, corr = _check(confidences, correct)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    members: list[list[int]] = [[] for _ in range(n_bins)]
    for i, c in enumerate(conf):
        members[min(int(c * n_bins), n_bins - 1)].append(i)
    bins = []
    for b, idx in enumerate(members):
        n = len(idx)
        bins.append(CalibrationBin(
            lo=b / n_bins, hi=(b + 1) / n_bins, count=n,
            mean_confidence=sum(conf[i] for i in idx) / n if n else 0.0,
            accuracy=sum(corr[i] for i in idx) / n if n else 0.0,
        ))
    return bins


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool | float],
                               n_bins: int = 10) -> float:
    """ECE = sum over bins of (bin size / N) * |accuracy(bin) - mean confidence(bin)|."""
    bins = reliability_bins(confidences, correct, n_bins)
    total = sum(b.count for b in bins)
    if total == 0:
        raise ValueError("expected_calibration_error needs at least one item")
    return sum(b.count / total * abs(b.accuracy - b.mean_confidence) for b in bins)


def brier_score(confidences: Sequence[float], correct: Sequence[bool | float]) -> float:
    """Mean squared difference between confidence and the 0/1 outcome."""
    conf, corr = _check(confidences, correct)
    if not conf:
        raise ValueError("brier_score needs at least one item")
    return sum((c - y) ** 2 for c, y in zip(conf, corr)) / len(conf)


def auroc(confidences: Sequence[float], correct: Sequence[bool | float]) -> float | None:
    """Area under the ROC curve of confidence as a predictor of correctness: the probability that a random correct
    item has a higher confidence than a random wrong one (ties count 1/2; Mann-Whitney U / (n_correct n_wrong)).
    0.5 = confidence does not separate right from wrong. None when every item is right or every item is wrong."""
    conf, corr = _check(confidences, correct)
    pos = sorted(c for c, y in zip(conf, corr) if y >= 0.5)
    neg = sorted(c for c, y in zip(conf, corr) if y < 0.5)
    if not pos or not neg:
        return None
    wins = sum(bisect.bisect_left(neg, p) + 0.5 * (bisect.bisect_right(neg, p) - bisect.bisect_left(neg, p))
               for p in pos)
    return wins / (len(pos) * len(neg))
