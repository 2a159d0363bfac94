"""Hyperparameter transfer across width (muP-style), consistent with Muon's update scaling.

Tune at a base width d0, train at width d: r = d / d0 (read from the embedding, `embed/embedding` [V, d]).
Rules (Yang et al. "Tensor Programs V" for AdamW; the spectral condition of Yang, Simon & Bernstein 2023,
||dW||_2 ~ sqrt(fan_out / fan_in), for Muon):

| group                                   | init std x   | learning rate x (AdamW) | learning rate x (Muon group) |
|-----------------------------------------|--------------|-------------------------|------------------------------|
| hidden matrices (label 'muon')          | r^-1/2       | 1/r                     | rms_match: r^-1/2; spectral: 1 |
| readout-like: lm_head, router kernel    | 1/r          | 1/r                     | (AdamW group)                |
| embeddings, norms, biases               | 1            | 1                       | (AdamW group)                |

Why Muon's hidden multiplier is r^-1/2 under rms_match: the orthogonalized update has spectral norm 1 and is
scaled by 0.2 sqrt(max(fan_in, fan_out)), which grows like sqrt(r) when both sides scale with width; the spectral
condition wants it constant for square matrices, so lr ~ r^-1/2. With `spectral` scaling sqrt(max(1, out/in))
(or `none`: spectral norm 1) the update already satisfies it and needs no multiplier. Tied embeddings keep multiplier 1 (input role).
The model initialises every matrix with one `init_std`; `scale_init` applies the init column once at step 0.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import optax

from kanana_jax.optim import partition

_READOUT = re.compile(r"(^|/)(lm_head/kernel|router/kernel)$")
_EMBED = ("embed", "embedding")


def width_of(params) -> int:
    """d_model from params['embed']['embedding'] [V, d] (with or without a top-level 'params')."""
    p = params.get("params", params)
    try:
        return int(p[_EMBED[0]][_EMBED[1]].shape[-1])
    except (KeyError, TypeError):
        raise ValueError("hyperparameter transfer reads the width from params['embed']['embedding'] [V, d]; "
                         "this parameter tree has none") from None


def multipliers(path: str, label: str, r: float, optimizer: str = "muon", scaling: str = "rms_match"):
    """(init std multiplier, learning-rate multiplier) of one parameter at width ratio r."""
    if label == "frozen":
        return 1.0, 1.0
    if _READOUT.search(path):
        return 1.0 / r, 1.0 / r
    if label == "muon":
        if optimizer == "adamw":
            return r ** -0.5, 1.0 / r
        return r ** -0.5, (r ** -0.5 if scaling == "rms_match" else 1.0)
    return 1.0, 1.0                                         # embeddings, norms, biases


def _map(tree, fn, rules):
    rules = partition.validate_rules(rules)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fn(partition.path_str(p), partition.label_for(partition.path_str(p), rules), x), tree)


def scale_init(params, base_width: int, rules: Sequence = partition.DEFAULT_RULES, optimizer: str = "muon"):
    """Params with the init column of the table applied (call once, on freshly initialised params)."""
    if base_width <= 0:
        return params
    r = width_of(params) / base_width
    return _map(params, lambda path, label, x: (x * multipliers(path, label, r, optimizer)[0]).astype(x.dtype),
                rules)


def scale_by_width(base_width: int, rules: Sequence = partition.DEFAULT_RULES, optimizer: str = "muon",
                   scaling: str = "rms_match") -> optax.GradientTransformation:
    """Multiplies each update by its learning-rate multiplier (chain it after the optimizer)."""
    if base_width <= 0:
        raise ValueError(f"mup_base_width must be > 0 to enable transfer, got {base_width}")

    def update_fn(updates, state, params=None):
        r = width_of(params if params is not None else updates) / base_width
        scaled = _map(updates, lambda path, label, u: (u * multipliers(path, label, r, optimizer, scaling)[1]
                                                       ).astype(u.dtype), rules)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def describe(params, base_width: int, rules: Sequence = partition.DEFAULT_RULES, optimizer: str = "muon",
             scaling: str = "rms_match") -> dict:
    """{path: (init multiplier, lr multiplier)} for documentation and tests."""
    r = width_of(params) / base_width
    out = {}
    _map(params, lambda path, label, x: out.__setitem__(path, multipliers(path, label, r, optimizer, scaling))
         or x, rules)
    return out

