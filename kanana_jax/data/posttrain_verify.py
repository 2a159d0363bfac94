"""Verifiers of the post-training records: the checks the build runs, re-runnable on any shipped record.

`verify_records(records)` returns one `Verdict` per record; sandbox runs of all records go through one
`run_many` call. What is checked:
- reasoning documents ({"text"}): math: every written equation `a × b = c` recomputes (rewards.expr) and the
  \\boxed answer equals the last one; code: the first ```python block passes the second (its asserts).
- math (SFT, preference, prompts, arith): the gold `answer` equals `solution_expr` evaluated; a reply's
  extracted answer matches it (rewards.math) and its equations recompute.
- code: the reply's (or the prompt record's `reference`) code passes `tests` in the sandbox.
- tool: the assistant turns replay in a fresh ToolEnv with the recorded tool results, pass
  replay_and_check, and the structured messages round-trip through to_text_messages/from_text_messages.
- ifeval: evaluate_instructions(reply, constraints).all_passed.
- chat: every string of `expect` occurs in the final assistant reply.
- preference: the chosen side passes and the rejected side fails (code: the sandbox reports a failed test
  or a runtime error, never a timeout).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from kanana_jax.generate.tool_calls import ToolCall, from_text_messages, render_assistant_turn, to_text_messages
from kanana_jax.rewards.code_sandbox import SandboxLimits, extract_code, run_many
from kanana_jax.rewards.expr import ExprError, evaluate, format_number, numbers_equal
from kanana_jax.rewards.ifeval import evaluate_instructions
from kanana_jax.rewards.math import answers_match, extract_answer, extract_boxed
from kanana_jax.rewards.tools import replay_and_check

SANDBOX_LIMITS = SandboxLimits(timeout_s=10.0)
_ARITH = set("0123456789.,+-×÷/*^()% ")
_LIST_COMMA = re.compile(r",(?!\d{3}(?!\d))")
_OPERATOR = re.compile(r"[\d)%]\s*[-+×÷/*^]\s*[-(]*\s*\d")
_FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Verdict:
  ok: bool
  details: str


def _value(span: str):
  return evaluate(re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", span))


def _left_expr(text: str) -> str | None:
  """The arithmetic expression that ends `text` ('... hold 3 × 24' -> '3 × 24'), or None."""
  i = len(text)
  while i > 0 and text[i - 1] in _ARITH:
    i -= 1
  cuts = [m.end() for m in _LIST_COMMA.finditer(text[i:])]
  i += cuts[-1] if cuts else 0
  i += len(text[i:]) - len(text[i:].lstrip())
  span = text[i:].strip()
  if not _OPERATOR.search(span) or span[0] in "+×÷/*^%),.":
    return None
  before = text[:i].rstrip()
  if span[0] == "-" and before and before[-1].isascii() and before[-1].isalnum():  # 'x - 4': not a negative
    return None
  return span


def _right_expr(text: str) -> str | None:
  span = re.match(r"[\d.,+\-×÷/*^()% ]*", text).group(0)
  span = _LIST_COMMA.split(span)[0].strip().rstrip(".")
  return span if re.search(r"\d", span) else None


def check_equations(text: str) -> tuple[list[Any], list[str]]:
  """(values of the checked equations in order, problems): every 'expr = value' in `text` must hold."""
  values, problems = [], []
  for line in text.splitlines():
    parts = line.split(" = ")
    for left, right in zip(parts, parts[1:]):
      lhs, rhs = _left_expr(left), _right_expr(right)
      if lhs is None or rhs is None:
        continue
      try:
        a, b = _value(lhs), _value(rhs)
      except ExprError:
        continue
      if numbers_equal(a, b):
        values.append(b)
      else:
        problems.append(f"{lhs} = {rhs} is false ({lhs} is {format_number(a)})")
  return values, problems


def _assistant_text(messages: Sequence[dict]) -> str:
  return "\n\n".join(m["content"] for m in messages if m["role"] == "assistant")


def _math_reply(reply: str, answer: str) -> list[str]:
  problems = []
  values, bad = check_equations(reply)
  problems += bad
  if not values:
    problems.append("no equation in the reply could be recomputed")
  if not answers_match(extract_answer(reply), answer):
    problems.append(f"extracted answer {extract_answer(reply)!r} does not match {answer!r}")
  return problems


def _gold(record: dict) -> list[str]:
  try:
    value = evaluate(record["solution_expr"])
  except ExprError as err:
    return [f"solution_expr {record['solution_expr']!r} does not evaluate: {err}"]
  ok = answers_match(record["answer"], format_number(value))
  return [] if ok else [f"answer {record['answer']!r} != solution_expr value {format_number(value)}"]


def _tool_turns(messages: Sequence[dict]) -> list[str]:
  return [render_assistant_turn(m["content"], [ToolCall(c["name"], c["arguments"]) for c in m.get("tool_calls", ())])
          for m in messages if m["role"] == "assistant"]


def _tool_problems(record: dict, messages: Sequence[dict]) -> list[str]:
  check, traj = replay_and_check(record, _tool_turns(messages))
  problems = [] if check.passed else [f"replay_and_check failed: {check.details}"]
  recorded = [(m["name"], m["content"]) for m in messages if m["role"] == "tool"]
  replayed = [(r.name, r.content) for r in traj.responses]
  if recorded != replayed:
    problems.append(f"recorded tool results {recorded} differ from the replayed ones {replayed}")
  if from_text_messages(to_text_messages(messages)) != list(messages):
    problems.append("messages do not round-trip through to_text_messages/from_text_messages")
  return problems


def _reference_turns(reference: Sequence[dict]) -> list[str]:
  return [render_assistant_turn(s["content"], [ToolCall(c["name"], c["arguments"]) for c in s["calls"]])
          for s in reference]


def _side(record: dict, messages: Sequence[dict], jobs: list, want_pass: bool, label: str) -> list[str]:
  """Problems of one reply (list of assistant/tool messages) under the record's verifier; sandbox runs go to jobs."""
  bucket, reply = record["bucket"], _assistant_text(messages)
  if bucket == "math":
    problems = _math_reply(reply, record["answer"])
    if want_pass:
      return problems
    matched = answers_match(extract_answer(reply), record["answer"])
    return [f"{label}: the rejected answer matches the gold answer"] if matched else []
  if bucket == "code":
    jobs.append(({"program": extract_code(reply, record["entry_point"]), "tests": record["tests"],
                  "limits": SANDBOX_LIMITS}, want_pass, label))
    return []
  if bucket == "tool":
    return _tool_problems(record, messages)
  if bucket == "ifeval":
    passed = evaluate_instructions(reply, record["constraints"]).all_passed
    return [] if passed == want_pass else [f"{label}: constraints {'not ' if want_pass else ''}all satisfied"]
  if bucket == "chat":  # the expected strings belong to the final reply
    final = [m["content"] for m in messages if m["role"] == "assistant"][-1]
    missing = [e for e in record.get("expect", []) if e not in final]
    if want_pass:
      return [f"{label}: reply lacks {missing}"] if missing else []
    if not record.get("expect"):
      return [f"{label}: a chat preference pair needs 'expect' strings to tell the sides apart"]
    return [] if missing else [f"{label}: rejected reply has every expected string"]
  raise ValueError(f"record {record.get('id')!r}: unknown bucket {bucket!r}")


def _record_checks(record: dict, jobs: list) -> list[str]:
  """Immediate problems of a record; appends (sandbox job, want_pass, label) tuples to `jobs`."""
  if "text" in record:
    text = record["text"]
    if "\\boxed" in text:
      values, problems = check_equations(text)
      boxed = extract_boxed(text)
      if not values:
        return problems + ["no equation could be recomputed"]
      if boxed is None or not answers_match(boxed, format_number(values[-1])):
        problems.append(f"boxed answer {boxed!r} != last equation's value {format_number(values[-1])}")
      return problems
    blocks = _FENCE.findall(text)
    if len(blocks) != 2:
      return [f"a code document needs a solution block and a tests block, found {len(blocks)} python blocks"]
    jobs.append(({"program": blocks[0], "tests": blocks[1], "limits": SANDBOX_LIMITS}, True, "document"))
    return []
  problems = _gold(record) if "solution_expr" in record else []
  if "chosen" in record:
    return (problems + _side(record, record["chosen"], jobs, True, "chosen")
            + _side(record, record["rejected"], jobs, False, "rejected"))
  messages = record["messages"]
  if messages[-1]["role"] == "assistant":  # an SFT conversation
    return problems + _side(record, messages, jobs, True, "reply")
  bucket = record["bucket"]  # a prompt record: check its reference solution
  if bucket in ("math", "arith"):
    return problems
  if bucket == "code":
    jobs.append(({"program": record["reference"], "tests": record["tests"], "limits": SANDBOX_LIMITS}, True,
                 "reference"))
    return problems
  if bucket == "tool":
    check, _ = replay_and_check(record, _reference_turns(record["reference"]))
    return problems + ([] if check.passed else [f"reference fails replay_and_check: {check.details}"])
  if bucket == "ifeval":
    passed = evaluate_instructions(record["reference"], record["constraints"]).all_passed
    return problems + ([] if passed else ["reference does not satisfy every constraint"])
  raise ValueError(f"record {record.get('id')!r}: unknown prompt bucket {bucket!r}")


def verify_records(records: Sequence[dict], max_workers: int | None = None, sandbox: bool = True) -> list[Verdict]:
  """One Verdict per record (see the module docstring); sandbox jobs of all records run in one pool.

  `sandbox=False` skips the code runs (every other check still runs); the builders' determinism tests use it.
  """
  problems, jobs, owners = [], [], []
  for i, record in enumerate(records):
    mine: list = []
    problems.append(_record_checks(record, mine))
    jobs += mine
    owners += [i] * len(mine)
  if not sandbox:
    jobs = []
  results = run_many([j for j, _, _ in jobs], max_workers=max_workers) if jobs else []
  for (job, want_pass, label), owner, res in zip(jobs, owners, results):
    if want_pass and not res.passed:
      problems[owner].append(f"{label}: sandbox {res.reason}: {res.details[-300:]}")
    if not want_pass and (res.passed or res.reason not in ("failed", "runtime_error")):
      problems[owner].append(f"{label}: expected a failing test, sandbox says {res.reason}")
  return [Verdict(not p, "; ".join(p)) for p in problems]


def verify_record(record: dict) -> Verdict:
  """Re-runs the build-time verifier for one record of any kind."""
  return verify_records([record])[0]
