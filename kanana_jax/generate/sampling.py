"""Token sampling from logits: temperature, top-k and top-p (nucleus) masks, and the sampled tokens' log-probs.

Every parameter may be a Python scalar or a per-row array [B]. Conventions (as in vLLM / HF):
temperature 0 = greedy (argmax); top_k <= 0 = off; top_p >= 1 = off. Top-k keeps exactly k tokens (ties at
the boundary are broken towards the lower token id); top-p keeps the smallest set of most-likely tokens
whose probability (after temperature and top-k) reaches p, always at least the most likely token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def _rows(value, B: int, dtype):
    """A scalar or [B] parameter as an array [B, 1]."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (B,))[:, None]


def _sorted_desc(logits_BxV):
    """(order[B,V] token ids by decreasing logit, ties by lower id; sorted logits[B,V])."""
    order_BxV = jnp.argsort(-logits_BxV, axis=-1, stable=True)
    return order_BxV, jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)


def _unsort(keep_sorted_BxV, order_BxV):
    """Scatters a mask given in sorted order back to token-id order."""
    rows = jnp.arange(order_BxV.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted_BxV).at[rows, order_BxV].set(keep_sorted_BxV)


def _keep_top_k_sorted(B: int, V: int, top_k):
    """Boolean [B,V] in sorted order: the first k ranks (all when k <= 0)."""
    k = _rows(top_k, B, jnp.int32)
    return (jnp.arange(V)[None, :] < k) | (k <= 0)


def _keep_top_p_sorted(sorted_logits_BxV, top_p):
    """Boolean [B,V] in sorted order: ranks whose higher ranks hold probability < p, and always rank 0."""
    B, _ = sorted_logits_BxV.shape
    probs = jax.nn.softmax(sorted_logits_BxV.astype(jnp.float32), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    p = _rows(top_p, B, jnp.float32)
    return ((before < p) | (p >= 1.0)).at[:, 0].set(True)


def top_k_mask(logits_BxV, top_k):
    """Boolean [B,V]: the k highest logits of each row (all when k <= 0 or k >= V)."""
    B, V = logits_BxV.shape
    order, _ = _sorted_desc(logits_BxV)
    return _unsort(_keep_top_k_sorted(B, V, top_k), order)


def top_p_mask(logits_BxV, top_p):
    """Boolean [B,V]: the nucleus of softmax(logits) for probability p (p >= 1: all tokens)."""
    order, sorted_logits = _sorted_desc(logits_BxV)
    return _unsort(_keep_top_p_sorted(sorted_logits, top_p), order)


def filter_logits(logits_BxV, *, temperature=1.0, top_k=0, top_p=1.0):
    """Logits divided by the temperature (greedy rows: unscaled) with top-k then top-p exclusions set to -inf."""
    B, V = logits_BxV.shape
    t = _rows(temperature, B, jnp.float32)
    scaled = logits_BxV.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    use_k = not (isinstance(top_k, int) and (top_k <= 0 or top_k >= V))
    use_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
    if not (use_k or use_p):
        return scaled
    order, sorted_logits = _sorted_desc(scaled)
    keep_sorted = _keep_top_k_sorted(B, V, top_k) if use_k else jnp.ones((B, V), bool)
    if use_p:
        keep_sorted &= _keep_top_p_sorted(jnp.where(keep_sorted, sorted_logits, NEG_INF), top_p)
    return jnp.where(_unsort(keep_sorted, order), scaled, NEG_INF)


def sample(logits_BxV, key, *, temperature=1.0, top_k=0, top_p=1.0, valid_vocab: int | None = None):
    """Draws one token per row -> (tokens[B] int32, model log-prob[B], sampling log-prob[B]).

    The model log-prob is log softmax(logits) of the token (temperature 1, no masks), what RL ratios and answer
    confidences use; the sampling log-prob is under the filtered distribution actually sampled (0 for greedy).
    `valid_vocab` excludes ids >= it (a model vocabulary padded beyond the tokenizer's) from sampling and argmax.
    """
    B, V = logits_BxV.shape
    logits_BxV = logits_BxV.astype(jnp.float32)
    allowed = logits_BxV
    if valid_vocab is not None and valid_vocab < V:
        allowed = jnp.where(jnp.arange(V)[None, :] < valid_vocab, logits_BxV, NEG_INF)
    filtered = filter_logits(allowed, temperature=temperature, top_k=top_k, top_p=top_p)
    greedy_B = _rows(temperature, B, jnp.float32)[:, 0] <= 0
    drawn = jax.random.categorical(key, filtered, axis=-1)
    tokens_B = jnp.where(greedy_B, jnp.argmax(allowed, axis=-1), drawn).astype(jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, tokens_B[:, None], axis=-1)[:, 0]  # noqa: E731
    model_lp = pick(jax.nn.log_softmax(logits_BxV, axis=-1))
    sample_lp = jnp.where(greedy_B, 0.0, pick(jax.nn.log_softmax(filtered, axis=-1)))
    return tokens_B, model_lp, sample_lp
