"""Calibration reward (RLCR, Damani et al. 2025, "Beyond Binary Rewards: Training LMs to Reason About Their
Uncertainty") and the confidence request it needs.

    reward = 1[correct] - (q - 1[correct])^2        q = the stated confidence in [0, 1]

i.e. correctness plus a Brier-score term: for a fixed answer its expectation is maximized by stating q = P(correct),
and it stays a proper scoring rule added to the correctness reward (so accuracy is not traded for calibration).
Range [-1, 1]: right at 100% -> 1, wrong at 0% -> 0, wrong at 100% -> -1. A completion whose confidence cannot be
parsed (`evals.calibration.parse_stated_confidence`) gets a set penalty (rl.unparseable_confidence_reward).
"""
from __future__ import annotations

from typing import Sequence

from kanana_jax.evals.calibration import CONFIDENCE_INSTRUCTION, CONFIDENCE_INSTRUCTION_KO, parse_stated_confidence


def brier_reward(correct: bool, confidence: float | None, unparseable: float = -1.0) -> float:
    """1[correct] - (confidence - 1[correct])^2, or `unparseable` when confidence is None."""
    if confidence is None:
        return float(unparseable)
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must lie in [0, 1], got {confidence}")
    y = 1.0 if correct else 0.0
    return y - (float(confidence) - y) ** 2


def calibration_rewards(texts: Sequence[str], correct: Sequence[bool], unparseable: float = -1.0):
    """(rewards [n], stated confidences [n], None where unparseable) of completions and their verdicts."""
    if len(texts) != len(correct):
        raise ValueError(f"got {len(texts)} completions and {len(correct)} verdicts; pass one verdict per completion")
    conf = [parse_stated_confidence(t or "") for t in texts]
    return [brier_reward(bool(c), q, unparseable) for c, q in zip(correct, conf)], conf


def confidence_instruction(lang: str | None) -> str:
    """The eval runner's request for a stated confidence, in the record's language ('ko' -> Korean, else English)."""
    return CONFIDENCE_INSTRUCTION_KO if lang == "ko" else CONFIDENCE_INSTRUCTION


def ask_confidence(record: dict) -> dict:
    """A copy of a prompt record whose last user turn ends with the confidence request ('\\n\\n' + instruction, as
    evals.suites.build_messages appends it); records that already carry it are returned unchanged."""
    messages = [dict(m) for m in record["messages"]]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(f"prompt record {record.get('id')!r} has no user turn to append the confidence request to")
    last = messages[users[-1]]
    instruction = confidence_instruction(record.get("lang"))
    if not last["content"].rstrip().endswith(instruction):
        last["content"] = f"{last['content'].rstrip()}\n\n{instruction}"
    return {**record, "messages": messages}
