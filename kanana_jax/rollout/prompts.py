"""Prompt sets for rollouts (rejection sampling, RL): records with a prompt conversation and what its verifier needs.

Specs (comma-free names may be listed: 'prompts:math,arith'):
  prompts:NAME[,NAME]   the embedded prompt sets of kanana_jax/data/prompts (math, code, tool, ifeval, arith)
  sft:BUCKET[,BUCKET]   the prompts of embedded SFT conversations (everything before the last assistant turn),
                        e.g. for a chat track scored by a reward model
  FILE.jsonl            your own records; '{split}' in the path selects the split, else every 25th is held out
A record: {"id", "bucket": math|arith|code|tool|ifeval|chat, "messages": [... ending with a user turn], plus the
bucket's verifier fields (answer; entry_point + tests; tools + initial_state + expected_answer/expected_state
[+ tolerance]; constraints)} (data/posttrain_data.py validates them). A bad record in a file names the file,
line and field.
"""
from __future__ import annotations

import json

from kanana_jax.data import posttrain_data
from kanana_jax.data.sources import EVAL_EVERY, BadRecordError

BUCKETS = ("math", "arith", "code", "tool", "ifeval", "chat")


def _from_sft(record: dict) -> dict:
    msgs = record["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {**{k: v for k, v in record.items() if k != "messages"}, "messages": msgs[:last]}


def _read_file(path: str, split_from: str | None) -> list[dict]:
    out = []
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"prompt file {path!r} cannot be read: {e}") from e
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadRecordError(path, where, f"malformed JSON ({e.msg} at column {e.colno})") from e
            bucket = rec.get("bucket") if isinstance(rec, dict) else None
            if bucket not in BUCKETS:
                raise BadRecordError(path, where, f"field 'bucket': {bucket!r} is not one of {'|'.join(BUCKETS)}")
            try:
                posttrain_data.validate_record(rec, "prompts", bucket, where)
            except posttrain_data.RecordError as e:
                raise BadRecordError(path, where, str(e).split(": ", 1)[-1]) from e
            out.append(rec)
    if split_from is not None:
        held = [i % EVAL_EVERY == EVAL_EVERY - 1 for i in range(len(out))]
        out = [r for r, h in zip(out, held) if h == (split_from == "eval")]
    return out


def load_prompts(spec: str, split: str) -> list[dict]:
    """The validated prompt records of `spec` (module docstring) for `split` ('train' | 'eval'), in file order."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    kind, _, names = spec.partition(":")
    if kind in ("prompts", "sft") and names:
        records = []
        for name in (n.strip() for n in names.split(",") if n.strip()):
            got = posttrain_data.load_records(kind, name, split)
            records += [_from_sft(r) for r in got] if kind == "sft" else got
        return records
    if spec.endswith(".jsonl") or "{split}" in spec:
        if "{split}" in spec:
            return _read_file(spec.replace("{split}", split), None)
        return _read_file(spec, split)
    raise ValueError(f"prompt spec {spec!r}: use prompts:NAME[,NAME], sft:BUCKET[,BUCKET] or a *.jsonl file")


def gold_reply(record: dict) -> str | None:
    """A reply known to pass a prompt record's verifier, or None where the record has none: math / arith
    '\\boxed{answer}', code its `reference` in a python block, ifeval its `reference` text (tool and chat: None).
    For warm-start SFT data and held-out losses; rejection sampling keeps only what the policy itself wrote."""
    bucket = record.get("bucket")
    if bucket in ("math", "arith") and record.get("answer") is not None:
        return f"\\boxed{{{record['answer']}}}"
    if bucket == "code" and isinstance(record.get("reference"), str):
        return f"```python\n{record['reference'].rstrip()}\n```"
    if bucket == "ifeval" and isinstance(record.get("reference"), str):
        return record["reference"]
    return None


def gold_records(records: list[dict]) -> list[dict]:
    """Message records (prompt + `gold_reply`) of the records that have a gold reply, for SFT."""
    out = []
    for r in records:
        reply = gold_reply(r)
        if reply is not None:
            out.append({"id": r["id"], "bucket": r["bucket"],
                        "messages": list(r["messages"]) + [{"role": "assistant", "content": reply}]})
    return out
