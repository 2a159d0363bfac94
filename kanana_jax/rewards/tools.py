"""Tool-use environment: real Python tools, a trajectory executor and a task checker.

Tools: `calculator` (safe evaluator, exact fractions), `convert_units` (length, mass,
temperature, volume, time, speed; exact factors), `kv_set`/`kv_get`/`kv_delete`/`kv_list`
(a key-value store that is the environment's state), `table_lookup` (small embedded
`countries` and `products` tables). Each tool has a JSON-schema spec for the system prompt;
arguments are validated against it and errors come back as `{"error": ...}` results, as a
model would see them. Tools are deterministic, so replaying a trajectory reproduces it.
"""

from __future__ import annotations

import copy
import dataclasses
from fractions import Fraction
from typing import Any, Callable, Sequence

from kanana_jax.generate.tool_calls import (ParsedTurn, ToolCall, ToolResponse, parse_tool_calls,
                                            render_tool_responses, render_tools_system_prompt)
from kanana_jax.rewards.expr import ExprError, Number, evaluate, format_number
from kanana_jax.rewards.math import answers_match, extract_answer, normalize_answer


def _as_json_number(x: Number) -> int | float:
    """Exact integers as int, everything else as a float rounded to 10 significant digits."""
    if isinstance(x, Fraction) and x.denominator == 1:
        return int(x)
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return float(f"{float(x):.10g}")


# ---------------------------------------------------------------- units
_LINEAR_UNITS: dict[str, tuple[str, Fraction]] = {  # unit -> (dimension, size in the SI base unit)
    "m": ("length", Fraction(1)), "km": ("length", Fraction(1000)), "cm": ("length", Fraction(1, 100)),
    "mm": ("length", Fraction(1, 1000)), "in": ("length", Fraction("0.0254")), "ft": ("length", Fraction("0.3048")),
    "yd": ("length", Fraction("0.9144")), "mi": ("length", Fraction("1609.344")),
    "kg": ("mass", Fraction(1)), "g": ("mass", Fraction(1, 1000)), "mg": ("mass", Fraction(1, 10**6)),
    "t": ("mass", Fraction(1000)), "lb": ("mass", Fraction("0.45359237")), "oz": ("mass", Fraction("0.45359237") / 16),
    "l": ("volume", Fraction(1)), "ml": ("volume", Fraction(1, 1000)), "gal": ("volume", Fraction("3.785411784")),
    "s": ("time", Fraction(1)), "min": ("time", Fraction(60)), "h": ("time", Fraction(3600)),
    "day": ("time", Fraction(86400)), "week": ("time", Fraction(604800)),
    "m/s": ("speed", Fraction(1)), "km/h": ("speed", Fraction(1000, 3600)),
    "mph": ("speed", Fraction("1609.344") / 3600),
}
_TEMPERATURE = ("c", "f", "k")
_ALIASES = {
    "meter": "m", "meters": "m", "metre": "m", "kilometer": "km", "kilometers": "km", "centimeter": "cm",
    "centimeters": "cm", "millimeter": "mm", "millimeters": "mm", "inch": "in", "inches": "in", "foot": "ft",
    "feet": "ft", "yard": "yd", "yards": "yd", "mile": "mi", "miles": "mi", "kilogram": "kg", "kilograms": "kg",
    "gram": "g", "grams": "g", "milligram": "mg", "tonne": "t", "ton": "t", "pound": "lb", "pounds": "lb",
    "lbs": "lb", "ounce": "oz", "ounces": "oz", "liter": "l", "liters": "l", "litre": "l", "milliliter": "ml",
    "milliliters": "ml", "gallon": "gal", "gallons": "gal", "sec": "s", "second": "s", "seconds": "s",
    "minute": "min", "minutes": "min", "hour": "h", "hours": "h", "hr": "h", "days": "day", "weeks": "week",
    "kph": "km/h", "kmh": "km/h", "celsius": "c", "°c": "c", "fahrenheit": "f", "°f": "f", "kelvin": "k",
    "미터": "m", "킬로미터": "km", "센티미터": "cm", "킬로그램": "kg", "그램": "g", "리터": "l",
    "섭씨": "c", "화씨": "f",
}


def _unit(name: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _LINEAR_UNITS and key not in _TEMPERATURE:
        raise ValueError(f"unknown unit {name!r}; known: {sorted(_LINEAR_UNITS) + list(_TEMPERATURE)}")
    return key


def convert(value: Number, from_unit: str, to_unit: str) -> Number:
    """Convert `value` between units of one dimension, exactly for Fraction input."""
    src, dst = _unit(from_unit), _unit(to_unit)
    if src in _TEMPERATURE or dst in _TEMPERATURE:
        if not (src in _TEMPERATURE and dst in _TEMPERATURE):
            raise ValueError(f"cannot convert {from_unit} to {to_unit}: only temperatures convert to temperatures")
        kelvin = {"c": lambda v: v + Fraction("273.15"), "f": lambda v: (v - 32) * Fraction(5, 9) + Fraction("273.15"),
                  "k": lambda v: v}[src](value)
        return {"c": lambda k: k - Fraction("273.15"), "f": lambda k: (k - Fraction("273.15")) * Fraction(9, 5) + 32,
                "k": lambda k: k}[dst](kelvin)
    (dim_a, size_a), (dim_b, size_b) = _LINEAR_UNITS[src], _LINEAR_UNITS[dst]
    if dim_a != dim_b:
        raise ValueError(f"cannot convert {from_unit} ({dim_a}) to {to_unit} ({dim_b})")
    return value * size_a / size_b


# ---------------------------------------------------------------- tables
TABLES: dict[str, dict[str, dict[str, Any]]] = {
    "countries": {  # key -> row; capitals, ISO 4217 currencies and ITU calling codes
        "south korea": {"capital": "Seoul", "currency": "KRW", "calling_code": 82, "continent": "Asia"},
        "japan": {"capital": "Tokyo", "currency": "JPY", "calling_code": 81, "continent": "Asia"},
        "china": {"capital": "Beijing", "currency": "CNY", "calling_code": 86, "continent": "Asia"},
        "india": {"capital": "New Delhi", "currency": "INR", "calling_code": 91, "continent": "Asia"},
        "vietnam": {"capital": "Hanoi", "currency": "VND", "calling_code": 84, "continent": "Asia"},
        "france": {"capital": "Paris", "currency": "EUR", "calling_code": 33, "continent": "Europe"},
        "germany": {"capital": "Berlin", "currency": "EUR", "calling_code": 49, "continent": "Europe"},
        "italy": {"capital": "Rome", "currency": "EUR", "calling_code": 39, "continent": "Europe"},
        "spain": {"capital": "Madrid", "currency": "EUR", "calling_code": 34, "continent": "Europe"},
        "united kingdom": {"capital": "London", "currency": "GBP", "calling_code": 44, "continent": "Europe"},
        "united states": {"capital": "Washington, D.C.", "currency": "USD", "calling_code": 1,
                          "continent": "North America"},
        "canada": {"capital": "Ottawa", "currency": "CAD", "calling_code": 1, "continent": "North America"},
        "mexico": {"capital": "Mexico City", "currency": "MXN", "calling_code": 52, "continent": "North America"},
        "brazil": {"capital": "Brasília", "currency": "BRL", "calling_code": 55, "continent": "South America"},
        "argentina": {"capital": "Buenos Aires", "currency": "ARS", "calling_code": 54, "continent": "South America"},
        "australia": {"capital": "Canberra", "currency": "AUD", "calling_code": 61, "continent": "Oceania"},
        "egypt": {"capital": "Cairo", "currency": "EGP", "calling_code": 20, "continent": "Africa"},
        "kenya": {"capital": "Nairobi", "currency": "KES", "calling_code": 254, "continent": "Africa"},
    },
    "products": {  # a fictional shop's catalogue: price in KRW, units in stock, shipping weight in grams
        "notebook": {"category": "stationery", "price_krw": 3500, "stock": 120, "weight_g": 250},
        "pen": {"category": "stationery", "price_krw": 1200, "stock": 500, "weight_g": 15},
        "backpack": {"category": "bags", "price_krw": 45000, "stock": 30, "weight_g": 900},
        "water bottle": {"category": "kitchen", "price_krw": 12000, "stock": 75, "weight_g": 350},
        "coffee mug": {"category": "kitchen", "price_krw": 8500, "stock": 60, "weight_g": 400},
        "desk lamp": {"category": "electronics", "price_krw": 32000, "stock": 18, "weight_g": 1200},
        "usb cable": {"category": "electronics", "price_krw": 6900, "stock": 210, "weight_g": 60},
        "headphones": {"category": "electronics", "price_krw": 59000, "stock": 25, "weight_g": 250},
        "umbrella": {"category": "accessories", "price_krw": 15000, "stock": 40, "weight_g": 500},
        "t-shirt": {"category": "clothing", "price_krw": 19000, "stock": 85, "weight_g": 200},
    },
}
_TABLE_ALIASES = {"korea": "south korea", "republic of korea": "south korea", "대한민국": "south korea",
                  "한국": "south korea", "일본": "japan", "중국": "china", "인도": "india", "베트남": "vietnam",
                  "프랑스": "france", "독일": "germany", "이탈리아": "italy", "스페인": "spain",
                  "영국": "united kingdom", "uk": "united kingdom", "usa": "united states", "us": "united states",
                  "미국": "united states",
                  "united states of america": "united states", "캐나다": "canada", "멕시코": "mexico",
                  "브라질": "brazil", "아르헨티나": "argentina", "호주": "australia", "이집트": "egypt",
                  "케냐": "kenya"}


# ---------------------------------------------------------------- tools
@dataclasses.dataclass(frozen=True)
class Tool:
    """A callable tool: name, description, JSON-schema `parameters`, and fn(env, **arguments)."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]

    def spec(self) -> dict[str, Any]:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


_JSON_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
               "object": (dict,), "array": (list,)}


def validate_arguments(schema: dict[str, Any], args: dict[str, Any]) -> str | None:
    """None when `args` fit the object schema (required, types, enums, no extras), else the problem."""
    props = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"missing required argument(s) {missing}"
    extra = [k for k in args if k not in props]
    if extra:
        return f"unexpected argument(s) {extra}; allowed: {sorted(props)}"
    for key, val in args.items():
        types = props[key].get("type", [])
        types = [types] if isinstance(types, str) else types
        ok = any(isinstance(val, _JSON_TYPES[t]) and not (t != "boolean" and isinstance(val, bool)) for t in types)
        if types and not ok:
            return f"argument {key!r}={val!r} must be of type {' or '.join(types)}"
        if "enum" in props[key] and val not in props[key]["enum"]:
            return f"argument {key!r}={val!r} must be one of {props[key]['enum']}"
    return None


def _num(x: int | float) -> Fraction:
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


def _terminates(x: Fraction) -> bool:
    """Whether x has a finite decimal expansion (denominator of the form 2^a 5^b)."""
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _calculator(env: "ToolEnv", expression: str) -> dict:
    val = evaluate(expression)
    if isinstance(val, Fraction) and not _terminates(val):
        return {"result": format_number(val), "approx": _as_json_number(val)}
    return {"result": _as_json_number(val)}


def _convert_units(env: "ToolEnv", value: int | float, from_unit: str, to_unit: str) -> dict:
    return {"value": _as_json_number(convert(_num(value), from_unit, to_unit)), "unit": to_unit}


def _kv_set(env: "ToolEnv", key: str, value: Any) -> dict:
    env.state[key] = value
    return {"ok": True}


def _kv_get(env: "ToolEnv", key: str) -> dict:
    if key not in env.state:
        raise KeyError(f"key {key!r} not found; existing keys: {sorted(env.state)}")
    return {"value": env.state[key]}


def _kv_delete(env: "ToolEnv", key: str) -> dict:
    if key not in env.state:
        raise KeyError(f"key {key!r} not found; existing keys: {sorted(env.state)}")
    del env.state[key]
    return {"ok": True}


def _kv_list(env: "ToolEnv") -> dict:
    return {"keys": sorted(env.state)}


def _table_lookup(env: "ToolEnv", table: str, key: str, column: str | None = None) -> dict:
    rows = TABLES[table]
    k = key.strip().lower()
    k = _TABLE_ALIASES.get(k, k)
    if k not in rows:
        raise KeyError(f"no row {key!r} in table {table!r}; rows: {sorted(rows)}")
    if column is None:
        return {"row": dict(rows[k])}
    if column not in rows[k]:
        raise KeyError(f"no column {column!r} in table {table!r}; columns: {sorted(rows[k])}")
    return {"value": rows[k][column]}


def _schema(props: dict[str, dict], required: Sequence[str]) -> dict:
    return {"type": "object", "properties": props, "required": list(required)}


_KV_VALUE = {"type": ["string", "number", "boolean"], "description": "value to store"}
TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("calculator", "Evaluate an arithmetic expression exactly (+ - * / ^, parentheses, %, sqrt, abs, round, "
         "min, max, log, ln, sin, cos, pi).",
         _schema({"expression": {"type": "string", "description": "e.g. '(12 + 30) * 3 / 4'"}}, ["expression"]),
         _calculator),
    Tool("convert_units", "Convert a value between units of length (m, km, cm, mm, in, ft, yd, mi), mass (kg, g, "
         "mg, t, lb, oz), temperature (C, F, K), volume (L, mL, gal), time (s, min, h, day, week) or speed "
         "(m/s, km/h, mph).",
         _schema({"value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
                 ["value", "from_unit", "to_unit"]),
         _convert_units),
    Tool("kv_set", "Store a value under a key in the key-value store (overwrites).",
         _schema({"key": {"type": "string"}, "value": _KV_VALUE}, ["key", "value"]), _kv_set),
    Tool("kv_get", "Read the value stored under a key.", _schema({"key": {"type": "string"}}, ["key"]), _kv_get),
    Tool("kv_delete", "Delete a key from the key-value store.", _schema({"key": {"type": "string"}}, ["key"]),
         _kv_delete),
    Tool("kv_list", "List the keys in the key-value store.", _schema({}, []), _kv_list),
    Tool("table_lookup", "Look up a row (or one column of it) by key in a table: 'countries' (columns capital, "
         "currency, calling_code, continent) or 'products' (columns category, price_krw, stock, weight_g).",
         _schema({"table": {"type": "string", "enum": sorted(TABLES)}, "key": {"type": "string"},
                  "column": {"type": "string"}}, ["table", "key"]),
         _table_lookup),
)}


# ---------------------------------------------------------------- environment
class ToolEnv:
    """Executes tool calls against a key-value `state`; keeps a log of (call, response) pairs."""

    def __init__(self, tools: Sequence[str] | None = None, initial_state: dict[str, Any] | None = None):
        names = list(TOOLS) if tools is None else list(tools)
        unknown = [n for n in names if n not in TOOLS]
        if unknown:
            raise ValueError(f"unknown tool(s) {unknown}; available: {sorted(TOOLS)}")
        self.tools = {n: TOOLS[n] for n in names}
        self.state: dict[str, Any] = copy.deepcopy(initial_state or {})
        self.log: list[tuple[ToolCall, ToolResponse]] = []

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]

    def system_prompt(self, instructions: str = "") -> str:
        return render_tools_system_prompt(self.specs(), instructions)

    def call(self, call: ToolCall) -> ToolResponse:
        """Run one call; unknown tools, bad arguments and tool failures become {'error': ...} results."""
        tool = self.tools.get(call.name)
        if tool is None:
            resp = ToolResponse(call.name, {"error": f"unknown tool {call.name!r}; available: {sorted(self.tools)}"})
        elif (problem := validate_arguments(tool.parameters, call.arguments)) is not None:
            resp = ToolResponse(call.name, {"error": problem})
        else:
            try:
                resp = ToolResponse(call.name, tool.fn(self, **call.arguments))
            except (ExprError, ValueError, KeyError, TypeError, ZeroDivisionError) as err:
                msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
                resp = ToolResponse(call.name, {"error": msg})
        self.log.append((call, resp))
        return resp

    def step(self, assistant_text: str) -> tuple[ParsedTurn, list[ToolResponse]]:
        """Parse one assistant turn and run its calls in order; malformed blocks get error results."""
        turn = parse_tool_calls(assistant_text)
        responses = [self.call(c) for c in turn.calls]
        responses += [ToolResponse("", {"error": f"malformed tool call: {e.message}"}) for e in turn.errors]
        return turn, responses


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """Result of replaying assistant turns: every call and response, the final text, malformed-call count."""

    calls: tuple[ToolCall, ...]
    responses: tuple[ToolResponse, ...]
    final_answer: str
    n_errors: int


def execute_trajectory(turns: Sequence[str], env: ToolEnv) -> Trajectory:
    """Run every tool call in the assistant turns, in order; the final answer is the last turn's text."""
    calls, responses, n_errors = [], [], 0
    for text in turns:
        turn, resps = env.step(text)
        calls += turn.calls
        responses += resps
        n_errors += len(turn.errors)
    final = parse_tool_calls(turns[-1]).content if turns else ""
    return Trajectory(tuple(calls), tuple(responses), final, n_errors)


def run_episode(env: ToolEnv, messages: Sequence[dict], generate: Callable[[list[dict]], str],
                max_turns: int = 8) -> tuple[list[dict], list[str]]:
    """Alternate `generate(messages) -> assistant text` with tool execution until a turn has no calls.

    Returns the full plain-text message list (tool results as role 'tool') and the assistant turns.
    """
    msgs, turns = list(messages), []
    for _ in range(max_turns):
        reply = generate(msgs)
        turns.append(reply)
        msgs.append({"role": "assistant", "content": reply})
        turn, resps = env.step(reply)
        if not turn.has_calls:
            break
        msgs.append({"role": "tool", "content": render_tool_responses(resps)})
    return msgs, turns


@dataclasses.dataclass(frozen=True)
class TaskCheck:
    """Verdict for a tool task: answer and state checks (None when the task does not specify one)."""

    passed: bool
    answer_ok: bool | None
    state_ok: bool | None
    details: str


def answer_ok(final_answer: str, expected: Any, tolerance: float | None = None) -> bool:
    """Numeric expected answers compare on the extracted answer (within `tolerance` if given); text ones as substrings.

    A list of expected answers accepts any of them (e.g. ["Hanoi", "하노이"]).
    """
    if isinstance(expected, list):
        return any(answer_ok(final_answer, e, tolerance) for e in expected)
    if isinstance(expected, (int, float)) or normalize_answer(str(expected)).values is not None:
        pred = extract_answer(final_answer)
        if tolerance is None:
            return answers_match(pred, expected)
        got, want = normalize_answer(pred or "").values, normalize_answer(str(expected)).values
        if not got or not want or len(got) != 1 or len(want) != 1:
            return False
        return any(abs(float(a) - float(b)) <= tolerance for a in got[0] for b in want[0])
    norm = lambda s: " ".join(str(s).lower().split())  # noqa: E731
    return norm(expected) in norm(final_answer)


def check_task(task: dict[str, Any], final_answer: str, env: ToolEnv) -> TaskCheck:
    """Check a tool task's `expected_answer` (with optional `tolerance`) and exact `expected_state`."""
    ans = None if task.get("expected_answer") is None else answer_ok(
        final_answer, task["expected_answer"], task.get("tolerance"))
    state = None if task.get("expected_state") is None else env.state == task["expected_state"]
    if ans is None and state is None:
        raise ValueError(f"tool task {task.get('id')!r} sets neither expected_answer nor expected_state")
    details = []
    if ans is False:
        details.append(f"answer {final_answer[-200:]!r} does not match {task['expected_answer']!r}")
    if state is False:
        details.append(f"state {env.state!r} != expected {task['expected_state']!r}")
    return TaskCheck(ans is not False and state is not False, ans, state, "; ".join(details))


def replay_and_check(task: dict[str, Any], turns: Sequence[str]) -> tuple[TaskCheck, Trajectory]:
    """Replay assistant turns in a fresh environment built from the task, then check it."""
    env = ToolEnv(task.get("tools"), task.get("initial_state"))
    traj = execute_trajectory(turns, env)
    return check_task(task, traj.final_answer, env), traj
