"""Which optimizer trains each parameter, and how Muon sees each parameter as a batch of matrices.

Paths are leaf keys joined by '/', e.g. 'moe_layers/moe/experts/w_up' (a leading 'params/' is
ignored). Rules are ordered (regex, label) pairs; the first `re.search` hit wins. Labels:
'muon' (orthogonalized update), 'adamw' (element-wise), 'frozen' (zero update).
"""
from __future__ import annotations

import re
from typing import Iterable, NamedTuple, Sequence

import jax

LABELS = ("muon", "adamw", "frozen")

# Muon for hidden matrices; AdamW for embeddings, LM head, norms, biases and the router kernel;
# the aux-loss-free balancing bias is updated by its own rule in the train step, never by the optimizer.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|/)router/bias$", "frozen"),
    (r"(^|/)embed/", "adamw"),
    (r"(^|/)lm_head/", "adamw"),
    (r"(^|/)(reward_head|value_head)/", "adamw"),   # scalar heads [D, 1] (model/heads.py): never Muon
    (r"norm[^/]*/scale$", "adamw"),
    (r"(^|/)router/kernel$", "adamw"),
    (r"(^|/)bias$", "adamw"),
    (r".", "muon"),
)


class MatrixAxes(NamedTuple):
    """Axes (negative = from the end) that form a matrix's fan-in and fan-out; all other axes are batch."""
    fan_in: tuple[int, ...]
    fan_out: tuple[int, ...]


# Projections with explicit head axes: [..., in, H, Dh] (queries, keys/values) and [..., H, Dv, out].
_HEADS_OUT = re.compile(r"(^|/)(wq|wq_b|wkv_b|wk|wv)$")
_HEADS_IN = re.compile(r"(^|/)wo$")


def path_str(path) -> str:
    """'moe_layers/moe/router/bias' from a jax key path (a leading 'params' is dropped)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if names and names[0] == "params":
        names = names[1:]
    return "/".join(names)


def validate_rules(rules: Iterable[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """Compiled-checked ((regex, label), ...); raises naming the bad rule."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"partition rule {rule!r} must be a (regex, label) pair")
        pattern, label = rule
        if label not in LABELS:
            raise ValueError(f"partition rule {rule!r}: label {label!r} is not one of {LABELS}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"partition rule {rule!r}: bad regex ({e})") from None
        out.append((pattern, label))
    return tuple(out)


def label_for(path: str, rules: Sequence[tuple[str, str]] = DEFAULT_RULES) -> str:
    for pattern, label in rules:
        if re.search(pattern, path):
            return label
    raise ValueError(f"no partition rule matches parameter {path!r}; add a catch-all rule ('.', 'adamw')")


def labels(params, rules: Sequence[tuple[str, str]] = DEFAULT_RULES):
    """Tree of 'muon' | 'adamw' | 'frozen' with the structure of params."""
    rules = validate_rules(rules)
    return jax.tree_util.tree_map_with_path(lambda p, _: label_for(path_str(p), rules), params)


def matrix_axes(path: str, ndim: int, per_head: bool = False) -> MatrixAxes:
    """Fan-in/fan-out axes of a Muon parameter from its name; leading layer/expert axes are batch.

    per_head=True makes the head axis a batch axis, so each head's projection is orthogonalized alone.
    """
    if _HEADS_OUT.search(path) and ndim >= 3:
        return MatrixAxes((-3,), (-1,)) if per_head else MatrixAxes((-3,), (-2, -1))
    if _HEADS_IN.search(path) and ndim >= 3:
        return MatrixAxes((-2,), (-1,)) if per_head else MatrixAxes((-3, -2), (-1,))
    if ndim < 2:
        raise ValueError(f"parameter {path!r} has {ndim} dims; Muon needs a matrix. Label it 'adamw' with a "
                         "partition rule (optimizer.partition_rules)")
    return MatrixAxes((-2,), (-1,))
