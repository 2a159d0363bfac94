"""Fused top-k router (DeepSeek-V3 semantics) and the dispatch metadata that permute/combine use.

scores = softmax|sigmoid(logits in fp32); choice = scores + bias (selection only); with n_group > 1 only the
topk_group best groups are eligible (group score: sum of its top-2 choices for sigmoid, max for softmax);
weights = the unbiased scores of the chosen experts, optionally normalized, times routed_scaling_factor.
Same semantics as kanana_jax.model.moe.route. Written in jnp: XLA fuses it (see BENCHMARKS.md, MoE).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

SCORES = ("softmax", "sigmoid")


class Routing(NamedTuple):
    """Router output. M = T*k token copies, sorted by expert (stable in t*k+j); slot_TxK[t,j] is copy (t,j)'s row."""

    expert_ids_TxK: jax.Array  # int32
    weights_TxK: jax.Array  # float32, differentiable w.r.t. the router logits
    scores_TxE: jax.Array  # float32 unbiased scores (for balance losses)
    group_sizes_E: jax.Array  # int32, rows per expert in sorted order
    order_M: jax.Array  # int32, flat copy index t*k+j of each sorted row
    token_M: jax.Array  # int32, token of each sorted row
    slot_TxK: jax.Array  # int32, sorted row of each copy


def select_experts(logits_TxE, bias_E, *, k, score, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """(expert_ids[T,k] int32, weights[T,k] f32, scores[T,E] f32) from router logits."""
    if score not in SCORES:
        raise ValueError(f"score={score!r}; allowed values: {SCORES}")
    t, e = logits_TxE.shape
    if n_group < 1 or e % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"n_group={n_group}, topk_group={topk_group}: n_group must divide E={e} and "
                         f"1 <= topk_group <= n_group")
    if not 1 <= k <= e:
        raise ValueError(f"k={k} must be in [1, E={e}]")
    logits_TxE = logits_TxE.astype(jnp.float32)
    scores_TxE = jax.nn.sigmoid(logits_TxE) if score == "sigmoid" else jax.nn.softmax(logits_TxE, axis=-1)
    choice_TxE = jax.lax.stop_gradient(scores_TxE)
    if bias_E is not None:
        choice_TxE = choice_TxE + bias_E.astype(jnp.float32)
    if n_group > 1:
        per = e // n_group
        grouped = choice_TxE.reshape(t, n_group, per)
        if score == "sigmoid" and per >= 2:
            group_score_TxG = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        else:
            group_score_TxG = jnp.max(grouped, axis=-1)
        _, top_groups = jax.lax.top_k(group_score_TxG, topk_group)
        keep_TxG = jnp.any(top_groups[:, :, None] == jnp.arange(n_group)[None, None, :], axis=1)
        choice_TxE = jnp.where(jnp.repeat(keep_TxG, per, axis=1), choice_TxE, -jnp.inf)
    _, expert_ids_TxK = jax.lax.top_k(choice_TxE, k)
    weights_TxK = jnp.take_along_axis(scores_TxE, expert_ids_TxK, axis=-1)
    if norm_topk_prob:
        weights_TxK = weights_TxK / (jnp.sum(weights_TxK, axis=-1, keepdims=True) + 1e-20)
    return expert_ids_TxK.astype(jnp.int32), weights_TxK * routed_scaling_factor, scores_TxE


def dispatch_metadata(expert_ids_TxK, num_experts: int):
    """(group_sizes[E], order[M], token[M], slot[T,k]) that sort the T*k token copies by expert, stably."""
    t, k = expert_ids_TxK.shape
    flat_M = expert_ids_TxK.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
    slot_M = jnp.zeros((t * k,), jnp.int32).at[order_M].set(jnp.arange(t * k, dtype=jnp.int32), unique_indices=True)
    group_sizes_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
    return group_sizes_E, order_M, order_M // k, slot_M.reshape(t, k)


def route(x_or_logits, w_router=None, bias_E=None, *, k: int, score: str = "softmax", n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0) -> Routing:
    """Route tokens: logits[T,E], or x[T,D] with w_router[D,E] (multiplied in fp32) -> Routing."""
    if w_router is None:
        logits_TxE = x_or_logits
    else:
        logits_TxE = jnp.dot(x_or_logits.astype(jnp.float32), w_router.astype(jnp.float32))
    expert_ids, weights, scores = select_experts(
        logits_TxE, bias_E, k=k, score=score, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
    group_sizes, order, token, slot = dispatch_metadata(expert_ids, logits_TxE.shape[1])
    return Routing(expert_ids, weights, scores, group_sizes, order, token, slot)
