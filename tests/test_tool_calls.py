"""Hermes-style tool-call text: parse/render round trips, several calls per turn, malformed blocks."""

import json
import random

from kanana_jax.generate.tool_calls import (ToolCall, ToolResponse, from_text_messages, parse_tool_calls,
                                            parse_tool_responses, render_assistant_turn, render_tool_call,
                                            render_tool_responses, render_tools_system_prompt, to_text_messages)


def _random_args(rng: random.Random) -> dict:
    keys = ["city", "value", "unit", "키", "flags", "nested"]
    out = {}
    for k in rng.sample(keys, rng.randint(0, len(keys))):  # values include a literal </tool_call>
        out[k] = rng.choice([rng.randint(-1000, 1000), rng.random(), "서울 </tool_call> \"quoted\"", True, None,
                             [1, "two", {"three": 3}], {"a": {"b": []}}])
    return out


def test_round_trip_random_calls():
    rng = random.Random(0)
    for _ in range(50):
        calls = [ToolCall(rng.choice(["calculator", "kv_set", "table_lookup"]), _random_args(rng))
                 for _ in range(rng.randint(0, 4))]
        content = rng.choice(["", "Let me check.", "먼저 계산하겠습니다.\n두 번째 줄"])
        text = render_assistant_turn(content, calls)
        parsed = parse_tool_calls(text)
        assert parsed.calls == tuple(calls)
        assert parsed.content == content.strip()
        assert parsed.errors == ()


def test_several_calls_in_one_turn_keep_order():
    text = ('I will look both up.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call>')
    turn = parse_tool_calls(text)
    assert [c.name for c in turn.calls] == ["a", "b"] and turn.content == "I will look both up."
    assert turn.has_calls


def test_malformed_blocks_are_reported_not_raised():
    text = ("<tool_call>{not json}</tool_call>"
            '<tool_call>{"arguments": {}}</tool_call>'
            '<tool_call>{"name": "f", "arguments": [1]}</tool_call>'
            '<tool_call>{"name": "g", "arguments": {"ok": 1}, "extra": 2}</tool_call>'
            '<tool_call>["h"]</tool_call>'
            '<tool_call>{"name": "good", "arguments": {}}</tool_call>')
    turn = parse_tool_calls(text)
    assert [c.name for c in turn.calls] == ["good"]
    assert [e.index for e in turn.errors] == [0, 1, 2, 3, 4]
    assert "invalid JSON" in turn.errors[0].message and "'name'" in turn.errors[1].message
    assert "must be a JSON object" in turn.errors[2].message and "unexpected keys" in turn.errors[3].message


def test_lenient_forms_accepted():
    # arguments as a JSON string, a fenced body, a list of calls, and a block cut at the stop string
    text = ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>'
            '<tool_call>```json\n{"name": "g", "parameters": {"y": 3}}\n```</tool_call>'
            '<tool_call>[{"name": "h", "arguments": {}}, {"name": "i", "arguments": {}}]</tool_call>'
            '<tool_call>\n{"name": "j", "arguments": {"z": 4}}\n')
    turn = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in turn.calls] == [("f", {"x": 2}), ("g", {"y": 3}), ("h", {}), ("i", {}),
                                                            ("j", {"z": 4})]
    cut = parse_tool_calls('<tool_call>\n{"name": "j", "argu')
    assert not cut.calls and "no closing" in cut.errors[0].message


def test_no_calls_is_plain_text():
    turn = parse_tool_calls("The answer is 42.")
    assert turn.calls == () and turn.errors == () and not turn.has_calls and turn.content == "The answer is 42."


def test_tool_responses_round_trip():
    resps = [ToolResponse("calculator", {"result": 42}), ToolResponse("table_lookup", {"value": "서울"})]
    text = render_tool_responses(resps)
    assert text.count("<tool_response>") == 2 and "서울" in text  # Korean stays readable
    assert parse_tool_responses(text) == resps
    assert parse_tool_responses("<tool_response>raw text</tool_response>") == [ToolResponse("", "raw text")]


def test_multi_turn_messages_round_trip():
    structured = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "What is 6*7, and Korea's capital?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"name": "calculator", "arguments": {"expression": "6*7"}},
            {"name": "table_lookup", "arguments": {"table": "countries", "key": "korea", "column": "capital"}}]},
        {"role": "tool", "name": "calculator", "content": {"result": 42}},
        {"role": "tool", "name": "table_lookup", "content": {"value": "Seoul"}},
        {"role": "assistant", "content": "Let me store it.", "tool_calls": [
            {"name": "kv_set", "arguments": {"key": "answer", "value": 42}}]},
        {"role": "tool", "name": "kv_set", "content": {"ok": True}},
        {"role": "assistant", "content": "42, and the capital is Seoul."},
    ]
    text = to_text_messages(structured)
    assert [m["role"] for m in text] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert text[3]["content"].count("<tool_response>") == 2  # consecutive results merge into one message
    assert text[2]["content"].count("<tool_call>") == 2
    assert from_text_messages(text) == structured
    as_user = to_text_messages(structured, tool_role="user")
    assert from_text_messages(as_user, tool_role="user") == structured


def test_render_tool_call_and_system_prompt():
    block = render_tool_call(ToolCall("calculator", {"expression": "1+1"}))
    assert block.startswith("<tool_call>\n") and block.endswith("\n</tool_call>")
    assert json.loads(block.split("\n")[1]) == {"name": "calculator", "arguments": {"expression": "1+1"}}
    spec = {"type": "function", "function": {"name": "calculator", "description": "d", "parameters": {}}}
    prompt = render_tools_system_prompt([spec], "Be brief.")
    assert prompt.startswith("Be brief.") and json.dumps(spec) in prompt and "<tool_call>" in prompt
