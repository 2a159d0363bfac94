"""Python function tasks: a statement (EN, KO), a correct solution, a plausible buggy one, a reference
implementation that computes the expected test values, test inputs and a short explanation (EN, KO).

Each family is `fn(param, r) -> Spec`; FAMILIES pairs it with its parameter values (one task per value).
None of the entry points or statements is an eval-suite task (kanana_jax/evals/suites/code.jsonl).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Spec:
  entry: str
  sig: str
  en: str  # "Write a Python function `sig` that {en}."
  ko: str  # "{ko} 파이썬 함수 `sig`를 작성하세요."
  solution: str
  wrong: str
  ref: Callable[..., Any]
  inputs: list[tuple]
  why_en: str
  why_ko: str


def _nums(r: random.Random, n: int, lo: int = -20, hi: int = 60) -> list[int]:
  return [r.randint(lo, hi) for _ in range(n)]


def count_multiples(k, r):
  return Spec(f"count_multiples_of_{k}", f"count_multiples_of_{k}(nums: list[int]) -> int",
              f"returns how many numbers in nums are divisible by {k} (0 and negative multiples count too)",
              f"정수 리스트 nums에서 {k}로 나누어떨어지는 수(0과 음수 배수 포함)의 개수를 반환하는",
              f"def count_multiples_of_{k}(nums):\n    return sum(1 for x in nums if x % {k} == 0)\n",
              f"def count_multiples_of_{k}(nums):\n    count = 0\n    for i in range(1, len(nums)):\n"
              f"        if nums[i] % {k} == 0:\n            count += 1\n    return count\n",
              lambda nums: sum(x % k == 0 for x in nums),
              [([k, 1, 2 * k, -k, 7 * k + 1],), ([],), ([0],), (_nums(r, 8),)],
              f"A number x is divisible by {k} exactly when x % {k} == 0, and in Python that also holds for 0 and "
              f"for negative multiples such as -{k}. Counting the elements that pass this test in one pass over the "
              "whole list, the first element included, gives the answer.",
              f"x % {k} == 0이면 x는 {k}로 나누어떨어지고, 파이썬에서는 0과 -{k} 같은 음수 배수도 이 조건을 만족합니다. "
              "첫 원소부터 끝까지 한 번 훑으며 조건을 만족하는 원소를 세면 됩니다.")


def sum_above(t, r):
  return Spec(f"sum_above_{t}", f"sum_above_{t}(nums: list[int]) -> int",
              f"returns the sum of the numbers in nums that are strictly greater than {t}",
              f"정수 리스트 nums에서 {t}보다 큰 수들만 더한 합을 반환하는",
              f"def sum_above_{t}(nums):\n    return sum(x for x in nums if x > {t})\n",
              f"def sum_above_{t}(nums):\n    return sum(x for x in nums if x >= {t})\n",
              lambda nums: sum(x for x in nums if x > t),
              [([t, t + 1, t - 1, t + 5],), ([],), ([t, t],), (_nums(r, 7, t - 10, t + 30) + [t],)],
              f"Only numbers strictly greater than {t} count, so a number equal to {t} must be left out; the "
              "comparison is x > t, not x >= t. Summing a filtered generator handles the empty list too (sum is 0).",
              f"{t}보다 '큰' 수만 더해야 하므로 {t}와 같은 수는 빼야 합니다. 그래서 비교는 x >= t가 아니라 x > t입니다. "
              "조건으로 거른 값을 sum()으로 더하면 빈 리스트일 때도 0이 됩니다.")


def multiply_all(k, r):
  return Spec(f"multiply_all_by_{k}", f"multiply_all_by_{k}(nums: list[int]) -> list[int]",
              f"returns a new list with every number of nums multiplied by {k}, in the same order",
              f"정수 리스트 nums의 모든 수에 {k}를 곱한 새 리스트를 같은 순서로 반환하는",
              f"def multiply_all_by_{k}(nums):\n    return [x * {k} for x in nums]\n",
              f"def multiply_all_by_{k}(nums):\n    return [x * {k} for x in nums if x]\n",
              lambda nums: [x * k for x in nums],
              [([1, 0, -3],), ([],), (_nums(r, 5),)],
              f"Every element maps to exactly one output element, x * {k}, so a list comprehension over nums keeps "
              "the order and the length. Zeros must stay in the result (as 0), so there is no filter.",
              f"각 원소 x는 결과의 원소 x * {k} 하나로 바뀌므로, 리스트 컴프리헨션을 쓰면 순서와 길이가 그대로 유지됩니다. "
              "0도 결과에 0으로 남아야 하므로 조건으로 거르면 안 됩니다.")


def count_letter(c, r):
  return Spec(f"count_letter_{c}", f"count_letter_{c}(s: str) -> int",
              f"returns how many times the letter '{c}' occurs in s, counting both '{c}' and '{c.upper()}'",
              f"문자열 s에 글자 '{c}'가 대문자 '{c.upper()}'까지 포함하여 몇 번 나오는지 반환하는",
              f"def count_letter_{c}(s):\n    return s.lower().count('{c}')\n",
              f"def count_letter_{c}(s):\n    return s.count('{c}')\n",
              lambda s: s.lower().count(c),
              [(f"{c}{c.upper()}x{c}",), ("",), (f"No {c.upper()} here? {c}!",), ("quiet rhythm",)],
              f"Upper- and lowercase forms both count, so the string is lowered first and then str.count('{c}') "
              "counts the occurrences.",
              f"대문자와 소문자를 모두 세야 하므로 먼저 문자열을 소문자로 바꾼 뒤 str.count('{c}')로 개수를 셉니다.")


def remove_letter(c, r):
  return Spec(f"remove_letter_{c}", f"remove_letter_{c}(s: str) -> str",
              f"returns s with every lowercase '{c}' removed (other characters unchanged)",
              f"문자열 s에서 소문자 '{c}'를 모두 지운 문자열을 반환하는",
              f"def remove_letter_{c}(s):\n    return s.replace('{c}', '')\n",
              f"def remove_letter_{c}(s):\n    return s.replace('{c}', '', 1)\n",
              lambda s: s.replace(c, ""),
              [(f"{c}b{c}{c}",), ("",), (f"x{c.upper()}{c}y",), ("banana bread and tea",)],
              f"str.replace('{c}', '') replaces every occurrence when no count is given; passing a count of 1 would "
              "remove only the first one. Uppercase letters are different characters and stay.",
              f"str.replace('{c}', '')는 횟수를 주지 않으면 모든 '{c}'를 지웁니다. 횟수로 1을 주면 첫 번째만 지워지므로 안 됩니다. "
              "대문자는 다른 글자이므로 그대로 둡니다.")


def repeat_letters(k, r):
  return Spec(f"repeat_each_char_{k}", f"repeat_each_char_{k}(s: str) -> str",
              f"returns s with every character repeated {k} times in place, e.g. 'ab' gives "
              f"'{'a' * k}{'b' * k}'",
              f"문자열 s의 각 문자를 제자리에서 {k}번씩 반복한 문자열(예: 'ab' -> '{'a' * k}{'b' * k}')을 반환하는",
              f"def repeat_each_char_{k}(s):\n    return ''.join(ch * {k} for ch in s)\n",
              f"def repeat_each_char_{k}(s):\n    return s * {k}\n",
              lambda s: "".join(ch * k for ch in s),
              [("ab",), ("",), ("x y",), ("한글",)],
              f"Each character is replaced by {k} copies of itself, so joining ch * {k} over the characters keeps "
              f"them in place; s * {k} would instead repeat the whole string.",
              f"각 문자를 그 문자 {k}개로 바꾸어 이어 붙이면 제자리 반복이 됩니다. s * {k}는 문자열 전체를 반복하므로 다릅니다.")


def every_nth(n, r):
  return Spec(f"every_{n}th_item", f"every_{n}th_item(items: list) -> list",
              f"returns the items at positions {n}, {2 * n}, {3 * n}, ... of the list, counting positions from 1",
              f"리스트 items에서 1부터 센 위치가 {n}, {2 * n}, {3 * n}, ...인 원소들을 반환하는",
              f"def every_{n}th_item(items):\n    return items[{n - 1}::{n}]\n",
              f"def every_{n}th_item(items):\n    return items[::{n}]\n",
              lambda items: items[n - 1::n],
              [(list(range(1, 3 * n + 2)),), ([],), (list("abcdefghij"),)],
              f"Position {n} counted from 1 is index {n - 1}, and after it every {n}th element follows, so the slice "
              f"starts at {n - 1} with step {n}. Starting at 0 would take positions 1, {n + 1}, ... instead.",
              f"1부터 센 {n}번째 위치는 인덱스 {n - 1}이고, 그 뒤로 {n}칸마다 원소를 고르면 되므로 슬라이스는 {n - 1}에서 "
              f"시작하고 간격은 {n}입니다. 0에서 시작하면 1, {n + 1}, ... 번째를 고르게 됩니다.")


def chunk_sums(k, r):
  return Spec(f"sums_of_chunks_of_{k}", f"sums_of_chunks_of_{k}(nums: list[int]) -> list[int]",
              f"splits nums into consecutive groups of {k} (the last group may be shorter) and returns the sum of "
              "each group",
              f"정수 리스트 nums를 앞에서부터 {k}개씩 묶고(마지막 묶음은 더 짧을 수 있음) 각 묶음의 합을 리스트로 반환하는",
              f"def sums_of_chunks_of_{k}(nums):\n    return [sum(nums[i:i + {k}]) for i in range(0, len(nums), {k})]\n",
              f"def sums_of_chunks_of_{k}(nums):\n    return [sum(nums[i:i + {k}]) for i in range(0, len(nums) - {k} + 1, "
              f"{k})]\n",
              lambda nums: [sum(nums[i:i + k]) for i in range(0, len(nums), k)],
              [(list(range(1, 2 * k + 2)),), ([],), (_nums(r, 3 * k),)],
              f"Group starts are 0, {k}, {2 * k}, ... up to the end of the list, and slicing past the end is safe in "
              "Python, so the last short group is summed too.",
              f"묶음의 시작 인덱스는 0, {k}, {2 * k}, ...이고 리스트 끝을 넘는 슬라이스도 안전하므로, 마지막의 짧은 묶음까지 "
              "더할 수 있습니다.")


_PARTICLES = {"eun_neun": ("은", "는"), "eul_reul": ("을", "를"), "i_ga": ("이", "가")}


def add_particle(name, r):
  with_c, without_c = _PARTICLES[name]

  def ref(word):
    return word + (with_c if (ord(word[-1]) - 0xAC00) % 28 else without_c)

  return Spec(f"add_{name}", f"add_{name}(word: str) -> str",
              f"appends the Korean particle '{with_c}' to a word whose last Hangul syllable has a final consonant "
              f"(batchim) and '{without_c}' otherwise, e.g. '책' -> '{ref('책')}' and '나무' -> '{ref('나무')}'",
              f"마지막 한글 음절에 받침이 있으면 '{with_c}', 없으면 '{without_c}'를 붙인 단어(예: '책' -> '{ref('책')}', "
              f"'나무' -> '{ref('나무')}')를 반환하는",
              f"def add_{name}(word):\n    has_final = (ord(word[-1]) - 0xAC00) % 28 != 0\n"
              f"    return word + ('{with_c}' if has_final else '{without_c}')\n",
              f"def add_{name}(word):\n    has_final = (ord(word[-1]) - 0xAC00) % 28 == 0\n"
              f"    return word + ('{with_c}' if has_final else '{without_c}')\n",
              ref, [("책",), ("나무",), ("사람",), ("바다",), ("서울",)],
              "A precomposed Hangul syllable is 0xAC00 + (initial * 21 + vowel) * 28 + final, where final 0 means "
              "no batchim. So (ord(ch) - 0xAC00) % 28 is nonzero exactly when the last syllable has a final "
              "consonant.",
              "완성형 한글 음절의 코드는 0xAC00 + (초성 * 21 + 중성) * 28 + 종성이고, 종성 0은 받침이 없다는 뜻입니다. "
              "따라서 (ord(ch) - 0xAC00) % 28이 0이 아니면 받침이 있습니다.")


def round_nearest(k, r):
  return Spec(f"round_to_nearest_{k}", f"round_to_nearest_{k}(n: int) -> int",
              f"rounds a non-negative integer n to the nearest multiple of {k}, rounding halves up",
              f"음이 아닌 정수 n을 가장 가까운 {k}의 배수로 반올림하는(정확히 절반이면 올림)",
              f"def round_to_nearest_{k}(n):\n    return (n + {k} // 2) // {k} * {k}\n",
              f"def round_to_nearest_{k}(n):\n    return round(n / {k}) * {k}\n",
              lambda n: (n + k // 2) // k * k,
              [(k // 2,), (0,), (k + k // 2 - 1,), (3 * k + k // 2,), (r.randint(0, 50 * k),)],
              f"Adding half of {k} and then flooring to a multiple of {k} rounds halves up. Python's round() uses "
              "banker's rounding (round(0.5) is 0), which would round some halves down.",
              f"{k}의 절반을 더한 뒤 {k}의 배수로 내림하면 절반이 올림됩니다. 파이썬의 round()는 짝수 쪽으로 반올림하므로"
              "(round(0.5)는 0) 절반을 내리는 경우가 생깁니다.")


def words_starting(c, r):
  return Spec(f"count_words_starting_with_{c}", f"count_words_starting_with_{c}(s: str) -> int",
              f"counts the whitespace-separated words of s that start with '{c}' or '{c.upper()}'",
              f"문자열 s를 공백으로 나눈 단어 중 '{c}'나 '{c.upper()}'로 시작하는 단어의 개수를 반환하는",
              f"def count_words_starting_with_{c}(s):\n    return sum(1 for w in s.split() if w.lower().startswith('{c}'))\n",
              f"def count_words_starting_with_{c}(s):\n    return sum(1 for w in s.split() if w.startswith('{c}'))\n",
              lambda s: sum(w.lower().startswith(c) for w in s.split()),
              [(f"{c}x {c.upper()}y z{c}",), ("",), (f"  {c.upper()}{c}  {c}  ",)],
              "str.split() with no argument splits on runs of whitespace and drops empty pieces; lowering each "
              f"word before startswith('{c}') makes the test case-insensitive.",
              "인자 없는 str.split()은 연속된 공백을 기준으로 나누고 빈 조각을 버립니다. 각 단어를 소문자로 바꾼 뒤 "
              f"startswith('{c}')로 확인하면 대소문자를 가리지 않습니다.")


def sum_powers(p, r):
  name = {2: "squares", 3: "cubes", 4: "fourth_powers"}[p]
  return Spec(f"sum_of_{name}", f"sum_of_{name}(n: int) -> int",
              f"returns 1**{p} + 2**{p} + ... + n**{p} for n >= 0 (0 when n is 0)",
              f"n >= 0일 때 1**{p} + 2**{p} + ... + n**{p}의 값(n이 0이면 0)을 반환하는",
              f"def sum_of_{name}(n):\n    return sum(i ** {p} for i in range(1, n + 1))\n",
              f"def sum_of_{name}(n):\n    return sum(i ** {p} for i in range(1, n))\n",
              lambda n: sum(i ** p for i in range(1, n + 1)),
              [(0,), (1,), (3,), (r.randint(5, 30),)],
              f"range(1, n + 1) runs over 1..n inclusive (range excludes its end), and summing i ** {p} over it "
              "gives the total; for n = 0 the range is empty and the sum is 0.",
              f"range는 끝값을 포함하지 않으므로 1부터 n까지는 range(1, n + 1)입니다. 여기서 i ** {p}를 더하면 되고, "
              "n = 0이면 범위가 비어 합은 0입니다.")


def count_sign(sign, r):
  neg = sign == "negative"
  op = "<" if neg else ">"
  return Spec(f"count_{sign}", f"count_{sign}(nums: list[float]) -> int",
              f"returns how many numbers in nums are strictly {sign} (zero is neither)",
              f"리스트 nums에서 {'음수' if neg else '양수'}의 개수를 반환하는(0은 양수도 음수도 아님)",
              f"def count_{sign}(nums):\n    return sum(1 for x in nums if x {op} 0)\n",
              f"def count_{sign}(nums):\n    return sum(1 for x in nums if x {op}= 0)\n",
              lambda nums: sum((x < 0) if neg else (x > 0) for x in nums),
              [([0, -1, 2, -3.5, 0.5],), ([],), ([0, 0],), (_nums(r, 9, -9, 9),)],
              f"Zero is neither positive nor negative, so the test must be the strict x {op} 0.",
              f"0은 양수도 음수도 아니므로 조건은 등호 없는 x {op} 0이어야 합니다.")
