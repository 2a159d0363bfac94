"""Instruction-following verifier: IFEval-style constraints checked by code, registered by id.

`make_constraint("length:max_words", {"n": 50}).check(text)` checks one constraint;
`evaluate_instructions(text, [(id, kwargs), ...])` checks a prompt's list (strict or loose:
loose also accepts the response without its first/last line or without '*' markup, as IFEval
does). English keywords match whole words case-insensitively; non-ASCII keywords (Korean,
where particles attach to words) match as substrings.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import re
from typing import Any, ClassVar, Sequence

REGISTRY: dict[str, type["Constraint"]] = {}
RELATIONS = ("at least", "at most", "exactly", "less than", "more than")


def register(cls: type["Constraint"]) -> type["Constraint"]:
    if cls.id in REGISTRY:
        raise ValueError(f"constraint id {cls.id!r} registered twice")
    REGISTRY[cls.id] = cls
    return cls


def _compare(count: int, n: int, relation: str) -> bool:
    return {"at least": count >= n, "at most": count <= n, "exactly": count == n,
            "less than": count < n, "more than": count > n}[relation]


def _words(text: str) -> list[str]:
    return [t for t in text.split() if re.search(r"\w", t)]


def _count_keyword(text: str, keyword: str) -> int:
    if keyword.isascii():
        return len(re.findall(rf"(?<!\w){re.escape(keyword)}(?!\w)", text, re.IGNORECASE))
    return text.lower().count(keyword.lower())


class Constraint(abc.ABC):
    """Base: subclasses declare `id`, `params` (name -> type) and `check`; kwargs are validated."""

    id: ClassVar[str]
    params: ClassVar[dict[str, type]] = {}
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any):
        unknown = set(kwargs) - set(self.params)
        missing = set(self.params) - set(kwargs) - set(self.defaults)
        if unknown or missing:
            raise ValueError(f"constraint {self.id!r} takes {sorted(self.params)}; "
                             f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        values = {**self.defaults, **kwargs}
        for name, typ in self.params.items():
            val = values[name]
            ok = isinstance(val, typ) and not (typ is int and isinstance(val, bool))
            if typ is list:
                ok = ok and all(isinstance(v, str) and v for v in val) and bool(val)
            if not ok:
                raise ValueError(f"constraint {self.id!r}: {name}={val!r} must be {typ.__name__}"
                                 + (" of non-empty strings" if typ is list else ""))
        if "relation" in values and values["relation"] not in RELATIONS:
            raise ValueError(f"constraint {self.id!r}: relation must be one of {RELATIONS}, got {values['relation']!r}")
        if "n" in values and values["n"] < 0:
            raise ValueError(f"constraint {self.id!r}: n must be >= 0, got {values['n']}")
        self.kwargs = values

    @abc.abstractmethod
    def check(self, response: str) -> bool:
        """True when `response` satisfies this constraint."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kwargs})"


@register
class MinWords(Constraint):
    id, params = "length:min_words", {"n": int}

    def check(self, response):
        return len(_words(response)) >= self.kwargs["n"]


@register
class MaxWords(Constraint):
    id, params = "length:max_words", {"n": int}

    def check(self, response):
        return len(_words(response)) <= self.kwargs["n"]


@register
class SentenceCount(Constraint):
    """Sentences end with . ! ? (or their full-width forms) followed by whitespace or the end."""

    id, params, defaults = "length:sentences", {"n": int, "relation": str}, {"relation": "exactly"}

    def check(self, response):
        parts = re.split(r"(?<=[.!?。！？])\s+", response.strip())
        count = sum(1 for p in parts if re.search(r"\w", p))
        return _compare(count, self.kwargs["n"], self.kwargs["relation"])


@register
class ParagraphCount(Constraint):
    """Exactly n paragraphs, separated by '***' lines when present, else by blank lines."""

    id, params = "length:paragraphs", {"n": int}

    def check(self, response):
        sep = r"^\s*\*\*\*\s*$" if re.search(r"^\s*\*\*\*\s*$", response, re.MULTILINE) else r"\n\s*\n"
        parts = [p for p in re.split(sep, response.strip(), flags=re.MULTILINE) if p.strip()]
        return len(parts) == self.kwargs["n"]


@register
class IncludeKeywords(Constraint):
    id, params = "keywords:include", {"keywords": list}

    def check(self, response):
        return all(_count_keyword(response, k) > 0 for k in self.kwargs["keywords"])


@register
class ForbiddenWords(Constraint):
    id, params = "keywords:forbidden", {"words": list}

    def check(self, response):
        return all(_count_keyword(response, w) == 0 for w in self.kwargs["words"])


@register
class KeywordFrequency(Constraint):
    id, params, defaults = "keywords:frequency", {"keyword": str, "n": int, "relation": str}, {"relation": "at least"}

    def check(self, response):
        return _compare(_count_keyword(response, self.kwargs["keyword"]), self.kwargs["n"], self.kwargs["relation"])


@register
class JsonFormat(Constraint):
    """The whole response is one JSON value (a ```json fence around it is allowed)."""

    id = "format:json"

    def check(self, response):
        body = response.strip()
        fence = re.fullmatch(r"```(?:json|JSON)?\s*(.*?)\s*```", body, re.DOTALL)
        try:
            json.loads(fence.group(1) if fence else body)
        except json.JSONDecodeError:
            return False
        return True


_BULLET_RE = re.compile(r"^\s*[*-]\s+\S", re.MULTILINE)


@register
class BulletCount(Constraint):
    """Exactly n markdown bullet lines ('* x' or '- x')."""

    id, params = "format:bullets", {"n": int}

    def check(self, response):
        return len(_BULLET_RE.findall(response)) == self.kwargs["n"]


@register
class NumberedList(Constraint):
    """Exactly n numbered lines '1.' (or '1)') ... 'n.', numbered in order from 1."""

    id, params = "format:numbered_list", {"n": int}

    def check(self, response):
        nums = [int(m) for m in re.findall(r"^\s*(\d+)[.)]\s+\S", response, re.MULTILINE)]
        return nums == list(range(1, self.kwargs["n"] + 1))


@register
class ResponseLanguage(Constraint):
    """'ko': Hangul is at least `min_ratio` of Hangul+Latin letters; 'en': under 5% Hangul."""

    id, params, defaults = "language:response", {"language": str, "min_ratio": float}, {"min_ratio": 0.5}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.kwargs["language"] not in ("ko", "en"):
            raise ValueError(f"language:response supports language 'ko' or 'en', got {self.kwargs['language']!r}")

    def check(self, response):
        hangul = len(re.findall(r"[가-힣ㄱ-ㅎㅏ-ㅣ]", response))
        latin = len(re.findall(r"[A-Za-z]", response))
        if hangul + latin == 0:
            return False
        ratio = hangul / (hangul + latin)
        return ratio >= self.kwargs["min_ratio"] if self.kwargs["language"] == "ko" else ratio < 0.05


@register
class EndingPhrase(Constraint):
    """The response ends with the exact phrase (trailing whitespace ignored)."""

    id, params = "ending:phrase", {"phrase": str}

    def check(self, response):
        return response.rstrip().endswith(self.kwargs["phrase"].strip())


@register
class StartingPhrase(Constraint):
    id, params = "starting:phrase", {"phrase": str}

    def check(self, response):
        return response.lstrip().startswith(self.kwargs["phrase"].strip())


@register
class Title(Constraint):
    """A title wrapped in double angular brackets, like <<My Title>>."""

    id = "format:title"

    def check(self, response):
        return re.search(r"<<[^\n<>]*\S[^\n<>]*>>", response) is not None


@register
class AllLowercase(Constraint):
    id = "case:lowercase"

    def check(self, response):
        return response.islower()


@register
class AllUppercase(Constraint):
    """Every English letter is uppercase (at least one letter present)."""

    id = "case:uppercase"

    def check(self, response):
        return response.isupper()


@register
class NoCommas(Constraint):
    id = "punctuation:no_comma"

    def check(self, response):
        return not any(c in response for c in ",，、")


@register
class Placeholders(Constraint):
    """At least n square-bracket placeholders such as [address]."""

    id, params = "content:placeholders", {"n": int}

    def check(self, response):
        return len(re.findall(r"\[[^\[\]\n]*\w[^\[\]\n]*\]", response)) >= self.kwargs["n"]


@register
class Highlights(Constraint):
    """At least n highlighted sections in markdown, *like this* (or **like this**)."""

    id, params = "format:highlights", {"n": int}

    def check(self, response):
        double = re.findall(r"\*\*(?=\S)[^\n*]+?(?<=\S)\*\*", response)
        rest = re.sub(r"\*\*(?=\S)[^\n*]+?(?<=\S)\*\*", " ", response)
        single = re.findall(r"\*(?=\S)[^\n*]+?(?<=\S)\*", rest)
        return len(double) + len(single) >= self.kwargs["n"]


@register
class Postscript(Constraint):
    """A line starting with the marker (default 'P.S.') followed by text."""

    id, params, defaults = "content:postscript", {"marker": str}, {"marker": "P.S."}

    def check(self, response):
        return re.search(rf"^\s*{re.escape(self.kwargs['marker'])}\s*\S", response, re.MULTILINE) is not None


@register
class Quotation(Constraint):
    """The whole response is wrapped in double quotes ("..." or “...”)."""

    id = "format:quotation"

    def check(self, response):
        s = response.strip()
        return len(s) >= 2 and ((s[0] == s[-1] == '"') or (s[0] == "“" and s[-1] == "”"))


@register
class Sections(Constraint):
    """Exactly n sections, each opened by a line '<splitter> <number>' (e.g. 'Section 1', '## SECTION 2')."""

    id, params, defaults = "format:sections", {"n": int, "splitter": str}, {"splitter": "Section"}

    def check(self, response):
        pat = rf"^\s*(?:#+\s*)?\**{re.escape(self.kwargs['splitter'])}\s+(\d+)"
        nums = [int(m) for m in re.findall(pat, response, re.MULTILINE)]
        return nums == list(range(1, self.kwargs["n"] + 1))


def make_constraint(constraint_id: str, kwargs: dict | None = None) -> Constraint:
    """Instantiate a registered constraint; raises ValueError naming the id or kwarg that is wrong."""
    if constraint_id not in REGISTRY:
        raise ValueError(f"unknown constraint id {constraint_id!r}; known ids: {sorted(REGISTRY)}")
    return REGISTRY[constraint_id](**(kwargs or {}))


def _loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    bases = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [v for b in bases for v in (b, b.replace("*", "")) if v.strip()]


@dataclasses.dataclass(frozen=True)
class InstructionResult:
    """Per-constraint verdicts for one response; `all_passed` is IFEval's prompt-level accuracy."""

    per_constraint: tuple[bool, ...]

    @property
    def all_passed(self) -> bool:
        return all(self.per_constraint)

    @property
    def fraction(self) -> float:
        return sum(self.per_constraint) / len(self.per_constraint) if self.per_constraint else 1.0


def evaluate_instructions(response: str, constraints: Sequence[tuple[str, dict] | dict],
                          loose: bool = False) -> InstructionResult:
    """Check each (id, kwargs) pair, or {'id', 'kwargs'} dict, against `response`."""
    verdicts = []
    for spec in constraints:
        cid, kwargs = (spec["id"], spec.get("kwargs", {})) if isinstance(spec, dict) else spec
        c = make_constraint(cid, kwargs)
        variants = _loose_variants(response) if loose else [response]
        verdicts.append(any(c.check(v) for v in variants))
    return InstructionResult(tuple(verdicts))


def ifeval_reward(response: str, constraints: Sequence[tuple[str, dict] | dict], loose: bool = False) -> float:
    """1.0 when every constraint holds, else 0.0."""
    return 1.0 if evaluate_instructions(response, constraints, loose).all_passed else 0.0
