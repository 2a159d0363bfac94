"""Math verifier: final-answer extraction (EN/KO), normalisation and exact comparison.

Extraction order: the last `\\boxed{...}` (nested braces allowed), else the last `#### x`,
else the last answer line ("Answer: x", "The final answer is x", "정답: x", "답은 x입니다"),
else the last number in the text. Confidence lines ("Confidence: 80%") are ignored.
Values compare exactly as `Fraction`s (floats, from irrational roots or pi, with 1e-9
relative tolerance); a trailing percent matches both p and p/100; comma lists compare as
multisets; anything non-numeric falls back to a normalised string comparison.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

from kanana_jax.evals.calibration import strip_confidence
from kanana_jax.rewards.expr import CONSTANTS, FUNCTIONS, ExprError, Number, evaluate, numbers_equal

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")
_HASH_RE = re.compile(r"^\s*####\s*(.+?)\s*$", re.MULTILINE)
_ANSWER_RES = (
    re.compile(r"(?:final\s+answer|answer)\s*(?:is|was|would\s+be|will\s+be)?\s*[:：=]\s*(.+)", re.IGNORECASE),
    re.compile(r"(?:final\s+answer|answer)\s+(?:is|was|would\s+be|will\s+be)\s+(.+)", re.IGNORECASE),
    re.compile(r"(?:최종\s*)?(?:정답|답)\s*(?:은|는)?\s*[:：=]\s*(.+)"),
    re.compile(r"(?:최종\s*)?(?:정답|답)\s*(?:은|는)\s+(.+)"),
)
_NUMBER_RE = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?|[-−]?\.\d+%?")
_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_KO_UNITS = {"억": 10**8, "만": 10**4, "천": 10**3, "백": 10**2}
_KO_NUMBER_RE = re.compile(r"(?:\d+(?:\.\d+)?\s*[억만천백]\s*)+(?:\d+(?:\.\d+)?)?")
_TRAILING_KO = re.compile(r"\s*(?:입니다|이에요|예요|이다|이며|이고|임|요)\s*$")


def _match_brace(text: str, open_idx: int) -> int | None:
    """Index of the '}' matching the '{' at `open_idx`, or None when unbalanced."""
    depth = 0
    for i in range(open_idx, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def extract_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` or `\\fbox{...}` (nested braces kept), else None."""
    found = None
    for m in _BOXED_RE.finditer(text):
        start = m.end()
        if start < len(text) and text[start] == "{":
            end = _match_brace(text, start)
            if end is not None:
                found = text[start + 1:end]
        else:  # "\boxed 5"
            tok = re.match(r"[^\s$]+", text[start:])
            if tok:
                found = tok.group(0)
    return found


def _strip_markdown(s: str) -> str:
    """Remove bold/italic markers ('**Answer:**', '*x*') but keep '**' and '*' between operands (2**10, 2*3)."""
    s = re.sub(r"(?<![\w)*])\*\*?(?![\s*])|(?<![\s*])\*\*?(?![\w(*])", "", s)
    return re.sub(r"(?<![\w\\])__|__(?!\w)", "", s)


def extract_answer(text: str) -> str | None:
    """The final-answer string of a response (see module docstring for the order), or None."""
    text = strip_confidence(text)
    boxed = extract_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    hashes = _HASH_RE.findall(text)
    if hashes:
        return hashes[-1]
    best = None  # (line index, start) of the last answer-line match
    for li, line in enumerate(text.splitlines()):
        clean = _strip_markdown(line)
        for pat in _ANSWER_RES:
            for m in pat.finditer(clean):
                if m.group(1).strip() and (best is None or (li, m.start()) >= best[:2]):
                    best = (li, m.start(), m.group(1).strip())
    if best is not None:
        return best[2]
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _latex_to_plain(s: str) -> str:
    """Rewrite the LaTeX subset seen in answers (frac, sqrt, cdot, text, ^{}) into evaluator syntax."""
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"(\1)/(\2)", s)  # \frac12
    for _ in range(20):  # innermost-first rewriting of \frac{a}{b} and \sqrt[n]{a}
        new = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\sqrt\s*\[([^\[\]{}]*)\]\s*\{([^{}]*)\}", r"((\2)^(1/(\1)))", new)
        new = re.sub(r"\\sqrt\s*\{([^{}]*)\}", r"sqrt(\1)", new)
        new = re.sub(r"\^\s*\{([^{}]*)\}", r"^(\1)", new)
        new = re.sub(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}", r" \1 ", new)
        if new == s:
            break
        s = new
    s = re.sub(r"\\sqrt\s*(\d+)", r"sqrt(\1)", s)
    s = re.sub(r"\^\s*\\circ|\\circ|\\degree|°", "", s)
    s = s.replace("{,}", "")
    for src, dst in ((r"\cdot", "*"), (r"\times", "*"), (r"\div", "/"), (r"\pi", " pi "), (r"\%", "%"),
                     (r"\$", ""), (r"\left", ""), (r"\right", ""), (r"\displaystyle", ""), (r"\!", ""),
                     (r"\,", ""), (r"\;", ""), (r"\:", ""), (r"\ ", " "), ("\\(", ""), ("\\)", ""),
                     ("\\[", ""), ("\\]", "")):
        s = s.replace(src, dst)
    return s.replace("{", "(").replace("}", ")").replace("$", "")


def _clean(ans: str) -> str:
    """Strip markdown, math delimiters, currency, Korean copulas, 'x =' prefixes and end punctuation."""
    s = _strip_markdown(ans.strip()).replace("`", "")
    s = _latex_to_plain(s)
    s = s.replace("−", "-").replace("＄", "").replace("₩", "").replace("€", "").replace("£", "")
    s = re.sub(r"^\s*[A-Za-z]\s*=\s*", "", s)  # "x = 5"
    for _ in range(3):
        s = s.strip().rstrip(".。!,;:")
        s = _TRAILING_KO.sub("", s)
    return s.strip()


def _korean_number(s: str) -> Fraction | None:
    """'2억 3000만' -> 230000000, '1만 2천' -> 12000; None when `s` has no number with a Korean unit."""
    m = _KO_NUMBER_RE.search(s)
    if m is None:
        return None
    total, current = Fraction(0), None
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)?\s*([억만천백])?", m.group(0)):
        if num:
            current = Fraction(num)
        if unit:
            total += (current if current is not None else Fraction(1)) * _KO_UNITS[unit]
            current = None
    if current is not None:
        total += current
    return total


def _strip_words(s: str) -> str:
    """Drop unit words and Hangul ('42 apples', '42개', '5 cm^2') but keep evaluator names."""
    def keep(m: re.Match) -> str:
        return m.group(0) if m.group(0).lower() in CONSTANTS or m.group(0).lower() in FUNCTIONS else " "

    s = re.sub(r"[A-Za-z]+(?:\^\(?\d+\)?)?|[가-힣]+", keep, s)
    return s.strip()


def _parse_single(s: str) -> tuple[Number, ...] | None:
    """Acceptable numeric values of one answer (two for a trailing percent), or None if not numeric."""
    s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
    percent = s.rstrip().endswith("%")
    body = s.rstrip()[:-1] if percent else s
    attempts = [body, _strip_words(body)]
    for text in attempts:
        try:
            val = evaluate(text)
        except ExprError:
            continue
        return (val / 100, val) if percent else (val,)
    if re.search(r"\d\s*[억만천백]", s):
        val = _korean_number(s)
        if val is not None:
            return (val,)
    m = _NUMBER_RE.search(s)
    if m is not None:
        tok = m.group(0).replace("−", "-").replace(",", "")
        try:
            val = evaluate(tok.rstrip("%"))
        except ExprError:
            return None
        return (val / 100, val) if tok.endswith("%") else (val,)
    return None


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
    """A normalised answer: numeric alternatives per list element (None if not numeric) and its text."""

    values: tuple[tuple[Number, ...], ...] | None
    text: str


def _split_list(s: str) -> list[str]:
    """Split on top-level commas/semicolons that are not thousands separators."""
    s = _THOUSANDS_RE.sub(lambda m: m.group(0).replace(",", ""), s)
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in ",;" and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def normalize_answer(ans: str) -> ParsedAnswer:
    """Parse an answer string into exact numeric values (list-aware) plus normalised text."""
    s = _clean(ans)
    text = re.sub(r"\s+", "", s).lower().strip("()[]")
    inner = s[1:-1] if len(s) > 1 and s[0] in "([" and s[-1] in ")]" and "," in s else s
    parts = _split_list(inner)
    if len(parts) > 1:
        vals = [_parse_single(p) for p in parts]
        return ParsedAnswer(None if any(v is None for v in vals) else tuple(vals), text)
    single = _parse_single(s)
    return ParsedAnswer(None if single is None else (single,), text)


def _alts_equal(a: tuple[Number, ...], b: tuple[Number, ...]) -> bool:
    return any(numbers_equal(x, y) for x in a for y in b)


def answers_match(pred: str | None, gold: str | int | float | Fraction) -> bool:
    """True when the predicted answer string equals the gold answer (numerically or as text)."""
    if pred is None:
        return False
    gold_str = str(gold) if not isinstance(gold, Fraction) else f"{gold.numerator}/{gold.denominator}"
    p, g = normalize_answer(pred), normalize_answer(gold_str)
    if p.values is not None and g.values is not None:
        if len(p.values) != len(g.values):
            return False
        if len(g.values) == 1:
            return _alts_equal(p.values[0], g.values[0])
        remaining = list(p.values)  # multiset match, order-insensitive
        for gv in g.values:
            hit = next((i for i, pv in enumerate(remaining) if _alts_equal(pv, gv)), None)
            if hit is None:
                return False
            remaining.pop(hit)
        return True
    return bool(p.text) and p.text == g.text


def math_reward(response: str, gold: str | int | float | Fraction) -> float:
    """1.0 when the response's extracted final answer matches `gold`, else 0.0."""
    return 1.0 if answers_match(extract_answer(response), gold) else 0.0
