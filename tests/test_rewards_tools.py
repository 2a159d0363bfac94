"""Tool environment: tools compute the right values, bad calls come back as errors, trajectories replay."""

import math
import random
from fractions import Fraction

import pytest

from kanana_jax.generate.tool_calls import ToolCall, render_assistant_turn
from kanana_jax.rewards.tools import (TABLES, TOOLS, ToolEnv, answer_ok, check_task, convert, execute_trajectory,
                                      replay_and_check, run_episode, validate_arguments)


def _call(env, name, **args):
    return env.call(ToolCall(name, args)).content


def test_calculator_exact_and_errors():
    env = ToolEnv()
    assert _call(env, "calculator", expression="(1234 + 5678) * 3") == {"result": 20736}
    assert _call(env, "calculator", expression="10 / 4") == {"result": 2.5}
    assert _call(env, "calculator", expression="1/3") == {"result": "1/3", "approx": 0.3333333333}
    assert _call(env, "calculator", expression="86000 * 15%") == {"result": 12900}
    assert "error" in _call(env, "calculator", expression="__import__('os').system('x')")
    assert "division by zero" in _call(env, "calculator", expression="1/0")["error"]


def test_unit_conversion_against_independent_formulas():
    rng = random.Random(0)
    for _ in range(50):
        c = Fraction(rng.randint(-4000, 4000), 10)
        assert convert(c, "C", "F") == c * Fraction(9, 5) + 32
        assert convert(convert(c, "celsius", "K"), "K", "C") == c
        x = Fraction(rng.randint(1, 10**6), 100)
        assert convert(x, "mi", "km") == x * Fraction("1.609344")
        assert convert(x, "lb", "g") == x * Fraction("453.59237")
        assert convert(convert(x, "km/h", "mph"), "mph", "km/h") == x
    assert convert(Fraction(1), "week", "min") == 7 * 24 * 60
    assert convert(Fraction(2), "gal", "ml") == Fraction("7570.823568")
    with pytest.raises(ValueError, match="cannot convert"):
        convert(Fraction(1), "kg", "m")
    with pytest.raises(ValueError, match="unknown unit"):
        convert(Fraction(1), "parsec", "m")
    env = ToolEnv()
    assert _call(env, "convert_units", value=100, from_unit="F", to_unit="C")["value"] == pytest.approx(37.7777778)
    assert math.isclose(_call(env, "convert_units", value=26.2, from_unit="miles", to_unit="km")["value"], 42.1648128)


def test_key_value_store_state():
    env = ToolEnv(initial_state={"a": 1})
    assert _call(env, "kv_set", key="b", value="two") == {"ok": True}
    assert _call(env, "kv_get", key="b") == {"value": "two"}
    assert _call(env, "kv_list") == {"keys": ["a", "b"]}
    assert _call(env, "kv_delete", key="a") == {"ok": True}
    assert "not found" in _call(env, "kv_get", key="a")["error"]
    assert env.state == {"b": "two"}
    assert [c.name for c, _ in env.log] == ["kv_set", "kv_get", "kv_list", "kv_delete", "kv_get"]


def test_table_lookup_and_aliases():
    env = ToolEnv()
    assert _call(env, "table_lookup", table="countries", key="한국", column="capital") == {"value": "Seoul"}
    assert _call(env, "table_lookup", table="countries", key="USA", column="calling_code") == {"value": 1}
    assert _call(env, "table_lookup", table="products", key="Pen")["row"] == TABLES["products"]["pen"]
    assert "no row" in _call(env, "table_lookup", table="products", key="laptop")["error"]
    assert "no column" in _call(env, "table_lookup", table="products", key="pen", column="color")["error"]
    assert "must be one of" in _call(env, "table_lookup", table="planets", key="mars")["error"]


def test_argument_validation_and_unknown_tool():
    env = ToolEnv(tools=["calculator"])
    assert "unknown tool" in _call(env, "kv_set", key="a", value=1)["error"]
    assert "missing required" in _call(env, "calculator")["error"]
    assert "unexpected argument" in _call(env, "calculator", expression="1", x=2)["error"]
    assert "must be of type string" in _call(env, "calculator", expression=12)["error"]
    assert validate_arguments(TOOLS["convert_units"].parameters, {"value": True, "from_unit": "m", "to_unit": "km"})
    with pytest.raises(ValueError, match="unknown tool"):
        ToolEnv(tools=["shell"])


def test_specs_are_json_schema_like():
    for spec in ToolEnv().specs():
        fn = spec["function"]
        assert spec["type"] == "function" and fn["description"] and fn["parameters"]["type"] == "object"
        assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])


def test_execute_trajectory_multi_turn_with_malformed_call():
    turns = [
        render_assistant_turn("Looking up prices.", [
            ToolCall("table_lookup", {"table": "products", "key": "backpack", "column": "price_krw"}),
            ToolCall("table_lookup", {"table": "products", "key": "pen", "column": "price_krw"})]),
        '<tool_call>{"name": "calculator", "arguments": {"expression": "3*45000 + 5*1200"}}</tool_call>'
        "<tool_call>{broken</tool_call>",
        "The total is 141,000 won.",
    ]
    env = ToolEnv()
    traj = execute_trajectory(turns, env)
    assert [r.content for r in traj.responses][:3] == [{"value": 45000}, {"value": 1200}, {"result": 141000}]
    assert "malformed tool call" in traj.responses[3].content["error"] and traj.n_errors == 1
    assert traj.final_answer == "The total is 141,000 won."


def test_check_task_answer_and_state():
    env = ToolEnv(initial_state={"x": 1})
    task = {"id": "t", "expected_answer": 42, "expected_state": {"x": 1}}
    assert check_task(task, "It is 42.", env).passed
    bad = check_task(task, "It is 41.", env)
    assert not bad.passed and bad.answer_ok is False and bad.state_ok is True and "41" in bad.details
    assert answer_ok("about 37.78 degrees", 37.7778, tolerance=0.01)
    assert not answer_ok("about 37.7 degrees", 37.7778, tolerance=0.01)
    assert answer_ok("수도는 하노이입니다.", ["Hanoi", "하노이"]) and answer_ok("It is PARIS.", "Paris")
    with pytest.raises(ValueError, match="neither"):
        check_task({"id": "empty"}, "x", env)


def test_run_episode_with_scripted_model():
    task = {"id": "ep", "tools": ["calculator", "kv_set"], "initial_state": {}, "expected_answer": 12.5,
            "expected_state": {"speed": 12.5}}
    script = iter([
        '<tool_call>{"name": "calculator", "arguments": {"expression": "10 / (48/60)"}}</tool_call>',
        '<tool_call>{"name": "kv_set", "arguments": {"key": "speed", "value": 12.5}}</tool_call>',
        "The average speed was 12.5 km/h.",
        "never reached",
    ])
    seen = []

    def generate(messages):
        seen.append(len(messages))
        return next(script)

    env = ToolEnv(task["tools"], task["initial_state"])
    messages, turns = run_episode(env, [{"role": "user", "content": "speed?"}], generate)
    assert seen == [1, 3, 5] and len(turns) == 3
    assert messages[2]["role"] == "tool" and '"result": 12.5' in messages[2]["content"]
    assert check_task(task, turns[-1], env).passed
    check, _ = replay_and_check(task, turns)  # replay in a fresh env gives the same verdict
    assert check.passed
