"""Mid-training reasoning documents: chain-of-thought math and code, English and Korean, verified when built.

Math: a word problem (kanana_jax.data.synth.math_items), numbered steps and a final line with the answer
in \\boxed{}; the boxed answer must match (rewards.math.answers_match) the value of the item's solution
expression computed by rewards.expr, and every equation written in the steps must recompute.
Code: a function task (kanana_jax.data.synth.code_items), the reasoning in prose, the solution in a
```python block and its assert tests in a second block; build_reasoning.py runs every solution with its
tests in the sandbox (rewards.code_sandbox.run_many). Held-out documents are the tasks whose key
kanana_jax.data.synth.common.is_eval selects, so the same task is held out in every dataset.
"""
from __future__ import annotations

import random

from kanana_jax.data.synth import code_items, math_items
from kanana_jax.data.synth.common import EvalGuard, fill_splits, is_eval
from kanana_jax.rewards.expr import evaluate, format_number
from kanana_jax.rewards.math import answers_match, extract_boxed


def math_document(item: math_items.MathItem) -> str:
  """'Problem: ...', numbered steps, 'Final answer: \\boxed{x}' (문제 / N단계 / 최종 답 in Korean)."""
  if item.lang == "en":
    steps = "\n".join(f"Step {i + 1}: {s}" for i, s in enumerate(item.steps))
    return f"Problem: {item.question}\n\n{steps}\nFinal answer: \\boxed{{{item.answer}}}"
  steps = "\n".join(f"{i + 1}단계: {s}" for i, s in enumerate(item.steps))
  return f"문제: {item.question}\n\n{steps}\n최종 답: \\boxed{{{item.answer}}}"


def check_math_document(doc: str, item: math_items.MathItem) -> None:
  """Raises unless the boxed answer matches the independently evaluated solution expression."""
  gold = format_number(evaluate(item.expr))
  if not answers_match(extract_boxed(doc), gold):
    raise ValueError(f"{item.key}: boxed answer {extract_boxed(doc)!r} != value of {item.expr!r} ({gold})")


def math_documents(seed: int, n_train: int, n_eval: int, guard: EvalGuard) -> tuple[list[str], list[str]]:
  """Train and held-out math documents, alternating English and Korean draws."""
  def draw(r: random.Random):
    item = math_items.draw_item(r, r.choice(["en", "ko"]))
    return None if item is None else {"key": item.key, "lang": item.lang, "prompt": item.question, "item": item}

  train, held = fill_splits(draw, random.Random(seed), n_train, n_eval, guard)
  out = []
  for part in (train, held):
    docs = []
    for task in part:
      doc = math_document(task["item"])
      check_math_document(doc, task["item"])
      docs.append(doc)
    out.append(docs)
  return out[0], out[1]


def code_documents(guard: EvalGuard) -> tuple[list[tuple[str, code_items.CodeTask]], list[tuple[str, code_items.CodeTask]]]:
  """(document, task) pairs for every code task in both languages, split by task key."""
  train, held = [], []
  for task in code_items.all_tasks():
    if guard.clashes(task.prompt, check_numbers=False) or task.entry_point in guard.entry_points:
      raise ValueError(f"code task {task.key} overlaps the eval suite")
    (held if is_eval(task.key) else train).append((code_items.cot_document(task), task))
  return train, held
