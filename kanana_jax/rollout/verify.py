"""Verification of sampled completions against their prompt records, in the real environments.

`verify(records, samples)` -> one `Verdict(passed, reward, reason, details)` per sample:
- math / arith: the answer in the LAST \\boxed{} (the format every prompt set asks for; no fallback to the last
  number in the text, which pays any text that happens to contain it) against the record's `answer`
  (rewards.math.answers_match); reasons 'correct', 'wrong_answer', 'no_answer'.
- code: the last ```python block runs with the record's `tests` in the sandbox (rewards.code_sandbox.run_many:
  separate processes in parallel, wall/CPU/memory limits, no network, writes confined); reason 'correct' or the
  sandbox's ('failed' = a test failed, 'timeout', 'memory', 'runtime_error', 'syntax_error', 'fork',
  'forbidden_write', 'network', 'output_limit').
- tool: the episode's assistant turns replay in a fresh ToolEnv and the task's expected answer / final state
  are checked (rewards.tools.replay_and_check); 'correct' or 'wrong_answer'.
- ifeval: every constraint holds (rewards.ifeval); 'correct' or 'constraint_failed'.
- chat: not verifiable: reward from a `scorer` (e.g. rewards.reward_model.RewardModelScorer), reason 'scored'.

Reward kinds (the clean-base ablations of Shao et al. 2025), for verifiable buckets:
  verifiable   1 if passed, else 0
  random       Bernoulli(random_rate) from (seed, prompt id, sample index, round), whatever the answer
  format       1 if the answer is in the expected format (math: a parseable final answer; code: a python block;
               tool: a final answer without calls; ifeval: non-empty), right or wrong
  incorrect    math/arith only: 1 if the answer equals a fixed WRONG label (the gold answer + 1)
`passed` is always the true verdict, so pass rates stay honest whatever is rewarded.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Callable, Sequence

from kanana_jax.rewards.code_sandbox import SandboxLimits, extract_code, run_many
from kanana_jax.rewards.expr import ExprError, evaluate, format_number
from kanana_jax.rewards.ifeval import evaluate_instructions
from kanana_jax.rewards.math import answers_match, extract_boxed
from kanana_jax.rewards.tools import replay_and_check

REWARD_KINDS = ("verifiable", "random", "format", "incorrect")
VERIFIABLE = ("math", "arith", "code", "tool", "ifeval")


@dataclasses.dataclass(frozen=True)
class Verdict:
    passed: bool      # the true verdict
    reward: float     # what the reward kind pays
    reason: str
    details: str = ""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One completion of a prompt: its final assistant text, every assistant turn (tool episodes have several),
    the generated messages (assistant and tool turns, structured), tokens generated and why it stopped."""
    text: str
    turns: tuple[str, ...]
    messages: tuple[dict, ...]
    n_tokens: int
    finish_reason: str


def wrong_label(answer: str) -> str:
    """The fixed incorrect label of a math answer: its value + 1 (the answer itself + ' + 1' if not numeric)."""
    try:
        return format_number(evaluate(answer) + 1)
    except (ExprError, TypeError, ValueError, ZeroDivisionError):
        return f"{answer} + 1"


def _bernoulli(rate: float, *parts) -> bool:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2 ** 64 < rate


def boxed_answer(text: str) -> str | None:
    boxed = extract_boxed(text)
    return boxed.strip() if boxed is not None and boxed.strip() else None


def _math(record, sample):
    pred = boxed_answer(sample.text)
    if pred is None:
        return False, "no_answer", "no final answer found", False
    ok = answers_match(pred, record["answer"])
    return ok, "correct" if ok else "wrong_answer", f"extracted {pred!r}, gold {record['answer']!r}", True


def _tool(record, sample):
    check, traj = replay_and_check(record, list(sample.turns))
    fmt = bool(traj.final_answer.strip())
    return check.passed, "correct" if check.passed else "wrong_answer", check.details or f"{len(traj.calls)} calls", fmt


def _ifeval(record, sample):
    result = evaluate_instructions(sample.text, record["constraints"])
    failed = [c["id"] for c, ok in zip(record["constraints"], result.per_constraint) if not ok]
    return (result.all_passed, "correct" if result.all_passed else "constraint_failed",
            f"failed {failed}" if failed else "all constraints hold", bool(sample.text.strip()))


def verify(records: Sequence[dict], samples: Sequence[Sample], *, reward_kind: str = "verifiable",
           random_rate: float = 0.5, salt: str = "", limits: SandboxLimits = SandboxLimits(timeout_s=5.0),
           max_workers: int | None = None, scorer: Callable[[list], Sequence[float]] | None = None) -> list[Verdict]:
    """One Verdict per (record, sample) pair (see the module docstring); code runs in parallel sandboxes."""
    if reward_kind not in REWARD_KINDS:
        raise ValueError(f"reward kind {reward_kind!r}; allowed: {', '.join(REWARD_KINDS)}")
    if len(records) != len(samples):
        raise ValueError(f"got {len(samples)} samples for {len(records)} records; pass one record per sample")
    out: list[Verdict | None] = [None] * len(samples)
    code = [i for i, r in enumerate(records) if r["bucket"] == "code"]
    results = run_many([{"program": extract_code(samples[i].text, records[i].get("entry_point")),
                         "tests": records[i]["tests"], "limits": limits} for i in code], max_workers) if code else []
    by_index = dict(zip(code, results))
    chat = [i for i, r in enumerate(records) if r["bucket"] == "chat"]
    if chat and scorer is None:
        raise ValueError("chat prompts have no verifier: give a scorer (a reward model) for their track")
    scores = dict(zip(chat, scorer([list(records[i]["messages"]) + list(samples[i].messages) for i in chat]))) \
        if chat else {}
    for i, (record, sample) in enumerate(zip(records, samples)):
        bucket = record["bucket"]
        if bucket == "chat":
            out[i] = Verdict(False, float(scores[i]), "scored", f"reward model score {float(scores[i]):.4f}")
            continue
        if bucket in ("math", "arith"):
            passed, reason, details, fmt = _math(record, sample)
        elif bucket == "code":
            res = by_index[i]
            passed, reason = res.passed, "correct" if res.passed else res.reason
            details, fmt = res.details[-300:], "```" in sample.text
        elif bucket == "tool":
            passed, reason, details, fmt = _tool(record, sample)
        elif bucket == "ifeval":
            passed, reason, details, fmt = _ifeval(record, sample)
        else:
            raise ValueError(f"record {record.get('id')!r}: bucket {bucket!r} has no verifier")
        if reward_kind == "verifiable":
            reward = float(passed)
        elif reward_kind == "random":
            reward = float(_bernoulli(random_rate, salt, record["id"], i))
        elif reward_kind == "format":
            reward = float(fmt)
        else:
            if bucket not in ("math", "arith"):
                raise ValueError(f"reward kind 'incorrect' needs a numeric answer: bucket {bucket!r} has none "
                                 "(use it on math / arith tracks)")
            pred = boxed_answer(sample.text)
            reward = float(pred is not None and answers_match(pred, wrong_label(record["answer"])))
        out[i] = Verdict(passed, reward, reason, details)
    return out
