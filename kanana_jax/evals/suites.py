"""Embedded eval suites (`kanana_jax/evals/suites/<name>.jsonl`, one JSON object per line) and prompts.

Fields (every item has `id`):
- math:   `lang` ('en'|'ko'), `question`, `answer` (str: integer, decimal, a/b, or LaTeX like 25\\pi),
          `solution_expr` (arithmetic expression whose value is the answer; tests recompute it).
- code:   `prompt`, `entry_point` (function name, or null for stdin/stdout programs), `reference`
          (a solution that passes), `tests` (assert statements run after the program; '' for io tasks),
          optional `io` (list of {'stdin', 'stdout'} cases, compared line by line, trailing spaces ignored).
- ifeval: `lang`, `prompt`, `constraints` (list of {'id', 'kwargs'} from rewards.ifeval.REGISTRY),
          `reference` (a response satisfying every constraint).
- tools:  `lang`, `prompt`, `tools` (tool names from rewards.tools.TOOLS), `initial_state` (key-value store),
          `expected_answer` (number, string, list of accepted strings, or null), optional `tolerance`
          (absolute, for numeric answers), `expected_state` (exact final store, or null), `reference`
          (list of assistant steps {'content', 'calls': [{'name', 'arguments'}]}; the last step is the answer).
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any, Sequence

from kanana_jax.evals.calibration import CONFIDENCE_INSTRUCTION, CONFIDENCE_INSTRUCTION_KO
from kanana_jax.rewards.tools import ToolEnv

SUITE_NAMES = ("math", "code", "ifeval", "tools")
_REQUIRED: dict[str, dict[str, type | tuple[type, ...]]] = {
    "math": {"id": str, "lang": str, "question": str, "answer": str, "solution_expr": str},
    "code": {"id": str, "prompt": str, "entry_point": (str, type(None)), "reference": str, "tests": str},
    "ifeval": {"id": str, "lang": str, "prompt": str, "constraints": list, "reference": str},
    "tools": {"id": str, "lang": str, "prompt": str, "tools": list, "initial_state": dict, "reference": list},
}


def suite_path(name: str):
    """Path (importlib.resources Traversable) of a packaged suite file."""
    if name not in SUITE_NAMES:
        raise ValueError(f"unknown eval suite {name!r}; choose from {SUITE_NAMES}")
    return importlib.resources.files("kanana_jax.evals").joinpath("suites", f"{name}.jsonl")


def _validate(name: str, item: dict[str, Any], where: str) -> None:
    for key, typ in _REQUIRED[name].items():
        if key not in item or not isinstance(item[key], typ):
            raise ValueError(f"{where}: field {key!r} missing or not {typ}; see kanana_jax/evals/suites.py docstring")
    if name == "tools" and item.get("expected_answer") is None and item.get("expected_state") is None:
        raise ValueError(f"{where}: a tools item needs expected_answer or expected_state")
    if name == "code" and not item["tests"].strip() and not item.get("io"):
        raise ValueError(f"{where}: a code item needs tests or io cases")


def load_suite(name: str, lang: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """Items of one suite, validated; optionally only one language ('en'/'ko') and the first `limit`."""
    items, seen = [], set()
    text = suite_path(name).read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"suites/{name}.jsonl line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        _validate(name, item, where)
        if item["id"] in seen:
            raise ValueError(f"{where}: duplicate id {item['id']!r}")
        seen.add(item["id"])
        if lang is None or item.get("lang", "en") == lang:
            items.append(item)
    return items[:limit] if limit is not None else items


def parse_suite_list(spec: str | Sequence[str]) -> list[str]:
    """'math,code' or ['math', 'code'] -> validated suite names, in order, without repeats."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in names if s not in SUITE_NAMES]
    if bad or not names:
        raise ValueError(f"--suite must list names from {SUITE_NAMES} separated by commas; got {spec!r}")
    return list(dict.fromkeys(names))


def build_messages(suite: str, item: dict[str, Any], ask_confidence: bool = True) -> list[dict[str, str]]:
    """Chat messages that pose an item to a model (tool items get the tool system prompt).

    `ask_confidence` appends the 'Confidence: NN%' request; ifeval never gets it (it would break
    format constraints), so its calibration uses answer log-probabilities instead.
    """
    ko = item.get("lang") == "ko"
    conf = ("\n\n" + (CONFIDENCE_INSTRUCTION_KO if ko else CONFIDENCE_INSTRUCTION)) if ask_confidence else ""
    if suite == "math":
        how = ("단계별로 풀이한 뒤 최종 답을 \\boxed{} 안에 쓰세요." if ko
               else "Reason step by step, then put the final answer in \\boxed{}.")
        return [{"role": "user", "content": f"{item['question']}\n\n{how}{conf}"}]
    if suite == "code":
        how = ("Read from standard input and write to standard output." if item.get("entry_point") is None
               else f"Define `{item['entry_point']}` exactly as specified.")
        return [{"role": "user", "content": f"{item['prompt']}\n\n{how} Return the complete solution in one "
                                            f"```python code block.{conf}"}]
    if suite == "ifeval":
        return [{"role": "user", "content": item["prompt"]}]
    if suite == "tools":
        system = ToolEnv(item["tools"], item["initial_state"]).system_prompt(
            "You are a helpful assistant. Use the tools to get exact results; do not guess values.")
        return [{"role": "system", "content": system}, {"role": "user", "content": item["prompt"] + conf}]
    raise ValueError(f"unknown eval suite {suite!r}; choose from {SUITE_NAMES}")
