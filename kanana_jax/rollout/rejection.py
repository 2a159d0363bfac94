"""Rejection sampling's host-side pieces: sample rows, selection of the passing samples, the kept SFT records with
their provenance, and a round's sampling metrics. Pure functions of the rows in a round's samples.jsonl, so a
resumed round rebuilds exactly what an uninterrupted one wrote (train/stages/rejection_sampling.py drives them).

A sample row (one line of samples.jsonl): round, chunk, prompt_id, bucket, sample_index, completion (the final
assistant text), turns (every assistant turn; several for tool episodes), messages (the generated turns,
structured: assistant with tool_calls, tool results), n_tokens, finish_reason, passed, verdict ('pass' | 'fail'),
reason, details, reward, params_step, params_checksum.

Selection, per prompt, over its PASSING samples (after `dedup` drops a completion whose turns equal an earlier
sample's of the same prompt):
  all       every one, in sample order
  shortest  the single shortest (fewest generated tokens; ties: lower sample index)
  best_k    the best_k of highest reward (ties: fewer tokens, then lower sample index)
then `max_per_prompt` (0 = no cap) keeps the first that many of that order.
"""
from __future__ import annotations

import collections
from typing import Iterable, Sequence

from kanana_jax.rollout.verify import Sample, Verdict

SELECTIONS = ("all", "shortest", "best_k")


def as_sample(x) -> Sample:
    """A policy's output as a Sample: a Sample as is, or a plain string as a one-turn completion (tokens counted
    as UTF-8 bytes)."""
    if isinstance(x, Sample):
        return x
    if isinstance(x, str):
        return Sample(x, (x,), ({"role": "assistant", "content": x},), len(x.encode("utf-8")), "stop_token")
    raise TypeError(f"a policy returns Samples or strings per prompt, got {type(x).__name__}")


def sample_row(record: dict, index: int, sample: Sample, verdict: Verdict, **where) -> dict:
    """The samples.jsonl row of one verified sample (`where`: round, chunk, params_step, params_checksum)."""
    row = {**{k: where[k] for k in ("round", "chunk") if k in where},
           "prompt_id": record["id"], "bucket": record["bucket"], "sample_index": index,
           "completion": sample.text, "turns": list(sample.turns), "messages": [dict(m) for m in sample.messages],
           "n_tokens": int(sample.n_tokens), "finish_reason": sample.finish_reason, "passed": bool(verdict.passed),
           "verdict": "pass" if verdict.passed else "fail", "reason": verdict.reason, "details": verdict.details,
           "reward": float(verdict.reward)}
    row.update({k: v for k, v in where.items() if k not in ("round", "chunk")})
    return row


def select(rows: Sequence[dict], selection: str = "all", *, best_k: int = 1, max_per_prompt: int = 0,
           dedup: bool = True) -> list[dict]:
    """The kept rows (module docstring), prompts in first-seen order, each prompt's rows in the selection's order."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection {selection!r}; allowed: {', '.join(SELECTIONS)}")
    by_prompt: dict[str, list[dict]] = collections.OrderedDict()
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    kept = []
    for group in by_prompt.values():
        group = sorted(group, key=lambda r: r["sample_index"])
        passing, seen = [], set()
        for row in group:
            if not row["passed"]:
                continue
            text = tuple(row["turns"]) or (row["completion"],)
            if dedup and text in seen:
                continue
            seen.add(text)
            passing.append(row)
        if selection == "shortest":
            passing = sorted(passing, key=lambda r: (r["n_tokens"], r["sample_index"]))[:1]
        elif selection == "best_k":
            passing = sorted(passing, key=lambda r: (-r["reward"], r["n_tokens"], r["sample_index"]))[:best_k]
        kept += passing[:max_per_prompt] if max_per_prompt else passing
    return kept


PROVENANCE_KEYS = ("round", "chunk", "prompt_id", "sample_index", "reason", "details", "reward", "n_tokens",
                   "finish_reason", "params_step", "params_checksum", "policy")


def kept_record(prompt: dict, row: dict) -> dict:
    """The SFT message record of a kept sample: the prompt's messages + the generated turns, with provenance."""
    generated = row["messages"] or [{"role": "assistant", "content": row["completion"]}]
    rec = {"id": f"{row['prompt_id']}/r{row['round']}/s{row['sample_index']}", "bucket": prompt["bucket"],
           "messages": list(prompt["messages"]) + list(generated),
           "provenance": {k: row[k] for k in PROVENANCE_KEYS if k in row}}
    if prompt.get("lang"):
        rec["lang"] = prompt["lang"]
    tools = prompt.get("tools")
    if isinstance(tools, list) and tools and all(isinstance(t, (str, dict)) for t in tools):
        rec["tools"] = tools
    return rec


def pass_rates(rows: Iterable[dict], prefix: str = "") -> dict:
    """pass@1 (mean over prompts of the share of its samples that pass) and pass@k (share of prompts with at least
    one passing sample; k = samples per prompt), overall and per bucket ('<prefix>pass@1/<bucket>')."""
    per_prompt: dict[str, list] = collections.OrderedDict()
    bucket_of = {}
    for row in rows:
        per_prompt.setdefault(row["prompt_id"], []).append(bool(row["passed"]))
        bucket_of[row["prompt_id"]] = row["bucket"]
    out = {}
    groups = {"": list(per_prompt)}
    for pid, bucket in bucket_of.items():
        groups.setdefault(f"/{bucket}", []).append(pid)
    for suffix, pids in groups.items():
        if not pids:
            continue
        out[f"{prefix}pass@1{suffix}"] = sum(sum(per_prompt[p]) / len(per_prompt[p]) for p in pids) / len(pids)
        out[f"{prefix}pass@k{suffix}"] = sum(any(per_prompt[p]) for p in pids) / len(pids)
    return out


def round_metrics(rows: Sequence[dict], kept: Sequence[dict]) -> dict:
    """A round's sampling numbers: prompts, samples, pass@1 / pass@k (per bucket), kept count (per bucket), mean
    kept length in generated tokens, failure reasons ('fail/<reason>': counts) and finish reasons."""
    out = {"prompts": len({r["prompt_id"] for r in rows}), "samples": len(rows), **pass_rates(rows)}
    out["kept"] = len(kept)
    out["kept_prompts"] = len({r["prompt_id"] for r in kept})
    for bucket, n in sorted(collections.Counter(r["bucket"] for r in kept).items()):
        out[f"kept/{bucket}"] = n
    out["kept_mean_tokens"] = sum(r["n_tokens"] for r in kept) / len(kept) if kept else 0.0
    out["sample_mean_tokens"] = sum(r["n_tokens"] for r in rows) / len(rows) if rows else 0.0
    for reason, n in sorted(collections.Counter(r["reason"] for r in rows if not r["passed"]).items()):
        out[f"fail/{reason}"] = n
    for reason, n in sorted(collections.Counter(r["finish_reason"] for r in rows).items()):
        out[f"finish/{reason}"] = n
    return out
