"""Scoring: reference responses score 1.0, wrong ones 0.0, and ECE uses the stated confidences."""

import pytest

from kanana_jax.evals.calibration import expected_calibration_error
from kanana_jax.evals.scoring import format_report, score_suite
from kanana_jax.evals.suites import load_suite
from kanana_jax.generate.tool_calls import ToolCall, render_assistant_turn
from kanana_jax.rewards.code_sandbox import SandboxLimits


def test_math_scoring_accuracy_and_ece_from_stated_confidence():
    items = load_suite("math")[:4] + load_suite("math", lang="ko")[:4]
    responses, truth = [], []
    for i, item in enumerate(items):
        right = i % 3 != 0
        answer = item["answer"] if right else "-999"
        responses.append(f"Reasoning...\n\\boxed{{{answer}}}\nConfidence: {90 if i % 2 else 60}%")
        truth.append(right)
    score = score_suite("math", items, responses)
    assert [s.correct for s in score.items] == truth
    assert score.accuracy == pytest.approx(sum(truth) / len(truth))
    confs = [0.9 if i % 2 else 0.6 for i in range(len(items))]
    assert score.ece == pytest.approx(expected_calibration_error(confs, truth))
    assert score.n_with_confidence == len(items) and "accuracy_en" in score.metrics and "accuracy_ko" in score.metrics


def test_explicit_confidences_override_and_missing_ones_are_excluded():
    items = load_suite("math")[:3]
    responses = [f"\\boxed{{{it['answer']}}}" for it in items]
    score = score_suite("math", items, responses, confidences=[1.0, None, 0.5])
    assert score.accuracy == 1.0 and score.n_with_confidence == 2
    assert score.ece == pytest.approx(0.25)  # bins: {1.0: acc 1} and {0.5: acc 1} -> (0 + 0.5) / 2
    assert score_suite("math", items, responses).ece is None


def test_code_scoring_uses_the_sandbox():
    items = load_suite("code")[:3] + [it for it in load_suite("code") if it.get("io")][:1]
    good = [f"Here you go:\n```python\n{it['reference']}```" for it in items]
    bad = ["```python\nwhile True:\n    pass\n```"] + good[1:]
    limits = SandboxLimits(timeout_s=2.0)
    assert score_suite("code", items, good, sandbox_limits=limits).accuracy == 1.0
    score = score_suite("code", items, bad, sandbox_limits=limits)
    assert [s.correct for s in score.items] == [False, True, True, True]
    assert score.items[0].details.startswith("timeout") and score.metrics["reason_timeout"] == 0.25


def test_ifeval_scoring_strips_the_confidence_line():
    items = load_suite("ifeval")[:5]
    responses = [it["reference"] + "\nConfidence: 70%" for it in items]
    score = score_suite("ifeval", items, responses)
    assert score.accuracy == 1.0 and score.metrics["instruction_accuracy"] == 1.0
    assert score.n_with_confidence == 5
    wrong = score_suite("ifeval", items, ["x"] * 5)
    assert wrong.accuracy < 1.0 and wrong.metrics["instruction_accuracy"] < 1.0


def test_tools_scoring_replays_turns():
    items = load_suite("tools")[:4]
    trajectories = [[render_assistant_turn(s["content"], [ToolCall(c["name"], c["arguments"]) for c in s["calls"]])
                     for s in it["reference"]] for it in items]
    score = score_suite("tools", items, trajectories)
    assert score.accuracy == 1.0
    skipped = score_suite("tools", items, [t[-1] for t in trajectories])  # final text without the tool calls
    assert skipped.accuracy < 1.0


def test_report_and_errors():
    items = load_suite("math")[:2]
    score = score_suite("math", items, ["\\boxed{0}", "\\boxed{0}"])
    table = format_report([score])
    assert table.splitlines()[0].split() == ["suite", "n", "accuracy", "ECE", "conf"] and "math" in table
    assert score.summary()["accuracy"] == score.accuracy
    with pytest.raises(ValueError, match="one per item"):
        score_suite("math", items, ["x"])
    with pytest.raises(ValueError, match="unknown eval suite"):
        score_suite("chess", items, ["x", "y"])
