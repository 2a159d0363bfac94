"""Code tasks from the families: statement, tests computed by the reference implementation, solutions.

`all_tasks()` lists every (family, parameter) task once per language. Tests are assert lines whose expected
values come from the family's reference implementation (Python in this process), independent of the
solution text that the sandbox then runs against them at build.
"""
from __future__ import annotations

import dataclasses
import random

from kanana_jax.data.synth import code_families as F
from kanana_jax.data.synth import code_singles as S

FAMILIES = [
    (F.count_multiples, [2, 3, 4, 5, 6, 7, 8, 9]), (F.sum_above, [5, 10, 20, 30, 50, 100]),
    (F.multiply_all, [2, 3, 4, 5, 10]), (F.count_letter, list("aeiostn")), (F.remove_letter, list("aeinrs")),
    (F.repeat_letters, [2, 3, 4]), (F.every_nth, [2, 3, 4, 5]), (F.chunk_sums, [2, 3, 4]),
    (F.add_particle, ["eun_neun", "eul_reul", "i_ga"]), (F.round_nearest, [4, 10, 100, 1000]),
    (F.words_starting, list("abcst")), (F.sum_powers, [2, 3, 4]), (F.count_sign, ["negative", "positive"]),
] + [(fn, [None]) for fn in (
    S.clamp_values, S.running_total, S.pairwise_differences, S.index_of_min, S.capitalize_words, S.initials,
    S.count_words, S.longest_word, S.is_non_decreasing, S.unique_keep_order, S.product_of_digits, S.c_to_f,
    S.format_hms, S.is_leap_year, S.letter_grade, S.value_range, S.mask_all_but_last4, S.triangular_number,
    S.collatz_steps, S.safe_divide, S.merge_counts, S.invert_mapping, S.count_by_length, S.alternate_case,
    S.squeeze_spaces, S.sum_even_between, S.average_or_zero, S.repeated_values, S.row_sums, S.diagonal_sum,
    S.ordinal_suffix, S.unique_letters, S.power_of_two)]


@dataclasses.dataclass(frozen=True)
class CodeTask:
  key: str  # the same for both languages
  lang: str
  entry_point: str
  prompt: str
  solution: str
  wrong: str
  tests: str
  why: str


def _tests(spec: F.Spec) -> str:
  lines = []
  for args in spec.inputs:
    expected = spec.ref(*args)
    call = f"{spec.entry}({', '.join(repr(a) for a in args)})"
    lines.append(f"assert {call} is {expected!r}" if expected is None or isinstance(expected, bool)
                 else f"assert {call} == {expected!r}")
  return "\n".join(lines) + "\n"


def make_task(fn, param, lang: str) -> CodeTask:
  key = f"code/{fn.__name__}/{param}"
  spec = fn(param, random.Random(key))  # test inputs depend on the task only, not on the dataset drawing it
  prompt = (f"Write a Python function `{spec.sig}` that {spec.en}." if lang == "en" else
            f"{spec.ko} 파이썬 함수 `{spec.sig}`를 작성하세요.")
  return CodeTask(key, lang, spec.entry, prompt, spec.solution, spec.wrong, _tests(spec),
                  spec.why_en if lang == "en" else spec.why_ko)


def all_tasks() -> list[CodeTask]:
  """Every task in English and in Korean, in a fixed order."""
  return [make_task(fn, p, lang) for fn, params in FAMILIES for p in params for lang in ("en", "ko")]


def fenced(code: str) -> str:
  return f"```python\n{code.rstrip()}\n```"


def reply(task: CodeTask, code: str) -> str:
  """An assistant answer: the explanation, then the code in one python block."""
  head = "Here is a solution." if task.lang == "en" else "다음과 같이 작성할 수 있습니다."
  return f"{task.why}\n\n{head}\n\n{fenced(code)}"


def cot_document(task: CodeTask) -> str:
  """A mid-training document: problem, reasoning in prose, the solution and its assert tests."""
  if task.lang == "en":
    return (f"Problem: {task.prompt}\n\nReasoning: {task.why}\n\nSolution:\n{fenced(task.solution)}\n\n"
            f"Tests:\n{fenced(task.tests)}")
  return f"문제: {task.prompt}\n\n풀이: {task.why}\n\n코드:\n{fenced(task.solution)}\n\n테스트:\n{fenced(task.tests)}"
