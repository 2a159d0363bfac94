"""Builds the post-training datasets: python -m kanana_jax.data.synth.build [--out DATA_DIR] [--no-sandbox].

Writes, under DATA_DIR (default: the kanana_jax/data package folder):
  sft/{chat,math,code,tool,ifeval}_{train,eval}.jsonl           message records for supervised fine-tuning
  preference/{train,eval}.jsonl                                 chosen/rejected pairs (DPO, reward models)
  prompts/{math,code,tool,ifeval,arith}_{train,eval}.jsonl      prompts + verifier fields (rejection sampling, RL)
Record schemas: kanana_jax/data/posttrain_data.py. Every record passes kanana_jax.data.posttrain_verify before
anything is written (`--no-sandbox` skips only the code runs; the bytes written are the same). Each dataset
draws from its own seeded RNG, the eval split of every task follows its key (synth.common.is_eval), and no
task overlaps an eval-suite item (synth.common.EvalGuard). Re-running gives identical bytes.
"""
from __future__ import annotations

import argparse
import os
import random

from kanana_jax.data.posttrain_verify import verify_records
from kanana_jax.data.synth import chat_items, code_items, ifeval_items, math_items, tool_items
from kanana_jax.data.synth.common import EvalGuard, fill_splits, is_eval, write_jsonl
from kanana_jax.evals.suites import build_messages

DATA_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {  # (train, eval) per dataset and bucket; code uses every task (split by key)
    "sft": {"chat": (300, 16), "math": (260, 14), "tool": (80, 5), "ifeval": (120, 7)},
    "preference": {"chat": (80, 4), "math": (80, 4), "code": (60, 4), "ifeval": (60, 4)},
    "prompts": {"math": (280, 15), "tool": (56, 4), "ifeval": (100, 6)},
}
ARITH = {1: None, 2: (240, 40), 3: (240, 40)}  # operand digits -> (train, eval); 1-digit: every problem
ARITH_EVAL_FRACTION = 0.2
SPLITS = ("train", "eval")


# ------------------------------------------------------------------ pools (tasks drawn per dataset)
def _rng(kind: str, bucket: str) -> random.Random:
  return random.Random(f"kanana-posttrain/{kind}/{bucket}")


def math_pool(kind, n, guard):
  def draw(r):
    item = math_items.draw_item(r, r.choice(["en", "ko"]))
    return None if item is None else {"key": item.key, "lang": item.lang, "prompt": item.question, "item": item}
  return [[t["item"] for t in part] for part in fill_splits(draw, _rng(kind, "math"), *n, guard)]


def code_pool():
  tasks = code_items.all_tasks()
  return [t for t in tasks if not is_eval(t.key)], [t for t in tasks if is_eval(t.key)]


def _user_text(messages):
  return "\n".join(m["content"] for m in messages if m["role"] == "user")


def tool_pool(kind, n, guard, single_user=False):
  def draw(r):
    task = tool_items.draw_task(r, r.choice(["en", "ko"]))
    if task is None or (single_user and sum(m["role"] == "user" for m in task["messages"]) > 1):
      return None
    return task
  return fill_splits(draw, _rng(kind, "tool"), *n, guard, text_of=lambda t: _user_text(t["messages"]))


def ifeval_pool(kind, n, guard):
  return fill_splits(lambda r: ifeval_items.make_task(r, r.choice(["en", "ko"])), _rng(kind, "ifeval"), *n, guard,
                     check_numbers=False)


def chat_pool(kind, n, guard):
  def draw(r):
    conv = chat_items.draw_chat(r, r.choice(["en", "ko"]))
    return {**conv, "prompt": conv["turns"][0], "users": "\n".join(conv["turns"][0::2])}
  return fill_splits(draw, _rng(kind, "chat"), *n, guard, text_of=lambda t: t["users"])


# ------------------------------------------------------------------ rendering
def math_reply(item: math_items.MathItem, steps=None, answer=None) -> str:
  steps, answer = steps or item.steps, answer or item.answer
  if item.lang == "en":
    body = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(steps))
    return f"{body}\n\nThe final answer is \\boxed{{{answer}}}."
  body = "\n".join(f"{i + 1}단계: {s}" for i, s in enumerate(steps))
  return f"{body}\n\n따라서 최종 답은 \\boxed{{{answer}}}입니다."


def math_prompt(item):
  return build_messages("math", {"question": item.question, "lang": item.lang}, ask_confidence=False)


def code_prompt(task):
  return build_messages("code", {"prompt": task.prompt, "entry_point": task.entry_point}, ask_confidence=False)


def _assistant(text):
  return {"role": "assistant", "content": text}


def _head(prefix, bucket, split, i, lang):
  return {"id": f"{prefix}-{bucket}-{split}-{i:04d}", "bucket": bucket, "lang": lang}


# ------------------------------------------------------------------ datasets
def sft_files(guard) -> dict[str, list[dict]]:
  files = {}
  for split, convs in zip(SPLITS, chat_pool("sft", COUNTS["sft"]["chat"], guard)):
    files[f"chat_{split}"] = [{**_head("sft", "chat", split, i, c["lang"]), "messages": chat_items.messages(c),
                               "expect": c["expect"], "task_key": c["key"]} for i, c in enumerate(convs)]
  for split, items in zip(SPLITS, math_pool("sft", COUNTS["sft"]["math"], guard)):
    files[f"math_{split}"] = [{**_head("sft", "math", split, i, it.lang),
                               "messages": math_prompt(it) + [_assistant(math_reply(it))], "answer": it.answer,
                               "solution_expr": it.expr, "task_key": it.key} for i, it in enumerate(items)]
  for split, tasks in zip(SPLITS, code_pool()):
    files[f"code_{split}"] = [{**_head("sft", "code", split, i, t.lang),
                               "messages": code_prompt(t) + [_assistant(code_items.reply(t, t.solution))],
                               "entry_point": t.entry_point, "tests": t.tests, "task_key": t.key}
                              for i, t in enumerate(tasks)]
  for split, tasks in zip(SPLITS, tool_pool("sft", COUNTS["sft"]["tool"], guard)):
    files[f"tool_{split}"] = [{**_head("sft", "tool", split, i, t["lang"]), "messages": t["messages"],
                               "tools": t["tools"], "initial_state": t["initial_state"],
                               "expected_answer": t["expected_answer"], "expected_state": t["expected_state"],
                               "tolerance": t["tolerance"], "task_key": t["key"]} for i, t in enumerate(tasks)]
  for split, tasks in zip(SPLITS, ifeval_pool("sft", COUNTS["sft"]["ifeval"], guard)):
    files[f"ifeval_{split}"] = [{**_head("sft", "ifeval", split, i, t["lang"]),
                                 "messages": [{"role": "user", "content": t["prompt"]}, _assistant(t["answer"])],
                                 "constraints": t["constraints"], "task_key": t["key"]} for i, t in enumerate(tasks)]
  return {f"sft/{name}.jsonl": recs for name, recs in files.items()}


def _chat_reason(conv) -> str:
  family = conv["key"].split("/")[1]
  if family in ("refusal", "harmless"):
    return {"refusal": "unsafe", "harmless": "over_refusal"}[family]
  return "unhelpful" if conv["bad"] in chat_items.BRUSH_OFF[conv["lang"]] else "wrong_fact"


def preference_files(guard) -> dict[str, list[dict]]:
  parts: dict[str, list[dict]] = {"train": [], "eval": []}
  r = _rng("preference", "mix")
  for split, convs in zip(SPLITS, chat_pool("preference", COUNTS["preference"]["chat"], guard)):
    for c in convs:
      msgs = chat_items.messages(c)
      parts[split].append({"bucket": "chat", "lang": c["lang"], "prompt": msgs[:-1], "chosen": msgs[-1:],
                           "rejected": [_assistant(c["bad"])], "expect": c["expect"], "reason": _chat_reason(c),
                           "task_key": c["key"]})
  for split, items in zip(SPLITS, math_pool("preference", COUNTS["preference"]["math"], guard)):
    for it in items:
      steps, wrong = math_items.with_wrong_answer(r, it)
      parts[split].append({"bucket": "math", "lang": it.lang, "prompt": math_prompt(it),
                           "chosen": [_assistant(math_reply(it))], "rejected": [_assistant(math_reply(it, steps, wrong))],
                           "answer": it.answer, "solution_expr": it.expr, "task_key": it.key})
  n_train, n_eval = COUNTS["preference"]["code"]
  for split, tasks, n in zip(SPLITS, code_pool(), (n_train, n_eval)):
    for t in r.sample(tasks, n):
      parts[split].append({"bucket": "code", "lang": t.lang, "prompt": code_prompt(t),
                           "chosen": [_assistant(code_items.reply(t, t.solution))],
                           "rejected": [_assistant(code_items.reply(t, t.wrong))], "entry_point": t.entry_point,
                           "tests": t.tests, "task_key": t.key})
  for split, tasks in zip(SPLITS, ifeval_pool("preference", COUNTS["preference"]["ifeval"], guard)):
    for t in tasks:
      bad, broken = ifeval_items.violate(r, t)
      parts[split].append({"bucket": "ifeval", "lang": t["lang"], "prompt": [{"role": "user", "content": t["prompt"]}],
                           "chosen": [_assistant(t["answer"])], "rejected": [_assistant(bad)],
                           "constraints": t["constraints"], "violated": broken, "task_key": t["key"]})
  files = {}
  for split, recs in parts.items():
    r.shuffle(recs)  # buckets mixed, in a fixed order
    files[f"preference/{split}.jsonl"] = [{"id": f"pref-{split}-{i:04d}", **rec} for i, rec in enumerate(recs)]
  return files


def arith_problems(guard) -> tuple[list[dict], list[dict]]:
  """Single-step sums and differences; 'difficulty' is the number of digits of each operand."""
  def problem(a, op, b, lang):
    expr = f"{a}{op}{b}"
    text = f"{expr}=? Answer in \\boxed{{}}." if lang == "en" else f"{expr}=? 답을 \\boxed{{}}에 쓰세요."
    return {"key": f"arith/{expr}", "lang": lang, "prompt": text, "expr": expr,
            "answer": str(a + b if op == "+" else a - b), "difficulty": len(str(max(a, b)))}

  train, held = [], []
  one = [(a, op, b) for a in range(10) for b in range(10) for op in "+-" if op == "+" or a >= b]
  for a, op, b in one:
    for lang in ("en", "ko"):
      p = problem(a, op, b, lang)
      if not guard.clashes(p["prompt"]):
        (held if is_eval(p["key"], ARITH_EVAL_FRACTION) else train).append(p)
  for digits, n in ARITH.items():
    if n is None:
      continue
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1

    def draw(r, lo=lo, hi=hi):
      a, b, op = r.randint(lo, hi), r.randint(lo, hi), r.choice("+-")
      a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
      return problem(a, op, b, r.choice(["en", "ko"]))
    t, h = fill_splits(draw, _rng("prompts", f"arith{digits}"), *n, guard, fraction=ARITH_EVAL_FRACTION)
    train += t
    held += h
  return train, held


def prompt_files(guard) -> dict[str, list[dict]]:
  files = {}
  for split, items in zip(SPLITS, math_pool("prompts", COUNTS["prompts"]["math"], guard)):
    files[f"math_{split}"] = [{**_head("prompt", "math", split, i, it.lang), "messages": math_prompt(it),
                               "answer": it.answer, "solution_expr": it.expr, "task_key": it.key}
                              for i, it in enumerate(items)]
  for split, tasks in zip(SPLITS, code_pool()):
    files[f"code_{split}"] = [{**_head("prompt", "code", split, i, t.lang), "messages": code_prompt(t),
                               "entry_point": t.entry_point, "tests": t.tests, "reference": t.solution,
                               "task_key": t.key} for i, t in enumerate(tasks)]
  for split, tasks in zip(SPLITS, tool_pool("prompts", COUNTS["prompts"]["tool"], guard, single_user=True)):
    files[f"tool_{split}"] = [{**_head("prompt", "tool", split, i, t["lang"]), "messages": t["messages"][:2],
                               "tools": t["tools"], "initial_state": t["initial_state"],
                               "expected_answer": t["expected_answer"], "expected_state": t["expected_state"],
                               "tolerance": t["tolerance"], "reference": tool_items.reference_steps(t),
                               "task_key": t["key"]} for i, t in enumerate(tasks)]
  for split, tasks in zip(SPLITS, ifeval_pool("prompts", COUNTS["prompts"]["ifeval"], guard)):
    files[f"ifeval_{split}"] = [{**_head("prompt", "ifeval", split, i, t["lang"]),
                                 "messages": [{"role": "user", "content": t["prompt"]}],
                                 "constraints": t["constraints"], "reference": t["answer"], "task_key": t["key"]}
                                for i, t in enumerate(tasks)]
  for split, probs in zip(SPLITS, arith_problems(guard)):
    files[f"arith_{split}"] = [{**_head("prompt", "arith", split, i, p["lang"]), "difficulty": p["difficulty"],
                                "messages": [{"role": "user", "content": p["prompt"]}], "answer": p["answer"],
                                "solution_expr": p["expr"]} for i, p in enumerate(probs)]
  return {f"prompts/{name}.jsonl": recs for name, recs in files.items()}


def build(sandbox: bool = True) -> dict[str, list[dict]]:
  """Relative path -> records, every record verified (ValueError naming file and line otherwise)."""
  guard = EvalGuard()
  files = {**sft_files(guard), **preference_files(guard), **prompt_files(guard)}
  flat = [(name, i, rec) for name, recs in files.items() for i, rec in enumerate(recs)]
  verdicts = verify_records([rec for _, _, rec in flat], sandbox=sandbox)
  bad = [(name, i, v.details) for (name, i, _), v in zip(flat, verdicts) if not v.ok]
  if bad:
    raise ValueError(f"{len(bad)} records fail verification; first: {bad[0][0]} line {bad[0][1] + 1}: {bad[0][2]}")
  ids = [rec["id"] for _, _, rec in flat]
  if len(set(ids)) != len(ids):
    raise ValueError("duplicate record ids")
  return files


def write(out_dir: str = DATA_DIR, sandbox: bool = True) -> dict[str, int]:
  return {name: write_jsonl(os.path.join(out_dir, name), recs) for name, recs in build(sandbox).items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=DATA_DIR, help="data folder that gets sft/, preference/, prompts/")
  parser.add_argument("--no-sandbox", action="store_true", help="skip the sandbox runs (same output bytes)")
  args = parser.parse_args()
  sizes = write(args.out, sandbox=not args.no_sandbox)
  for name, size in sorted(sizes.items()):
    print(f"{name:32s} {size / 1024:8.1f} KB")
  print(f"{'total':32s} {sum(sizes.values()) / 1024:8.1f} KB")


if __name__ == "__main__":
  main()
