"""Python function tasks without a parameter (one task each); see code_families.py for the Spec fields."""
from __future__ import annotations

import math

from kanana_jax.data.synth.code_families import Spec, _nums


def _s(entry, sig, en, ko, solution, wrong, ref, inputs, why_en, why_ko):
  return Spec(entry, f"{entry}{sig}", en, ko, solution, wrong, ref, inputs, why_en, why_ko)


def clamp_values(_, r):
  return _s("clamp_values", "(nums: list[int], lo: int, hi: int) -> list[int]",
            "returns a new list where every number below lo becomes lo and every number above hi becomes hi "
            "(lo <= hi)", "lo <= hi일 때 nums에서 lo보다 작은 수는 lo로, hi보다 큰 수는 hi로 바꾼 새 리스트를 반환하는",
            "def clamp_values(nums, lo, hi):\n    return [max(lo, min(hi, x)) for x in nums]\n",
            "def clamp_values(nums, lo, hi):\n    return [min(lo, max(hi, x)) for x in nums]\n",
            lambda nums, lo, hi: [max(lo, min(hi, x)) for x in nums],
            [([-5, 0, 5, 10, 15], 0, 10), ([], 1, 2), (_nums(r, 6), 5, 30)],
            "min(hi, x) caps a value from above and max(lo, ...) lifts it from below; applying both in this order "
            "keeps every value inside [lo, hi].",
            "min(hi, x)로 위쪽을 자르고 max(lo, ...)로 아래쪽을 올리면 모든 값이 [lo, hi] 안에 들어옵니다.")


def running_total(_, r):
  return _s("running_total", "(nums: list[int]) -> list[int]",
            "returns the running totals of nums: element i of the result is nums[0] + ... + nums[i]",
            "결과의 i번째 원소가 nums[0] + ... + nums[i]인 누적 합 리스트를 반환하는",
            "def running_total(nums):\n    out, total = [], 0\n    for x in nums:\n        total += x\n"
            "        out.append(total)\n    return out\n",
            "def running_total(nums):\n    out, total = [], 0\n    for x in nums:\n        out.append(total)\n"
            "        total += x\n    return out\n",
            lambda nums: [sum(nums[:i + 1]) for i in range(len(nums))],
            [([1, 2, 3, 4],), ([],), (_nums(r, 6),)],
            "Keep a total, add each element to it first and only then record it, so that element i is included "
            "in result i.",
            "합계를 유지하면서 각 원소를 먼저 더한 뒤 기록해야 i번째 결과에 i번째 원소가 포함됩니다.")


def pairwise_differences(_, r):
  return _s("pairwise_differences", "(nums: list[int]) -> list[int]",
            "returns the differences between neighbours, nums[i + 1] - nums[i], for i from 0 to len(nums) - 2",
            "이웃한 두 수의 차 nums[i + 1] - nums[i]를 i = 0부터 len(nums) - 2까지 차례로 담은 리스트를 반환하는",
            "def pairwise_differences(nums):\n    return [b - a for a, b in zip(nums, nums[1:])]\n",
            "def pairwise_differences(nums):\n    return [a - b for a, b in zip(nums, nums[1:])]\n",
            lambda nums: [b - a for a, b in zip(nums, nums[1:])],
            [([1, 4, 9, 16],), ([5],), (_nums(r, 6),)],
            "zip(nums, nums[1:]) pairs each element with the next one; the difference asked for is next minus "
            "current. A list of one element has no neighbours and gives [].",
            "zip(nums, nums[1:])은 각 원소를 다음 원소와 짝짓습니다. 구하는 값은 '다음 - 현재'이고, 원소가 하나뿐이면 빈 리스트입니다.")


def index_of_min(_, r):
  return _s("index_of_min", "(nums: list[int]) -> int",
            "returns the index of the smallest number in nums (the first one if it occurs several times), or -1 "
            "for an empty list", "nums에서 가장 작은 수의 인덱스(여러 번 나오면 첫 번째), 빈 리스트면 -1을 반환하는",
            "def index_of_min(nums):\n    best = -1\n    for i, x in enumerate(nums):\n"
            "        if best == -1 or x < nums[best]:\n            best = i\n    return best\n",
            "def index_of_min(nums):\n    best = -1\n    for i, x in enumerate(nums):\n"
            "        if best == -1 or x <= nums[best]:\n            best = i\n    return best\n",
            lambda nums: nums.index(min(nums)) if nums else -1,
            [([3, 1, 2, 1],), ([],), ([7],), (_nums(r, 7) + [-30, -30],)],
            "Scan once and replace the best index only when a strictly smaller value appears; with <= a later "
            "equal minimum would win instead of the first.",
            "한 번 훑으면서 더 '작은' 값이 나올 때만 인덱스를 바꿉니다. <=를 쓰면 같은 최솟값 중 마지막 것이 선택됩니다.")


def capitalize_words(_, r):
  return _s("capitalize_words", "(s: str) -> str",
            "uppercases the first character of every space-separated word and leaves all other characters as "
            "they are (words are separated by single spaces)",
            "한 칸 공백으로 구분된 각 단어의 첫 글자만 대문자로 바꾸고 나머지 글자는 그대로 둔 문자열을 반환하는",
            "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))\n",
            "def capitalize_words(s):\n    return s.title()\n",
            lambda s: " ".join(w[:1].upper() + w[1:] for w in s.split(" ")),
            [("hello WORLD",), ("it's mcDonald",), ("",), ("a b",)],
            "Only the first character changes, so each word becomes w[:1].upper() + w[1:]; str.title() would also "
            "lowercase the other letters and capitalise after apostrophes.",
            "첫 글자만 바뀌어야 하므로 각 단어를 w[:1].upper() + w[1:]로 만듭니다. str.title()은 나머지 글자를 소문자로 "
            "바꾸고 아포스트로피 뒤도 대문자로 만들어 다릅니다.")


def initials(_, r):
  return _s("initials", "(name: str) -> str",
            "returns the uppercase initials of a name followed by dots, e.g. 'ada lovelace' -> 'A.L.'",
            "이름의 각 단어 첫 글자를 대문자로 바꾸고 점을 붙여 이은 이니셜(예: 'ada lovelace' -> 'A.L.')을 반환하는",
            "def initials(name):\n    return ''.join(w[0].upper() + '.' for w in name.split())\n",
            "def initials(name):\n    return ''.join(w[0] + '.' for w in name.split())\n",
            lambda name: "".join(w[0].upper() + "." for w in name.split()),
            [("ada lovelace",), ("Grace Brewster hopper",), ("",)],
            "Split the name into words, take each word's first letter in uppercase and append a dot.",
            "이름을 단어로 나누고 각 단어의 첫 글자를 대문자로 바꾼 뒤 점을 붙여 이어 붙입니다.")


def count_words(_, r):
  return _s("count_words", "(s: str) -> int",
            "returns the number of words in s, where words are separated by any amount of whitespace",
            "공백의 개수와 상관없이 공백으로 구분된 단어의 개수를 반환하는",
            "def count_words(s):\n    return len(s.split())\n",
            "def count_words(s):\n    return len(s.split(' '))\n",
            lambda s: len(s.split()),
            [("one two  three",), ("",), ("  padded\tand\nnewlines ",)],
            "str.split() without an argument splits on runs of whitespace and never returns empty strings, so its "
            "length is the word count, also for the empty string.",
            "인자 없는 str.split()은 연속된 공백을 하나로 보고 빈 문자열을 만들지 않으므로, 그 길이가 단어 수입니다.")


def longest_word(_, r):
  return _s("longest_word", "(s: str) -> str",
            "returns the longest whitespace-separated word of s (the first one on ties), or '' when s has no words",
            "s의 공백으로 구분된 단어 중 가장 긴 단어(길이가 같으면 앞의 것), 단어가 없으면 ''를 반환하는",
            "def longest_word(s):\n    best = ''\n    for w in s.split():\n        if len(w) > len(best):\n"
            "            best = w\n    return best\n",
            "def longest_word(s):\n    best = ''\n    for w in s.split():\n        if len(w) >= len(best):\n"
            "            best = w\n    return best\n",
            lambda s: max(s.split(), key=len, default=""),
            [("cat horse mouse",), ("",), ("a bb cc",)],
            "Keep the best word so far and replace it only by a strictly longer one, so that the first word wins "
            "a tie.",
            "지금까지의 가장 긴 단어를 유지하고 '더 긴' 단어가 나올 때만 바꾸면 길이가 같을 때 앞의 단어가 남습니다.")


def is_non_decreasing(_, r):
  return _s("is_non_decreasing", "(nums: list[int]) -> bool",
            "returns True when every element of nums is greater than or equal to the one before it",
            "nums의 모든 원소가 바로 앞 원소보다 크거나 같으면 True를 반환하는",
            "def is_non_decreasing(nums):\n    return all(a <= b for a, b in zip(nums, nums[1:]))\n",
            "def is_non_decreasing(nums):\n    return all(a < b for a, b in zip(nums, nums[1:]))\n",
            lambda nums: all(a <= b for a, b in zip(nums, nums[1:])),
            [([1, 2, 2, 3],), ([3, 1],), ([],), ([5, 5],)],
            "Equal neighbours are allowed, so each adjacent pair must satisfy a <= b; all() of an empty sequence "
            "is True, which covers lists of length 0 and 1.",
            "같은 값이 이어져도 되므로 이웃한 쌍마다 a <= b이면 됩니다. 빈 시퀀스의 all()은 True이므로 길이 0, 1도 처리됩니다.")


def unique_keep_order(_, r):
  return _s("unique_keep_order", "(items: list) -> list",
            "returns the items without duplicates, keeping the first occurrence of each in the original order",
            "items에서 중복을 없애되 각 값이 처음 나온 순서를 그대로 지킨 리스트를 반환하는",
            "def unique_keep_order(items):\n    seen, out = set(), []\n    for x in items:\n        if x not in seen:\n"
            "            seen.add(x)\n            out.append(x)\n    return out\n",
            "def unique_keep_order(items):\n    return sorted(set(items))\n",
            lambda items: list(dict.fromkeys(items)),
            [([3, 1, 3, 2, 1],), ([],), (["b", "a", "b"],)],
            "A set remembers what was seen, and a value is appended only the first time, which keeps the original "
            "order; sorting a set would lose it.",
            "본 값을 집합에 기록하고 처음 나올 때만 결과에 추가하면 원래 순서가 유지됩니다. 집합을 정렬하면 순서가 바뀝니다.")


def product_of_digits(_, r):
  return _s("product_of_digits", "(n: int) -> int",
            "returns the product of the decimal digits of a non-negative integer n (0 for n = 0)",
            "음이 아닌 정수 n의 각 자리 숫자를 모두 곱한 값(n = 0이면 0)을 반환하는",
            "def product_of_digits(n):\n    result = 1\n    for ch in str(n):\n        result *= int(ch)\n    return result\n",
            "def product_of_digits(n):\n    result = 1\n    for ch in str(n):\n        if ch != '0':\n"
            "            result *= int(ch)\n    return result\n",
            lambda n: math.prod(int(c) for c in str(n)),
            [(234,), (0,), (105,), (r.randint(1000, 99999),)],
            "Multiply the digits of str(n) together starting from 1; a zero digit makes the product 0 and must "
            "not be skipped.",
            "str(n)의 각 숫자를 1부터 시작해 곱합니다. 0인 자리가 있으면 곱이 0이 되어야 하므로 건너뛰면 안 됩니다.")


def c_to_f(_, r):
  return _s("celsius_to_fahrenheit", "(c: float) -> float",
            "converts a temperature from degrees Celsius to degrees Fahrenheit (F = C * 9 / 5 + 32)",
            "섭씨 온도를 화씨 온도로 바꾸는(F = C * 9 / 5 + 32)",
            "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n",
            "def celsius_to_fahrenheit(c):\n    return c * 5 / 9 + 32\n",
            lambda c: c * 9 / 5 + 32,
            [(100,), (0,), (-40,), (5 * r.randint(-8, 20),)],
            "Apply F = C * 9 / 5 + 32 directly; multiplying by 9 before dividing by 5 keeps multiples of 5 exact.",
            "F = C * 9 / 5 + 32를 그대로 계산합니다. 9를 먼저 곱하고 5로 나누면 5의 배수는 정확히 계산됩니다.")


def format_hms(_, r):
  return _s("format_hms", "(seconds: int) -> str",
            "formats a non-negative number of seconds as 'H:MM:SS' (minutes and seconds always two digits)",
            "음이 아닌 초를 'H:MM:SS' 형식(분과 초는 항상 두 자리) 문자열로 바꾸는",
            "def format_hms(seconds):\n    h, rest = divmod(seconds, 3600)\n    m, s = divmod(rest, 60)\n"
            "    return f'{h}:{m:02d}:{s:02d}'\n",
            "def format_hms(seconds):\n    h, rest = divmod(seconds, 3600)\n    m, s = divmod(rest, 60)\n"
            "    return f'{h}:{m}:{s}'\n",
            lambda t: f"{t // 3600}:{t % 3600 // 60:02d}:{t % 60:02d}",
            [(3661,), (0,), (59,), (r.randint(3600, 90000),)],
            "divmod by 3600 gives hours and the remaining seconds, divmod by 60 splits those into minutes and "
            "seconds, and the :02d format pads them to two digits.",
            "3600으로 divmod하면 시간과 남은 초가, 다시 60으로 divmod하면 분과 초가 나옵니다. :02d 형식으로 두 자리를 맞춥니다.")


def is_leap_year(_, r):
  return _s("is_leap_year", "(year: int) -> bool",
            "returns True for Gregorian leap years: divisible by 4, except centuries not divisible by 400",
            "그레고리력의 윤년(4로 나누어떨어지되, 100의 배수는 400으로도 나누어떨어질 때만)이면 True를 반환하는",
            "def is_leap_year(year):\n    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)\n",
            "def is_leap_year(year):\n    return year % 4 == 0\n",
            lambda y: y % 4 == 0 and (y % 100 != 0 or y % 400 == 0),
            [(2024,), (1900,), (2000,), (2023,)],
            "Divisibility by 4 is necessary but not enough: years divisible by 100 are leap years only when they "
            "are also divisible by 400 (1900 is not, 2000 is).",
            "4의 배수인 것만으로는 부족합니다. 100의 배수인 해는 400의 배수일 때만 윤년입니다(1900년은 아니고 2000년은 윤년).")


def letter_grade(_, r):
  return _s("letter_grade", "(score: int) -> str",
            "returns 'A' for scores of 90 and above, 'B' for 80-89, 'C' for 70-79, 'D' for 60-69 and 'F' below 60",
            "점수가 90 이상이면 'A', 80~89는 'B', 70~79는 'C', 60~69는 'D', 60 미만은 'F'를 반환하는",
            "def letter_grade(score):\n    for cut, g in ((90, 'A'), (80, 'B'), (70, 'C'), (60, 'D')):\n"
            "        if score >= cut:\n            return g\n    return 'F'\n",
            "def letter_grade(score):\n    for cut, g in ((90, 'A'), (80, 'B'), (70, 'C'), (60, 'D')):\n"
            "        if score > cut:\n            return g\n    return 'F'\n",
            lambda s: next((g for cut, g in ((90, "A"), (80, "B"), (70, "C"), (60, "D")) if s >= cut), "F"),
            [(90,), (89,), (60,), (59,), (100,)],
            "Check the cut-offs from the highest down and return at the first one reached; 'and above' means the "
            "comparison includes the boundary (>=).",
            "가장 높은 기준부터 차례로 확인해 처음 만족하는 등급을 반환합니다. '이상'이므로 경계값을 포함하는 >=로 비교합니다.")


def value_range(_, r):
  return _s("value_range", "(nums: list[int]) -> int",
            "returns the largest number of a non-empty list minus its smallest number (the list is not sorted)",
            "비어 있지 않고 정렬되지 않은 리스트에서 가장 큰 수와 가장 작은 수의 차를 반환하는",
            "def value_range(nums):\n    return max(nums) - min(nums)\n",
            "def value_range(nums):\n    return nums[-1] - nums[0]\n",
            lambda nums: max(nums) - min(nums),
            [([3, 9, 1, 4],), ([5],), (_nums(r, 6),)],
            "The list is unsorted, so the extremes can be anywhere; max() and min() find them in linear time.",
            "리스트가 정렬되어 있지 않으므로 최댓값과 최솟값은 어디에나 있을 수 있습니다. max()와 min()으로 찾습니다.")


def mask_all_but_last4(_, r):
  return _s("mask_all_but_last4", "(s: str) -> str",
            "replaces every character of s except the last four with '*' (strings of length 4 or less are "
            "returned unchanged)", "문자열 s의 마지막 네 글자를 뺀 모든 글자를 '*'로 바꾼(길이 4 이하면 그대로) 문자열을 반환하는",
            "def mask_all_but_last4(s):\n    return '*' * max(0, len(s) - 4) + s[-4:]\n",
            "def mask_all_but_last4(s):\n    return ''.join('*' if c.isdigit() else c for c in s[:-4]) + s[-4:]\n",
            lambda s: "*" * max(0, len(s) - 4) + s[-4:],
            [("1234-5678-9012",), ("abc",), ("card0042",)],
            "The last four characters are s[-4:] (the whole string when it is shorter), and every character "
            "before them, digit or not, becomes '*'.",
            "마지막 네 글자는 s[-4:]이고(더 짧으면 전체), 그 앞의 글자는 숫자든 아니든 모두 '*'로 바꿉니다.")


def triangular_number(_, r):
  return _s("triangular_number", "(n: int) -> int",
            "returns the n-th triangular number 1 + 2 + ... + n for n >= 0",
            "n >= 0일 때 n번째 삼각수 1 + 2 + ... + n을 반환하는",
            "def triangular_number(n):\n    return n * (n + 1) // 2\n",
            "def triangular_number(n):\n    return n * (n - 1) // 2\n",
            lambda n: n * (n + 1) // 2,
            [(0,), (1,), (4,), (r.randint(10, 1000),)],
            "Pairing the first and last terms gives n / 2 pairs that each sum to n + 1, so the total is "
            "n * (n + 1) // 2, exact in integers.",
            "첫 항과 끝 항을 짝지으면 합이 n + 1인 쌍이 n / 2개이므로 합은 n * (n + 1) // 2입니다.")


def collatz_steps(_, r):
  return _s("collatz_steps", "(n: int) -> int",
            "returns how many steps the Collatz rule (n // 2 if n is even, else 3 * n + 1) takes to reach 1 from a "
            "positive n (0 steps for n = 1)",
            "양의 정수 n에서 콜라츠 규칙(짝수면 n // 2, 홀수면 3 * n + 1)으로 1이 될 때까지의 단계 수(n = 1이면 0)를 반환하는",
            "def collatz_steps(n):\n    steps = 0\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
            "        steps += 1\n    return steps\n",
            "def collatz_steps(n):\n    steps = 1\n    while n != 1:\n        n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
            "        steps += 1\n    return steps\n",
            lambda n: _collatz(n), [(1,), (6,), (27,), (r.randint(2, 500),)],
            "Count only the moves: start at 0 and add one each time the rule is applied, until n is 1.",
            "규칙을 적용한 횟수만 세야 하므로 0에서 시작해 n이 1이 될 때까지 적용할 때마다 1씩 더합니다.")


def _collatz(n):
  steps = 0
  while n != 1:
    n = n // 2 if n % 2 == 0 else 3 * n + 1
    steps += 1
  return steps


def safe_divide(_, r):
  return _s("safe_divide", "(a: float, b: float) -> float | None",
            "returns a / b, or None when b is 0", "b가 0이면 None을, 아니면 a / b를 반환하는",
            "def safe_divide(a, b):\n    if b == 0:\n        return None\n    return a / b\n",
            "def safe_divide(a, b):\n    if b == 0:\n        return 0\n    return a / b\n",
            lambda a, b: None if b == 0 else a / b, [(6, 3), (1, 0), (0, 5), (7, 2)],
            "Division by zero has no value, so the function checks b first and returns None, not 0, which would "
            "look like a real quotient.",
            "0으로 나눈 값은 없으므로 먼저 b를 확인해 None을 반환합니다. 0을 반환하면 실제 몫처럼 보여 안 됩니다.")


def merge_counts(_, r):
  return _s("merge_counts", "(a: dict[str, int], b: dict[str, int]) -> dict[str, int]",
            "returns a new dict with the keys of both dicts, adding the values of keys that appear in both",
            "두 딕셔너리의 키를 모두 담고, 양쪽에 있는 키는 값을 더한 새 딕셔너리를 반환하는",
            "def merge_counts(a, b):\n    out = dict(a)\n    for k, v in b.items():\n        out[k] = out.get(k, 0) + v\n"
            "    return out\n",
            "def merge_counts(a, b):\n    return {**a, **b}\n",
            lambda a, b: {**a, **{k: a.get(k, 0) + v for k, v in b.items()}},
            [({"x": 1, "y": 2}, {"y": 3, "z": 4}), ({}, {}), ({"k": 5}, {})],
            "Copy a, then add each value of b to what is already there (0 when the key is new); unpacking with "
            "{**a, **b} would overwrite instead of adding.",
            "a를 복사한 뒤 b의 각 값을 기존 값(새 키면 0)에 더합니다. {**a, **b}는 더하지 않고 덮어씁니다.")


def invert_mapping(_, r):
  return _s("invert_mapping", "(d: dict) -> dict",
            "returns a dict that maps each value of d back to its key (the values of d are distinct)",
            "값이 모두 다른 딕셔너리 d의 각 값을 키로, 원래 키를 값으로 하는 딕셔너리를 반환하는",
            "def invert_mapping(d):\n    return {v: k for k, v in d.items()}\n",
            "def invert_mapping(d):\n    return {v: k for k, v in d.items() if v}\n",
            lambda d: {v: k for k, v in d.items()},
            [({"a": 1, "b": 0},), ({},), ({"x": "y", "z": ""},)],
            "A dict comprehension swaps each pair; every pair must be kept, including falsy values such as 0 or ''.",
            "딕셔너리 컴프리헨션으로 각 쌍을 뒤집습니다. 0이나 ''처럼 거짓으로 평가되는 값도 모두 남겨야 합니다.")


def count_by_length(_, r):
  return _s("count_by_length", "(words: list[str]) -> dict[int, int]",
            "returns a dict mapping each word length to how many words in the list have it (duplicates count)",
            "리스트의 단어 길이마다 그 길이의 단어가 몇 개인지(중복도 셈) 담은 딕셔너리를 반환하는",
            "def count_by_length(words):\n    out = {}\n    for w in words:\n        out[len(w)] = out.get(len(w), 0) + 1\n"
            "    return out\n",
            "def count_by_length(words):\n    out = {}\n    for w in set(words):\n        out[len(w)] = out.get(len(w), 0) + 1\n"
            "    return out\n",
            lambda words: {n: sum(len(w) == n for w in words) for n in dict.fromkeys(len(w) for w in words)},
            [(["ab", "cd", "ab", "xyz"],), ([],), (["a"],)],
            "Every word counts, repeated ones too, so iterate over the list itself (not a set) and increase the "
            "counter of its length.",
            "중복된 단어도 세어야 하므로 집합이 아니라 리스트 자체를 돌면서 길이별 개수를 1씩 늘립니다.")


def alternate_case(_, r):
  return _s("alternate_case", "(s: str) -> str",
            "returns s with characters at even indexes uppercased and at odd indexes lowercased",
            "s에서 짝수 인덱스의 글자는 대문자, 홀수 인덱스의 글자는 소문자로 바꾼 문자열을 반환하는",
            "def alternate_case(s):\n    return ''.join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(s))\n",
            "def alternate_case(s):\n    return ''.join(c.upper() if i % 2 else c.lower() for i, c in enumerate(s))\n",
            lambda s: "".join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(s)),
            [("hello",), ("",), ("AbCd e",)],
            "enumerate gives each character's index; index 0 is even, so the first character is uppercased.",
            "enumerate로 각 글자의 인덱스를 얻습니다. 0은 짝수이므로 첫 글자가 대문자가 됩니다.")


def squeeze_spaces(_, r):
  return _s("squeeze_spaces", "(s: str) -> str",
            "collapses every run of spaces in s into a single space and removes spaces at both ends",
            "s의 연속된 공백을 공백 하나로 줄이고 양 끝의 공백을 없앤 문자열을 반환하는",
            "def squeeze_spaces(s):\n    return ' '.join(part for part in s.split(' ') if part)\n",
            "def squeeze_spaces(s):\n    return s.replace('  ', ' ').strip()\n",
            lambda s: " ".join(p for p in s.split(" ") if p),
            [("a   b  c",), ("   ",), (" x ",)],
            "Splitting on single spaces turns each run of spaces into empty pieces; dropping them and joining with "
            "one space collapses runs of any length, which a single replace('  ', ' ') does not.",
            "한 칸 공백으로 나누면 연속 공백은 빈 조각이 됩니다. 빈 조각을 버리고 공백 하나로 이으면 길이에 상관없이 줄어듭니다.")


def sum_even_between(_, r):
  return _s("sum_even_between", "(a: int, b: int) -> int",
            "returns the sum of the even integers from a to b inclusive (a <= b)",
            "a <= b일 때 a부터 b까지(양 끝 포함)의 짝수를 모두 더한 값을 반환하는",
            "def sum_even_between(a, b):\n    return sum(x for x in range(a, b + 1) if x % 2 == 0)\n",
            "def sum_even_between(a, b):\n    return sum(x for x in range(a, b) if x % 2 == 0)\n",
            lambda a, b: sum(x for x in range(a, b + 1) if x % 2 == 0),
            [(1, 10), (4, 4), (-3, 3), (r.randint(0, 20), r.randint(30, 90))],
            "Both ends are included, so the range runs to b + 1; the filter keeps the even numbers (negative ones "
            "too, since -2 % 2 == 0).",
            "양 끝을 포함하므로 range는 b + 1까지입니다. 짝수만 거르면 되고, -2 % 2 == 0이므로 음수 짝수도 포함됩니다.")


def average_or_zero(_, r):
  return _s("average_or_zero", "(nums: list[float]) -> float",
            "returns the arithmetic mean of nums, or 0.0 for an empty list",
            "nums의 산술 평균을, 빈 리스트면 0.0을 반환하는",
            "def average_or_zero(nums):\n    if not nums:\n        return 0.0\n    return sum(nums) / len(nums)\n",
            "def average_or_zero(nums):\n    return sum(nums) / len(nums)\n",
            lambda nums: sum(nums) / len(nums) if nums else 0.0,
            [([1, 2, 3, 4],), ([],), ([5],)],
            "The mean is sum / len, but an empty list has length 0, so it is handled first and returns 0.0.",
            "평균은 sum / len이지만 빈 리스트는 길이가 0이므로 먼저 확인해 0.0을 반환합니다.")


def repeated_values(_, r):
  return _s("repeated_values", "(nums: list[int]) -> list[int]",
            "returns, in ascending order, each value that occurs more than once in nums",
            "nums에 두 번 이상 나오는 값들을 오름차순으로 한 번씩 담은 리스트를 반환하는",
            "def repeated_values(nums):\n    return sorted({x for x in nums if nums.count(x) > 1})\n",
            "def repeated_values(nums):\n    return sorted({x for x in nums if nums.count(x) == 2})\n",
            lambda nums: sorted({x for x in nums if nums.count(x) > 1}),
            [([3, 1, 3, 2, 2, 2],), ([],), ([5, 5, 5],)],
            "'More than once' means a count of 2 or more, not exactly 2; a set keeps each repeated value once "
            "and sorted() orders them.",
            "'두 번 이상'은 개수가 정확히 2인 것이 아니라 2 이상인 것입니다. 집합으로 한 번씩만 남기고 sorted()로 정렬합니다.")


def row_sums(_, r):
  return _s("row_sums", "(m: list[list[int]]) -> list[int]",
            "returns the sum of each row of the matrix m (a list of rows)",
            "행들의 리스트로 주어진 행렬 m의 각 행의 합을 리스트로 반환하는",
            "def row_sums(m):\n    return [sum(row) for row in m]\n",
            "def row_sums(m):\n    return [sum(col) for col in zip(*m)]\n",
            lambda m: [sum(row) for row in m],
            [([[1, 2, 3], [4, 5, 6]],), ([],), ([[7]],)],
            "Each inner list is a row, so summing each inner list gives the row sums; zip(*m) would give columns.",
            "안쪽 리스트 하나가 한 행이므로 각각을 더하면 행의 합입니다. zip(*m)은 열을 만듭니다.")


def diagonal_sum(_, r):
  return _s("diagonal_sum", "(m: list[list[int]]) -> int",
            "returns the sum of the main diagonal (m[0][0], m[1][1], ...) of a square matrix",
            "정사각 행렬 m의 주대각선 원소(m[0][0], m[1][1], ...)의 합을 반환하는",
            "def diagonal_sum(m):\n    return sum(m[i][i] for i in range(len(m)))\n",
            "def diagonal_sum(m):\n    n = len(m)\n    return sum(m[i][i] + m[i][n - 1 - i] for i in range(n))\n",
            lambda m: sum(m[i][i] for i in range(len(m))),
            [([[1, 2], [3, 4]],), ([[5]],), ([],), ([[1, 2, 3], [4, 5, 6], [7, 8, 9]],)],
            "The main diagonal holds the elements whose row and column index are equal, so sum m[i][i].",
            "주대각선은 행 번호와 열 번호가 같은 원소들이므로 m[i][i]를 더합니다.")


def ordinal_suffix(_, r):
  return _s("ordinal_suffix", "(n: int) -> str",
            "returns n with its English ordinal suffix, e.g. 1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', "
            "22 -> '22nd'", "양의 정수 n에 영어 서수 접미사를 붙인 문자열(예: 1 -> '1st', 11 -> '11th', 22 -> '22nd')을 반환하는",
            "def ordinal_suffix(n):\n    if n % 100 in (11, 12, 13):\n        return str(n) + 'th'\n"
            "    return str(n) + {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')\n",
            "def ordinal_suffix(n):\n    return str(n) + {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')\n",
            lambda n: str(n) + ("th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")),
            [(1,), (2,), (3,), (4,), (11,), (12,), (22,), (113,)],
            "The last digit picks st, nd or rd, except that 11, 12 and 13 (also 111, 112, ...) always take 'th', so "
            "n % 100 is checked first.",
            "끝자리로 st, nd, rd를 고르지만 11, 12, 13(111, 112 등도)은 항상 'th'이므로 먼저 n % 100을 확인합니다.")


def unique_letters(_, r):
  return _s("has_unique_letters", "(s: str) -> bool",
            "returns True when no letter occurs twice in s, ignoring case and ignoring non-letters",
            "대소문자를 구분하지 않고 글자가 아닌 문자는 무시할 때, s에 같은 글자가 두 번 나오지 않으면 True를 반환하는",
            "def has_unique_letters(s):\n    letters = [c.lower() for c in s if c.isalpha()]\n"
            "    return len(letters) == len(set(letters))\n",
            "def has_unique_letters(s):\n    letters = [c for c in s if c.isalpha()]\n    return len(letters) == len(set(letters))\n",
            lambda s: len([c.lower() for c in s if c.isalpha()]) == len({c.lower() for c in s if c.isalpha()}),
            [("Dermatoglyphics",), ("Alpha",), ("",), ("a-b c",)],
            "Keep only letters, lowercase them, and compare the list's length with its set's: they are equal "
            "exactly when no letter repeats.",
            "글자만 남겨 소문자로 바꾼 뒤 리스트와 집합의 길이를 비교하면, 같을 때만 반복되는 글자가 없습니다.")


def power_of_two(_, r):
  return _s("is_power_of_two", "(n: int) -> bool",
            "returns True when n is 1, 2, 4, 8, ... (a power of two); False for 0 and negative numbers",
            "n이 1, 2, 4, 8, ...처럼 2의 거듭제곱이면 True를, 0이나 음수면 False를 반환하는",
            "def is_power_of_two(n):\n    return n > 0 and n & (n - 1) == 0\n",
            "def is_power_of_two(n):\n    return n & (n - 1) == 0\n",
            lambda n: n > 0 and n & (n - 1) == 0, [(1,), (0,), (64,), (96,), (-8,)],
            "A power of two has a single 1 bit, and n & (n - 1) clears the lowest 1 bit, so the result is 0 only "
            "for powers of two, and for 0, which the n > 0 test excludes.",
            "2의 거듭제곱은 1인 비트가 하나뿐이고 n & (n - 1)은 가장 낮은 1 비트를 지우므로, 결과가 0인 것은 2의 거듭제곱과 "
            "0뿐입니다. n > 0 조건으로 0을 뺍니다.")
