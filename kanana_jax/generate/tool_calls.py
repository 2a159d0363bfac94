"""Hermes-style tool calling text format: `<tool_call>{json}</tool_call>` and `<tool_response>` blocks.

An assistant turn is free text plus zero or more blocks, each holding one JSON object
`{"name": str, "arguments": {...}}` (a JSON list of such objects is accepted too). Tool results
go back as `<tool_response>{"name": str, "content": ...}</tool_response>` blocks, several per
message. Malformed blocks are reported as `ToolCallError`s, never raised.
Structured messages use OpenAI-like dicts: assistant `{"role", "content", "tool_calls": [...]}`
and tool `{"role": "tool", "name", "content"}`; `to_text_messages`/`from_text_messages` convert.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Sequence

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
_CALL_RE = re.compile(r"<tool_call>(.*?)(</tool_call>|\Z)", re.DOTALL)
_RESPONSE_RE = re.compile(r"<tool_response>(.*?)</tool_response>", re.DOTALL)
_FENCE_RE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One requested function call: tool name and a JSON-object of arguments."""

    name: str
    arguments: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": self.arguments}


@dataclasses.dataclass(frozen=True)
class ToolCallError:
    """A `<tool_call>` block that could not be used: its position among blocks, raw text and why."""

    index: int
    raw: str
    message: str


@dataclasses.dataclass(frozen=True)
class ParsedTurn:
    """An assistant turn split into its free text, its well-formed calls and its malformed blocks."""

    content: str
    calls: tuple[ToolCall, ...]
    errors: tuple[ToolCallError, ...]

    @property
    def has_calls(self) -> bool:
        return bool(self.calls or self.errors)


@dataclasses.dataclass(frozen=True)
class ToolResponse:
    """A tool's result for the model: the tool name and JSON-serialisable content."""

    name: str
    content: Any


def _call_from_obj(obj: Any) -> ToolCall | str:
    """A ToolCall from a decoded JSON value, or a message saying what is wrong with it."""
    if not isinstance(obj, dict):
        return f"a tool call must be a JSON object, got {type(obj).__name__}"
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return "a tool call needs a non-empty string 'name'"
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models emit the arguments object as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            return f"'arguments' of {name!r} is a string that is not valid JSON: {err}"
    if not isinstance(args, dict):
        return f"'arguments' of {name!r} must be a JSON object, got {type(args).__name__}"
    extra = set(obj) - {"name", "arguments", "parameters", "id", "type"}
    if extra:
        return f"tool call {name!r} has unexpected keys {sorted(extra)}; use only 'name' and 'arguments'"
    return ToolCall(name.strip(), args)


def parse_tool_calls(text: str) -> ParsedTurn:
    """Split an assistant turn into free text, tool calls (in order) and malformed-block errors.

    A final block missing `</tool_call>` (the stop string was cut off) still parses if its JSON is complete.
    """
    calls: list[ToolCall] = []
    errors: list[ToolCallError] = []
    for index, m in enumerate(_CALL_RE.finditer(text)):
        body = m.group(1).strip()
        fence = _FENCE_RE.match(body)
        body = fence.group(1) if fence else body
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as err:
            unterminated = "" if m.group(2) else " (block has no closing </tool_call>)"
            errors.append(ToolCallError(index, m.group(1), f"invalid JSON: {err}{unterminated}"))
            continue
        for item in (obj if isinstance(obj, list) else [obj]):
            parsed = _call_from_obj(item)
            if isinstance(parsed, ToolCall):
                calls.append(parsed)
            else:
                errors.append(ToolCallError(index, m.group(1), parsed))
    content = _CALL_RE.sub("", text).strip()
    return ParsedTurn(content, tuple(calls), tuple(errors))


def _dumps(obj: Any) -> str:
    """UTF-8 JSON whose strings cannot close a block ('</' is written as the JSON escape '<\\/')."""
    return json.dumps(obj, ensure_ascii=False).replace("</", "<\\/")


def render_tool_call(call: ToolCall) -> str:
    """`<tool_call>` block for one call (UTF-8 JSON, Korean kept readable)."""
    return f"{CALL_OPEN}\n{_dumps(call.to_json())}\n{CALL_CLOSE}"


def render_assistant_turn(content: str, calls: Sequence[ToolCall] = ()) -> str:
    """Assistant text followed by one `<tool_call>` block per call."""
    parts = [content.strip()] if content.strip() else []
    parts += [render_tool_call(c) for c in calls]
    return "\n".join(parts)


def render_tool_response(response: ToolResponse) -> str:
    """`<tool_response>` block for one result."""
    payload = {"name": response.name, "content": response.content}
    return f"{RESPONSE_OPEN}\n{_dumps(payload)}\n{RESPONSE_CLOSE}"


def render_tool_responses(responses: Sequence[ToolResponse]) -> str:
    """All results of one assistant turn, in call order, as one message body."""
    return "\n".join(render_tool_response(r) for r in responses)


def parse_tool_responses(text: str) -> list[ToolResponse]:
    """ToolResponses from `<tool_response>` blocks; a block that is not our JSON keeps its raw text."""
    out = []
    for m in _RESPONSE_RE.finditer(text):
        body = m.group(1).strip()
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "content" in obj:
            out.append(ToolResponse(obj["name"], obj["content"]))
        else:
            out.append(ToolResponse("", body))
    return out


def render_tools_system_prompt(tool_specs: Sequence[dict], instructions: str = "") -> str:
    """System prompt listing tool specs (JSON-schema style) and how to call them."""
    specs = "\n".join(json.dumps(s, ensure_ascii=False) for s in tool_specs)
    head = instructions.strip() + "\n\n" if instructions.strip() else ""
    return (
        f"{head}# Tools\n\nThese functions are available; their JSON signatures are listed between "
        f"<tools> and </tools>:\n<tools>\n{specs}\n</tools>\n\n"
        "To use a function, emit one block per call (several blocks in one turn are allowed):\n"
        f'{CALL_OPEN}\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n{CALL_CLOSE}\n'
        f"Each result arrives in a {RESPONSE_OPEN} block. When no more calls are needed, reply with the "
        "final answer in plain text."
    )


def to_text_messages(messages: Sequence[dict], tool_role: str = "tool") -> list[dict]:
    """Structured messages -> plain {'role', 'content'} messages with Hermes blocks.

    Consecutive tool messages merge into one `tool_role` message holding one block per result.
    """
    out: list[dict] = []
    for msg in messages:
        role = msg.get("role")
        if role == "assistant":
            calls = [c if isinstance(c, ToolCall) else ToolCall(c["name"], dict(c.get("arguments", {})))
                     for c in msg.get("tool_calls", ())]
            out.append({"role": "assistant", "content": render_assistant_turn(msg.get("content") or "", calls)})
        elif role == "tool":
            block = render_tool_response(ToolResponse(msg.get("name", ""), msg.get("content")))
            if out and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": tool_role, "content": block, "_tool": True})
        elif role in ("system", "user"):
            out.append({"role": role, "content": msg.get("content", "")})
        else:
            raise ValueError(f"unknown message role {role!r}; expected system, user, assistant or tool")
    for msg in out:
        msg.pop("_tool", None)
    return out


def from_text_messages(messages: Sequence[dict], tool_role: str = "tool") -> list[dict]:
    """Plain Hermes-text messages -> structured messages (inverse of `to_text_messages`).

    Malformed call blocks stay in the assistant content (so nothing the model wrote is lost).
    """
    out: list[dict] = []
    for msg in messages:
        role, content = msg.get("role"), msg.get("content", "")
        if role == "assistant":
            turn = parse_tool_calls(content)
            kept = turn.content
            if turn.errors:
                kept = "\n".join([kept] + [f"{CALL_OPEN}{e.raw}{CALL_CLOSE}" for e in turn.errors]).strip()
            item: dict = {"role": "assistant", "content": kept}
            if turn.calls:
                item["tool_calls"] = [c.to_json() for c in turn.calls]
            out.append(item)
        elif role == tool_role and RESPONSE_OPEN in content:
            out.extend({"role": "tool", "name": r.name, "content": r.content} for r in parse_tool_responses(content))
        else:
            out.append({"role": role, "content": content})
    return out
