"""Embedded eval suites: well-formed, answers recomputed, references verified by the real verifiers."""

import collections

import pytest

from kanana_jax.evals.suites import SUITE_NAMES, build_messages, load_suite, parse_suite_list, suite_path
from kanana_jax.generate.tool_calls import ToolCall, render_assistant_turn
from kanana_jax.rewards.code_sandbox import SandboxLimits, run_many
from kanana_jax.rewards.expr import evaluate, numbers_equal
from kanana_jax.rewards.ifeval import evaluate_instructions
from kanana_jax.rewards.math import math_reward, normalize_answer
from kanana_jax.rewards.tools import TOOLS, answer_ok, replay_and_check

LIMITS = SandboxLimits(timeout_s=5.0)


def reference_turns(item):
    return [render_assistant_turn(s["content"], [ToolCall(c["name"], c["arguments"]) for c in s["calls"]])
            for s in item["reference"]]


def test_every_suite_loads_with_a_few_dozen_items():
    for name in SUITE_NAMES:
        assert suite_path(name).is_file()
        items = load_suite(name)
        assert len(items) >= 30, name
    langs = collections.Counter(item["lang"] for item in load_suite("math"))
    assert langs["en"] >= 30 and langs["ko"] >= 30
    assert all(item["lang"] == "ko" for item in load_suite("math", lang="ko"))
    assert len(load_suite("code", limit=3)) == 3


def test_math_answers_equal_their_solution_expressions():
    for item in load_suite("math"):
        value = evaluate(item["solution_expr"])
        gold = normalize_answer(item["answer"]).values
        assert gold is not None and len(gold) == 1, item["id"]
        assert any(numbers_equal(value, g) for g in gold[0]), (item["id"], value, item["answer"])
        assert math_reward(f"The answer is \\boxed{{{item['answer']}}}.", item["answer"]) == 1.0


def test_code_references_pass_and_stub_programs_fail():
    items = load_suite("code")
    jobs, stub_jobs = [], []
    for item in items:
        cases = item.get("io") or [None]
        for case in cases:
            io = {} if case is None else {"stdin": case["stdin"], "expected_stdout": case["stdout"]}
            jobs.append({"program": item["reference"], "tests": item["tests"], "limits": LIMITS, **io})
            stub = (f"def {item['entry_point']}(*args, **kwargs):\n    return None\n" if item["entry_point"]
                    else "print('wrong')\n")
            stub_jobs.append({"program": stub, "tests": item["tests"], "limits": LIMITS, **io})
    results = run_many(jobs + stub_jobs, max_workers=2)
    ref, stub = results[:len(jobs)], results[len(jobs):]
    assert [r.reason for r in ref] == ["passed"] * len(ref), [(j["program"][:40], r.details) for j, r in
                                                                zip(jobs, ref) if not r.passed]
    assert not any(r.passed for r in stub)  # tests are not vacuous


def test_ifeval_references_satisfy_their_constraints():
    ids_used = set()
    for item in load_suite("ifeval"):
        result = evaluate_instructions(item["reference"], item["constraints"])
        assert result.all_passed, (item["id"], result.per_constraint)
        ids_used |= {c["id"] for c in item["constraints"]}
    from kanana_jax.rewards.ifeval import REGISTRY
    assert ids_used == set(REGISTRY)  # every constraint is exercised by the suite
    langs = collections.Counter(item["lang"] for item in load_suite("ifeval"))
    assert langs["en"] >= 10 and langs["ko"] >= 10


def _leaf_values(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _leaf_values(v)
    elif isinstance(obj, list):
        yield len(obj)
        for v in obj:
            yield from _leaf_values(v)
    else:
        yield obj


def test_tool_references_replay_and_reach_the_expected_answer():
    for item in load_suite("tools"):
        assert set(item["tools"]) <= set(TOOLS)
        check, traj = replay_and_check(item, reference_turns(item))
        assert check.passed, (item["id"], check.details)
        assert not any(isinstance(r.content, dict) and "error" in r.content for r in traj.responses), item["id"]
        expected = item["expected_answer"]
        if expected is not None:  # the answer comes from a tool result, not from the reference's prose
            values = [str(v) for r in traj.responses for v in _leaf_values(r.content)]
            assert any(answer_ok(v, expected, item.get("tolerance")) for v in values), (item["id"], values)
        wrong = replay_and_check(item, reference_turns(item)[:-1] + ["I do not know."])[0]
        assert not wrong.passed or expected is None


def test_parse_suite_list_and_messages():
    assert parse_suite_list("math, code,math") == ["math", "code"]
    with pytest.raises(ValueError, match="--suite"):
        parse_suite_list("math,chess")
    with pytest.raises(ValueError, match="unknown eval suite"):
        load_suite("chess")
    math_ko = build_messages("math", load_suite("math", lang="ko")[0])
    assert "\\boxed{}" in math_ko[-1]["content"] and "Confidence" in math_ko[-1]["content"]
    assert "Confidence" not in build_messages("ifeval", load_suite("ifeval")[0])[-1]["content"]
    tool_msgs = build_messages("tools", load_suite("tools")[0], ask_confidence=False)
    assert tool_msgs[0]["role"] == "system" and "<tools>" in tool_msgs[0]["content"]
    code_msgs = build_messages("code", load_suite("code")[0])
    assert "```python" in code_msgs[0]["content"]
