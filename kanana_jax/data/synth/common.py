"""Shared pieces of the generators: task keys and splits, the eval-suite guard, number formatting, JSONL output.

Splits: every generated task has a `key` (family and parameters, no language); `is_eval(key)` decides by a
stable hash, so a task that two datasets both draw (an SFT math problem and an RL prompt) lands in the same
split in both, and no held-out task is ever trained on. `EvalGuard` rejects any task whose prompt text
overlaps an eval-suite prompt (kanana_jax/evals/suites/) or whose ordered numbers equal those of an eval
math or tools question.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from fractions import Fraction
from typing import Any, Callable, Iterable

from kanana_jax.evals.suites import SUITE_NAMES, load_suite

# The corpus generators (facts tables, names, Korean particles) are scripts that import each other by
# bare name, as build_corpus.py runs them; make that work when the synth package imports them.
CORPUS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus")
if CORPUS_DIR not in sys.path:
  sys.path.insert(0, CORPUS_DIR)

import facts  # noqa: E402  pylint: disable=wrong-import-position
from gen_math import ITEMS, NAMES_EN, NAMES_KO, has_batchim, josa  # noqa: E402  pylint: disable=wrong-import-position

__all__ = ["facts", "ITEMS", "NAMES_EN", "NAMES_KO", "has_batchim", "josa", "EVAL_FRACTION", "is_eval",
           "EvalGuard", "numbers_in", "fmt", "won", "fill_splits", "dumps_jsonl", "write_jsonl",
           "read_paragraphs", "sentences_of"]

EVAL_FRACTION = 0.05


def _unit(key: str, salt: str = "") -> float:
  """A stable number in [0, 1) from a string (sha256; independent of PYTHONHASHSEED)."""
  return int(hashlib.sha256(f"{salt}{key}".encode("utf-8")).hexdigest()[:12], 16) / 16**12


def is_eval(key: str, fraction: float = EVAL_FRACTION) -> bool:
  """Whether the task with this key belongs to the held-out split."""
  return _unit(key, "split:") < fraction


_NUM_RE = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")


def numbers_in(text: str) -> tuple[str, ...]:
  """The numbers of a text in order, normalised ('1,250' -> '1250', '2.50' -> '5/2')."""
  return tuple(str(Fraction(m.replace(",", ""))) for m in _NUM_RE.findall(text))


def _norm(text: str) -> str:
  return " ".join(text.lower().split())


class EvalGuard:
  """Says whether a generated prompt would leak an eval-suite item (text overlap or same ordered numbers)."""

  def __init__(self):
    self.texts: list[str] = []
    self.numbers: set[tuple[str, ...]] = set()
    for name in SUITE_NAMES:
      for item in load_suite(name):
        text = item.get("question") or item["prompt"]
        self.texts.append(_norm(text))
        if name in ("math", "tools"):
          self.numbers.add(numbers_in(text))
    self.entry_points = {item["entry_point"] for item in load_suite("code") if item["entry_point"]}

  def text_clash(self, text: str) -> str | None:
    """The eval prompt that `text` contains (or that contains `text`, for texts of 20+ chars), else None."""
    mine = _norm(text)
    for ev in self.texts:
      if ev in mine or (len(mine) >= 20 and mine in ev):
        return ev
    return None

  def numbers_clash(self, text: str) -> bool:
    """Whether the ordered numbers of `text` equal those of an eval math or tools question."""
    nums = numbers_in(text)
    return bool(nums) and nums in self.numbers

  def clashes(self, text: str, check_numbers: bool = True) -> bool:
    return self.text_clash(text) is not None or (check_numbers and self.numbers_clash(text))


def fmt(x: Fraction | int | float) -> str:
  """A canonical answer string: integers as digits, terminating decimals as decimals, else a/b."""
  x = Fraction(x)
  if x.denominator == 1:
    return str(x.numerator)
  d = x.denominator
  for p in (2, 5):
    while d % p == 0:
      d //= p
  if d == 1:
    return f"{float(x):.6f}".rstrip("0").rstrip(".")
  return f"{x.numerator}/{x.denominator}"


def won(x: Fraction | int) -> str:
  """An integer amount with thousands separators ('12,500')."""
  x = Fraction(x)
  if x.denominator != 1:
    raise ValueError(f"won() needs an integer amount, got {x}")
  return f"{x.numerator:,}"


def fill_splits(draw: Callable[[random.Random], dict | None], r: random.Random, n_train: int, n_eval: int,
                guard: EvalGuard | None = None, text_of: Callable[[dict], str] = lambda t: t["prompt"],
                check_numbers: bool = True, max_tries: int = 200_000,
                fraction: float = EVAL_FRACTION) -> tuple[list[dict], list[dict]]:
  """Draws tasks (dicts with 'key' and 'lang') until `n_train` train and `n_eval` eval tasks exist, each
  (uid or key, language) at most once; the split follows the key (both languages of a key share it).

  `draw` may return None (no task this time); a task may fix its split with 'held_out' (a rule of its key). Tasks that clash with the eval suites are skipped. Raises
  when the quotas cannot be filled in `max_tries` draws (the family has too few distinct tasks).
  """
  train: list[dict] = []
  held: list[dict] = []
  seen: set[str] = set()
  for _ in range(max_tries):
    if len(train) >= n_train and len(held) >= n_eval:
      return train, held
    task = draw(r)
    uid = None if task is None else f"{task.get('uid', task['key'])}|{task.get('lang')}"  # each task once
    if uid is None or uid in seen:
      continue
    seen.add(uid)
    if guard is not None and guard.clashes(text_of(task), check_numbers):
      continue
    target = held if task.get("held_out", is_eval(task["key"], fraction)) else train
    quota = n_eval if target is held else n_train
    if len(target) < quota:
      target.append(task)
  raise RuntimeError(f"could fill only {len(train)}/{n_train} train and {len(held)}/{n_eval} eval tasks "
                     f"in {max_tries} draws ({len(seen)} distinct tasks): widen the generator's ranges")


def dumps_jsonl(records: Iterable[dict[str, Any]]) -> str:
  """One compact UTF-8 JSON object per line (Korean kept readable), in the given key order."""
  return "".join(json.dumps(rec, ensure_ascii=False, separators=(", ", ": ")) + "\n" for rec in records)


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
  """Writes the records to `path` (LF line ends); returns the bytes written."""
  data = dumps_jsonl(records).encode("utf-8")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)
  return len(data)


def read_paragraphs(lang: str) -> list[tuple[str, str]]:
  """(title, paragraph) pairs of the hand-written encyclopedia (corpus/src/encyclopedia_{en,ko}.txt)."""
  with open(os.path.join(CORPUS_DIR, "src", f"encyclopedia_{lang}.txt"), encoding="utf-8") as f:
    blocks = [b.strip() for b in f.read().strip().split("\n\n") if b.strip()]
  return [tuple(b.split("\n", 1)) for b in blocks]  # type: ignore[misc]


def sentences_of(paragraph: str) -> list[str]:
  """Sentences of a paragraph (split after . ! ? followed by a space)."""
  return [s.strip() for s in re.split(r"(?<=[.!?])\s+", paragraph.strip()) if s.strip()]
