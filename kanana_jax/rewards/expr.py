"""Safe arithmetic evaluator: exact `Fraction` results where possible, never Python `eval`.

Grammar (precedence low to high): `+ -`, `* / //` and implicit multiplication before a
name or `(` (`2pi`, `3sqrt(2)`, `(1+2)(3)`), unary `+ -`, right-associative `^`/`**`,
postfix `!` (factorial) and `%` (percent: divides by 100). Names: constants `pi`, `e`;
functions `sqrt`, `cbrt`, `abs`, `floor`, `ceil`, `round`, `min`, `max`, `exp`, `ln`,
`log` (base 10, or `log(x, b)`), `log2`, `log10`, `sin`, `cos`, `tan`. Results are
`Fraction` while every step is exact (roots of perfect powers included), else `float`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction
from typing import Callable, Union

Number = Union[Fraction, float]

MAX_BITS = 4096  # largest numerator/denominator an exact result may carry
MAX_DEPTH = 100  # nesting limit for parentheses and unary chains
MAX_LENGTH = 2000  # characters


class ExprError(ValueError):
    """The expression is malformed, unsafe (too large) or undefined (division by zero)."""


@dataclasses.dataclass(frozen=True)
class _Tok:
    kind: str  # 'num', 'name', 'op', 'end'
    text: str


_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<op>\*\*|//|[-+*/^()!%,]))"
)
_UNICODE = {"×": "*", "·": "*", "÷": "/", "−": "-", "–": "-", "π": "pi", "√": " sqrt ", "²": "^2",
            "³": "^3", "（": "(", "）": ")"}


def _tokenize(text: str) -> list[_Tok]:
    """Split `text` into number, name and operator tokens; raises ExprError on anything else."""
    for src, dst in _UNICODE.items():
        text = text.replace(src, dst)
    toks, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None or m.end() == pos:
            raise ExprError(f"unexpected character {text[pos:].lstrip()[:1]!r} at position {pos} in {text!r}")
        kind = m.lastgroup
        toks.append(_Tok(kind, m.group(kind)))
        pos = m.end()
    toks.append(_Tok("end", ""))
    return toks


def _check_size(x: Number) -> Number:
    if isinstance(x, Fraction):
        if x.numerator.bit_length() > MAX_BITS or x.denominator.bit_length() > MAX_BITS:
            raise ExprError(f"exact result exceeds {MAX_BITS} bits; the expression is too large to evaluate")
        return x
    if math.isnan(x) or math.isinf(x):
        raise ExprError("result is not a finite number")
    return x


def _int_root(n: int, k: int) -> int | None:
    """Exact integer k-th root of n >= 0, or None when n is not a perfect k-th power."""
    if n < 2:
        return n
    r = 1 << ((n.bit_length() + k - 1) // k)  # >= the root, so Newton descends monotonically
    for _ in range(10_000):
        nr = ((k - 1) * r + n // r ** (k - 1)) // k
        if nr >= r:
            break
        r = nr
    for cand in (r - 1, r, r + 1):
        if cand >= 0 and cand ** k == n:
            return cand
    return None


def power(base: Number, exp: Number) -> Number:
    """`base ** exp`, exact for rational base with integer exponent or a perfect-power root."""
    if isinstance(base, Fraction) and isinstance(exp, Fraction):
        if exp.denominator == 1:
            n = exp.numerator
            if base == 0 and n < 0:
                raise ExprError("0 raised to a negative power is undefined")
            bits = max(base.numerator.bit_length(), base.denominator.bit_length())
            if abs(n) * max(bits, 1) > MAX_BITS:
                raise ExprError(f"{base}^{n} exceeds {MAX_BITS} bits; the expression is too large to evaluate")
            return base ** n
        q = exp.denominator
        if q <= 64 and base >= 0:
            num, den = _int_root(base.numerator, q), _int_root(base.denominator, q)
            if num is not None and den is not None:
                return power(Fraction(num, den), Fraction(exp.numerator))
        if base < 0:
            if q % 2 == 1:  # odd root of a negative number: (-b)^(p/q) = (-1)^p * b^(p/q)
                mag = power(-base, exp)
                return -mag if exp.numerator % 2 else mag
            raise ExprError(f"even root of the negative number {base} is not real")
    try:
        return _check_size(float(base) ** float(exp))
    except (OverflowError, ZeroDivisionError) as err:
        raise ExprError(f"{base}^{exp} cannot be evaluated: {err}") from None


def _factorial(x: Number) -> Number:
    if not (isinstance(x, Fraction) and x.denominator == 1 and 0 <= x <= 300):
        raise ExprError(f"factorial needs an integer in [0, 300], got {x}")
    return Fraction(math.factorial(int(x)))


def _round(x: Number, ndigits: Number = Fraction(0)) -> Number:
    if not (isinstance(ndigits, Fraction) and ndigits.denominator == 1):
        raise ExprError(f"round() digits must be an integer, got {ndigits}")
    if isinstance(x, Fraction):
        return Fraction(round(x, int(ndigits)))
    return round(x, int(ndigits))


def _log(x: Number, base: Number = Fraction(10)) -> Number:
    if x <= 0 or base <= 0 or base == 1:
        raise ExprError(f"log({x}, {base}) is undefined")
    return math.log(float(x)) / math.log(float(base))


def _ln(x: Number) -> Number:
    if x <= 0:
        raise ExprError(f"ln({x}) is undefined")
    return math.log(float(x))


def _float_fn(fn: Callable[[float], float]) -> Callable[[Number], Number]:
    return lambda x: fn(float(x))


def _exact_or_float(exact: Callable[[Fraction], Fraction], approx: Callable[[float], float]):
    return lambda x: exact(x) if isinstance(x, Fraction) else approx(x)


FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {  # name -> (fn, min args, max args)
    "sqrt": (lambda x: power(x, Fraction(1, 2)), 1, 1),
    "cbrt": (lambda x: power(x, Fraction(1, 3)), 1, 1),
    "abs": (abs, 1, 1),
    "floor": (_exact_or_float(lambda x: Fraction(math.floor(x)), math.floor), 1, 1),
    "ceil": (_exact_or_float(lambda x: Fraction(math.ceil(x)), math.ceil), 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 1, 64),
    "max": (max, 1, 64),
    "exp": (_float_fn(math.exp), 1, 1),
    "ln": (_ln, 1, 1),
    "log": (_log, 1, 2),
    "log10": (_log, 1, 1),
    "log2": (lambda x: _log(x, Fraction(2)), 1, 1),
    "sin": (_float_fn(math.sin), 1, 1),
    "cos": (_float_fn(math.cos), 1, 1),
    "tan": (_float_fn(math.tan), 1, 1),
}
CONSTANTS: dict[str, Number] = {"pi": math.pi, "e": math.e}


class _Parser:
    """Recursive-descent parser that evaluates while it parses."""

    def __init__(self, toks: list[_Tok]):
        self.toks, self.i, self.depth = toks, 0, 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text:
            raise ExprError(f"expected {text!r} but found {tok.text or 'end of input'!r}")

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExprError(f"expression nests deeper than {MAX_DEPTH} levels")

    def expr(self) -> Number:
        val = self.term()
        while self.peek().text in ("+", "-"):
            op = self.take().text
            rhs = self.term()
            val = _check_size(val + rhs if op == "+" else val - rhs)
        return val

    def term(self) -> Number:
        val = self.unary()
        while True:
            tok = self.peek()
            if tok.text in ("*", "/", "//"):
                self.take()
                rhs = self.unary()
                if tok.text == "*":
                    val = val * rhs
                elif rhs == 0:
                    raise ExprError("division by zero")
                elif tok.text == "/":
                    val = val / rhs
                else:
                    val = val // rhs
                    val = Fraction(val) if isinstance(val, int) else val
            elif tok.kind == "name" or tok.text == "(":  # implicit multiplication
                val = val * self.unary()
            else:
                return val
            val = _check_size(val)

    def unary(self) -> Number:
        if self.peek().text in ("+", "-"):
            op = self.take().text
            self.enter()
            val = self.unary()
            self.depth -= 1
            return -val if op == "-" else val
        return self.power()

    def power(self) -> Number:
        base = self.postfix()
        if self.peek().text in ("^", "**"):
            self.take()
            self.enter()
            exp = self.unary()  # right-associative, allows 2^-1
            self.depth -= 1
            return power(base, exp)
        return base

    def postfix(self) -> Number:
        val = self.atom()
        while self.peek().text in ("!", "%"):
            val = _factorial(val) if self.take().text == "!" else val / 100
        return val

    def atom(self) -> Number:
        tok = self.take()
        if tok.kind == "num":
            return _check_size(Fraction(tok.text))
        if tok.text == "(":
            self.enter()
            val = self.expr()
            self.expect(")")
            self.depth -= 1
            return val
        if tok.kind == "name":
            name = tok.text.lower()
            if name in CONSTANTS:
                return CONSTANTS[name]
            if name in FUNCTIONS:
                return self.call(name)
            raise ExprError(f"unknown name {tok.text!r}; known: {sorted(CONSTANTS) + sorted(FUNCTIONS)}")
        raise ExprError(f"unexpected {tok.text or 'end of input'!r}")

    def call(self, name: str) -> Number:
        fn, lo, hi = FUNCTIONS[name]
        if self.peek().text != "(":  # `sqrt 2`, `√2`: apply to the next power-level operand
            self.enter()
            args = [self.power()]
            self.depth -= 1
        else:
            self.take()
            self.enter()
            args = [self.expr()]
            while self.peek().text == ",":
                self.take()
                args.append(self.expr())
            self.expect(")")
            self.depth -= 1
        if not lo <= len(args) <= hi:
            raise ExprError(f"{name}() takes {lo}..{hi} arguments, got {len(args)}")
        try:
            out = fn(*args)
        except (ValueError, OverflowError, ZeroDivisionError) as err:
            if isinstance(err, ExprError):
                raise
            raise ExprError(f"{name}{tuple(args)} failed: {err}") from None
        return _check_size(Fraction(out) if isinstance(out, int) else out)


def evaluate(text: str) -> Number:
    """Evaluate an arithmetic expression string to an exact Fraction (or a float when irrational)."""
    if not isinstance(text, str):
        raise ExprError(f"expression must be a str, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ExprError(f"expression longer than {MAX_LENGTH} characters")
    parser = _Parser(_tokenize(text))
    if parser.peek().kind == "end":
        raise ExprError("empty expression")
    val = parser.expr()
    if parser.peek().kind != "end":
        raise ExprError(f"unexpected {parser.peek().text!r} after a complete expression in {text!r}")
    return val


def format_number(x: Number, max_decimals: int = 10) -> str:
    """Render an evaluator result: integers plainly, other fractions as a/b, floats rounded."""
    if isinstance(x, Fraction):
        return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"
    if float(x).is_integer() and abs(x) < 1e15:
        return str(int(x))
    return f"{x:.{max_decimals}g}"


def numbers_equal(a: Number, b: Number, rel_tol: float = 1e-9) -> bool:
    """Exact equality for two Fractions; relative tolerance once either side is a float."""
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=1e-12)
    except OverflowError:
        return False
