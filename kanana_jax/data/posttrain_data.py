"""The embedded post-training datasets: where they are, loading with validation, re-verification.

Kinds and names (every file exists as `<...>_train.jsonl` and `<...>_eval.jsonl`):
  reasoning   math_cot, code_cot                corpus/reasoning/<name>_<split>.jsonl   {"text": str} documents
  sft         chat, math, code, tool, ifeval    sft/<name>_<split>.jsonl                conversations to imitate
  preference  all                               preference/<split>.jsonl                chosen/rejected pairs
  prompts     math, code, tool, ifeval, arith   prompts/<name>_<split>.jsonl            prompts + verifier fields

Record fields (sft, preference, prompts): "id", "bucket" (chat|math|code|tool|ifeval|arith), "lang" (en|ko), then
- sft: "messages" (ends with the assistant); preference: "prompt" (ends with the user), "chosen" and "rejected"
  (assistant messages); prompts: "messages" (ends with the user; what suites.build_messages poses, without
  the confidence request). A message is {"role": system|user|assistant|tool, "content"}; assistant messages
  may carry "tool_calls": [{"name", "arguments"}] and tool messages carry "name", their content being the
  tool's JSON result (the structured form of generate/tool_calls.py, so to_text_messages renders it exactly
  as the tool environment does at inference).
- verifier fields by bucket: math/arith "answer", "solution_expr" (arith also "difficulty": operand digits
  1-3); code "entry_point", "tests" (prompts also "reference"); tool "tools", "initial_state",
  "expected_answer", "expected_state", "tolerance" (prompts also "reference": assistant steps
  [{"content", "calls"}] as in the eval suite); ifeval "constraints" (prompts also "reference"); chat
  "expect" (strings a good reply contains; required in preference pairs, with "reason"); preference ifeval
  "violated" (the constraint the rejected answer was made to break).
- optional "task_key": the generator's task key (the split follows it; see kanana_jax/data/synth/common.py).
"""
from __future__ import annotations

import importlib.resources
import json
from typing import Any, Iterator

from kanana_jax.data.posttrain_verify import Verdict, verify_record, verify_records
from kanana_jax.rewards.ifeval import make_constraint
from kanana_jax.rewards.tools import TOOLS

__all__ = ["KINDS", "NAMES", "SPLITS", "RecordError", "Verdict", "dataset_path", "datasets", "load_records",
           "read_records", "validate_record", "verify_record", "verify_records"]

KINDS = ("reasoning", "sft", "preference", "prompts")
NAMES = {"reasoning": ("math_cot", "code_cot"), "sft": ("chat", "math", "code", "tool", "ifeval"),
         "preference": ("all",), "prompts": ("math", "code", "tool", "ifeval", "arith")}
SPLITS = ("train", "eval")
BUCKETS = ("chat", "math", "code", "tool", "ifeval", "arith")
ROLES = ("system", "user", "assistant", "tool")
_MESSAGE_KEYS = {"role", "content", "tool_calls", "name"}


class RecordError(ValueError):
  """A record that does not follow the schema; the message names the file, the line and the field."""


def dataset_path(kind: str, name: str, split: str):
  """The packaged file (importlib.resources Traversable) of one dataset split."""
  if kind not in KINDS:
    raise ValueError(f"unknown dataset kind {kind!r}; choose from {KINDS}")
  if name not in NAMES[kind]:
    raise ValueError(f"unknown {kind} dataset {name!r}; choose from {NAMES[kind]}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
  root = importlib.resources.files("kanana_jax.data")
  if kind == "reasoning":
    return root.joinpath("corpus", "reasoning", f"{name}_{split}.jsonl")
  if kind == "preference":
    return root.joinpath("preference", f"{split}.jsonl")
  return root.joinpath(kind, f"{name}_{split}.jsonl")


def datasets() -> Iterator[tuple[str, str, str]]:
  """Every (kind, name, split) that ships with the package."""
  for kind in KINDS:
    for name in NAMES[kind]:
      for split in SPLITS:
        yield kind, name, split


def _need(rec: dict, field: str, typ: type, where: str) -> Any:
  """rec[field] when it exists and has type `typ` (a bool is not an int here), else RecordError."""
  val = rec.get(field)
  if field not in rec or not isinstance(val, typ) or (isinstance(val, bool) and typ is not bool):
    raise RecordError(f"{where}: field {field!r} missing or not {typ.__name__}")
  return val


def _messages(msgs: Any, field: str, where: str, last: str | tuple[str, ...] | None) -> None:
  if not isinstance(msgs, list) or not msgs:
    raise RecordError(f"{where}: field {field!r} must be a non-empty list of messages")
  for k, m in enumerate(msgs):
    at = f"{where}: field {field!r}[{k}]"
    if not isinstance(m, dict) or m.get("role") not in ROLES:
      raise RecordError(f"{at}: a message needs a role in {ROLES}")
    if set(m) - _MESSAGE_KEYS:
      raise RecordError(f"{at}: unexpected keys {sorted(set(m) - _MESSAGE_KEYS)}")
    if "content" not in m or (m["role"] != "tool" and not isinstance(m["content"], str)):
      raise RecordError(f"{at}: 'content' missing or not a string")
    if m["role"] == "tool" and not isinstance(m.get("name"), str):
      raise RecordError(f"{at}: a tool message needs the tool 'name'")
    if "tool_calls" in m:
      calls = m["tool_calls"]
      if m["role"] != "assistant" or not isinstance(calls, list) or not all(
          isinstance(c, dict) and set(c) == {"name", "arguments"} and isinstance(c["name"], str)
          and isinstance(c["arguments"], dict) for c in calls):
        raise RecordError(f"{at}: 'tool_calls' must be an assistant's list of {{'name', 'arguments'}} objects")
  if last is not None and msgs[-1]["role"] not in ((last,) if isinstance(last, str) else last):
    raise RecordError(f"{where}: field {field!r} must end with a {last} message, not {msgs[-1]['role']!r}")


def _bucket_fields(rec: dict, kind: str, where: str) -> None:
  bucket = rec["bucket"]
  if bucket in ("math", "arith"):
    _need(rec, "answer", str, where)
    _need(rec, "solution_expr", str, where)
    if bucket == "arith" and _need(rec, "difficulty", int, where) not in (1, 2, 3):
      raise RecordError(f"{where}: field 'difficulty' must be 1, 2 or 3 (operand digits)")
  elif bucket == "code":
    _need(rec, "entry_point", str, where)
    _need(rec, "tests", str, where)
  elif bucket == "tool":
    bad = [t for t in _need(rec, "tools", list, where) if t not in TOOLS]
    if bad:
      raise RecordError(f"{where}: field 'tools' names unknown tools {bad}; known: {sorted(TOOLS)}")
    _need(rec, "initial_state", dict, where)
    for field, types in (("expected_answer", (int, float, str, list, type(None))),
                         ("expected_state", (dict, type(None))), ("tolerance", (int, float, type(None)))):
      if field not in rec or not isinstance(rec[field], types):
        raise RecordError(f"{where}: field {field!r} missing or not {types}")
    if rec["expected_answer"] is None and rec["expected_state"] is None:
      raise RecordError(f"{where}: field 'expected_answer' and 'expected_state' are both null")
  elif bucket == "ifeval":
    for k, c in enumerate(_need(rec, "constraints", list, where)):
      try:
        make_constraint(c["id"], c.get("kwargs", {}))
      except (KeyError, TypeError, ValueError) as err:
        raise RecordError(f"{where}: field 'constraints'[{k}]: {err}") from None
  elif bucket == "chat" and ("expect" in rec or kind == "preference"):
    expect = _need(rec, "expect", list, where)
    if not expect or not all(isinstance(e, str) and e for e in expect):
      raise RecordError(f"{where}: field 'expect' must be a non-empty list of strings")
  if kind == "prompts" and bucket in ("code", "ifeval"):
    _need(rec, "reference", str, where)
  if kind == "prompts" and bucket == "tool":
    _need(rec, "reference", list, where)


def validate_record(rec: Any, kind: str, name: str, where: str = "record") -> None:
  """Raises RecordError (naming `where` and the field) unless `rec` follows the schema of kind/name."""
  if not isinstance(rec, dict):
    raise RecordError(f"{where}: a record must be a JSON object")
  if kind == "reasoning":
    if set(rec) != {"text"} or not isinstance(rec["text"], str) or not rec["text"].strip():
      raise RecordError(f"{where}: field 'text': a reasoning document is exactly {{'text': non-empty string}}")
    return
  if not _need(rec, "id", str, where):
    raise RecordError(f"{where}: field 'id' is empty")
  bucket = _need(rec, "bucket", str, where)
  allowed = ("chat", "math", "code", "ifeval") if kind == "preference" else (name,)
  if bucket not in allowed:
    raise RecordError(f"{where}: field 'bucket' is {bucket!r}; {kind}/{name} holds {allowed}")
  if _need(rec, "lang", str, where) not in ("en", "ko"):
    raise RecordError(f"{where}: field 'lang' must be 'en' or 'ko', got {rec['lang']!r}")
  if kind == "preference":
    _messages(rec.get("prompt"), "prompt", where, "user")
    _messages(rec.get("chosen"), "chosen", where, "assistant")
    _messages(rec.get("rejected"), "rejected", where, "assistant")
  else:
    _messages(rec.get("messages"), "messages", where, "assistant" if kind == "sft" else "user")
  _bucket_fields(rec, kind, where)


def read_records(path, kind: str, name: str, label: str | None = None) -> list[dict[str, Any]]:
  """Records of one JSONL file (a path or Traversable), validated; errors name `label` (or the path) and line."""
  label = label or str(path)
  records, seen = [], set()
  with path.open("r", encoding="utf-8") if hasattr(path, "open") else open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{label} line {lineno}"
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as err:
        raise RecordError(f"{where}: not valid JSON ({err})") from None
      validate_record(rec, kind, name, where)
      if "id" in rec:
        if rec["id"] in seen:
          raise RecordError(f"{where}: field 'id' repeats {rec['id']!r}")
        seen.add(rec["id"])
      records.append(rec)
  return records


def load_records(kind: str, name: str, split: str) -> list[dict[str, Any]]:
  """The validated records of one packaged dataset split, e.g. load_records('sft', 'math', 'train')."""
  path = dataset_path(kind, name, split)
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: rebuild with `python -m kanana_jax.data.synth.build` (or "
                            "corpus/build_reasoning.py), or reinstall kanana-jax with its package data")
  rel = {"reasoning": f"corpus/reasoning/{name}_{split}.jsonl", "preference": f"preference/{split}.jsonl"}
  return read_records(path, kind, name, label=rel.get(kind, f"{kind}/{name}_{split}.jsonl"))
