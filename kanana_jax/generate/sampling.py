"""Token sampling from logits: temperature, top-k and top-p (nucleus) masks, and the sampled tokens' log-probs.

Every parameter may be a Python scalar or a per-row array [B]. Conventions (as in vLLM / HF):
temperature 0 = greedy (argmax); top_k <= 0 = off; top_p >= 1 = off. Top-k keeps exactly k tokens (ties at
the boundary are broken towards the lower token id); top-p keeps the smallest set of most-likely tokens
whose probability (after temperature and top-k) reaches p, always at least the most likely token.

Two implementations of the masks (`method`):
- 'search' (the default): no sort. Each filter is a threshold search on the float32 logits' order-preserving
  uint32 keys, `search_bits` key bits per pass over the row (32 / search_bits passes; each pass counts, or sums
  the probability of, the tokens at or above 2^search_bits - 1 candidate thresholds, as sibling row
  reductions). The k-th largest key (top-k), and the key of the token whose higher-ranked tokens first hold
  >= p (top-p), are found exactly, for any per-row k or p; only when a boundary value is tied and must be cut,
  a second search over token ids finds the cut (lower ids kept), under a `lax.cond` that skips it when no row
  needs it.
- 'sort': argsort of the whole vocabulary, masks in sorted order, scattered back (the first version; the
  test oracle). Top-k masks are identical; top-p masks are identical except where p lies within float32
  rounding of a cumulative probability (the two sum the same probabilities in different orders: on the H200
  at [256, 128256] with p = 0.95, 5 of 32.8M mask entries differed).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -jnp.inf
METHODS = ("search", "sort")
SEARCH_BITS = 2   # key bits per pass: the fastest of 2 / 4 measured on the H200 (BENCHMARKS.md, sampler section)


def _rows(value, B: int, dtype):
    """A scalar or [B] parameter as an array [B, 1]."""
    return jnp.broadcast_to(jnp.asarray(value, dtype), (B,))[:, None]


# ---- 'sort': the reference -------------------------------------------------------------------------------------

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


def _keep_sorted(scaled_BxV, top_k, top_p, use_k: bool, use_p: bool):
    """Boolean [B,V] in token order: the top-k then top-p mask through a full sort."""
    B, V = scaled_BxV.shape
    order, sorted_logits = _sorted_desc(scaled_BxV)
    keep_sorted = _keep_top_k_sorted(B, V, top_k) if use_k else jnp.ones((B, V), bool)
    if use_p:
        keep_sorted &= _keep_top_p_sorted(jnp.where(keep_sorted, sorted_logits, NEG_INF), top_p)
    return _unsort(keep_sorted, order)


# ---- 'search': threshold searches, no sort ----------------------------------------------------------------------

def _order_keys(x_BxV):
    """uint32 [B,V] keys ordered as the float32 values (-0.0 == 0.0, -inf lowest)."""
    bits = lax.bitcast_convert_type(jnp.where(x_BxV == 0, 0.0, x_BxV), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _key_value(key_B):
    """The float32 value of an order key [B] (inverse of _order_keys)."""
    bits = jnp.where(key_B >> 31 == 1, key_B & jnp.uint32(0x7FFFFFFF), ~key_B)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _sum_at_or_above(w_BxV, key_BxV, thresholds_BxJ):
    """[B,J]: sum over each row of w where key >= each of its J thresholds (J sibling row reductions of the same
    operands; one reduction of a [B,V,J] comparison measured slower on the H200)."""
    count = w_BxV.dtype == jnp.bool_
    sums = []
    for j in range(thresholds_BxJ.shape[1]):
        at_or_above = key_BxV >= thresholds_BxJ[:, j:j + 1]
        sums.append(jnp.sum(at_or_above & w_BxV, axis=-1, dtype=jnp.int32) if count
                    else jnp.sum(jnp.where(at_or_above, w_BxV, 0.0), axis=-1))
    return jnp.stack(sums, axis=-1)


def _radix_max(holds, B: int, n_bits: int, bits: int):
    """uint32 [B]: per row the largest c < 2^n_bits with holds(c) true, for holds(c_BxJ) -> bool [B,J] monotone
    (true up to the answer, false above) and true at 0; `bits` bits of c per pass, from the top."""
    digits_J = jnp.arange(1, 2 ** bits, dtype=jnp.uint32)
    prefix_B = jnp.zeros((B,), jnp.uint32)
    for shift in range(-(-n_bits // bits) * bits - bits, -1, -bits):
        candidates_BxJ = prefix_B[:, None] | (digits_J[None, :] << shift)
        digit_B = jnp.sum(holds(candidates_BxJ), axis=-1, dtype=jnp.uint32)   # monotone: the count is the digit
        prefix_B = prefix_B | (digit_B << shift)
    return prefix_B


def _cut_ties(keep_BxV, tie_BxV, n_keep_B, bits: int):
    """keep with each row's tied tokens beyond its n_keep lowest ids dropped (n_keep >= the row's ties: no cut)."""
    B, V = keep_BxV.shape
    n_tie_B = jnp.sum(tie_BxV, axis=-1, dtype=jnp.int32)
    cut_B = n_keep_B < n_tie_B

    def cut(keep_BxV):
        ids_BxV = jnp.broadcast_to(jnp.arange(V, dtype=jnp.uint32)[None, :], (B, V))
        # the largest id c with fewer than n_keep ties below it = the id of the n_keep-th tie
        last_B = _radix_max(lambda c: (n_tie_B[:, None] - _sum_at_or_above(tie_BxV, ids_BxV, c))
                            < n_keep_B[:, None], B, max(V - 1, 1).bit_length(), bits)
        drop_BxV = tie_BxV & cut_B[:, None] & (ids_BxV > last_B[:, None])
        return keep_BxV & ~drop_BxV

    return lax.cond(jnp.any(cut_B), cut, lambda keep_BxV: keep_BxV, keep_BxV)


def _keep_top_k_search(key_BxV, top_k, bits: int):
    """Boolean [B,V]: the k highest keys per row, ties at the k-th broken towards the lower id."""
    B, V = key_BxV.shape
    k_B = _rows(top_k, B, jnp.int32)[:, 0]
    on_B = (k_B > 0) & (k_B < V)
    k_B = jnp.where(on_B, k_B, 1)
    ones = jnp.ones((B, V), bool)
    kth_B = _radix_max(lambda c: _sum_at_or_above(ones, key_BxV, c) >= k_B[:, None], B, 32, bits)
    above_BxV = key_BxV > kth_B[:, None]
    n_above_B = jnp.sum(above_BxV, axis=-1, dtype=jnp.int32)
    keep_BxV = _cut_ties(key_BxV >= kth_B[:, None], key_BxV == kth_B[:, None], k_B - n_above_B, bits)
    return keep_BxV | ~on_B[:, None]


def _keep_top_p_search(x_BxV, key_BxV, keep_BxV, top_p, bits: int):
    """Boolean [B,V] within keep: tokens whose higher-ranked kept tokens hold probability < p (softmax over keep)."""
    B, V = x_BxV.shape
    p_B = _rows(top_p, B, jnp.float32)[:, 0]
    on_B = p_B < 1.0
    p_B = jnp.maximum(p_B, jnp.finfo(jnp.float32).tiny)   # p <= 0 keeps the top token, as p -> 0 does
    m_B = jnp.max(jnp.where(keep_BxV, x_BxV, NEG_INF), axis=-1)
    w_BxV = jnp.where(keep_BxV, jnp.exp(x_BxV - m_B[:, None]), 0.0)
    z_B = jnp.sum(w_BxV, axis=-1)
    probs_BxV = w_BxV / z_B[:, None]
    # the boundary: the largest key whose tokens at or above it hold >= p (0: the whole row holds < p, keep all)
    edge_B = _radix_max(lambda c: _sum_at_or_above(probs_BxV, key_BxV, c) >= p_B[:, None], B, 32, bits)
    above_BxV = keep_BxV & (key_BxV > edge_B[:, None])
    tie_BxV = keep_BxV & (key_BxV == edge_B[:, None])
    mass_above_B = jnp.sum(jnp.where(above_BxV, probs_BxV, 0.0), axis=-1)
    q_B = jnp.exp(_key_value(edge_B) - m_B) / z_B          # the probability of each tied boundary token
    # tie j (by id) is kept while mass_above + j q < p: the first ceil((p - mass_above) / q) of them, at least 1
    n_keep_B = jnp.clip(jnp.ceil((p_B - mass_above_B) / q_B), 1, V).astype(jnp.int32)
    n_keep_B = jnp.where(edge_B == 0, V, n_keep_B)
    keep_p_BxV = _cut_ties(above_BxV | tie_BxV, tie_BxV, n_keep_B, bits)
    return keep_BxV & (keep_p_BxV | ~on_B[:, None])


def _keep_search(scaled_BxV, top_k, top_p, use_k: bool, use_p: bool, bits: int):
    """Boolean [B,V] in token order: the top-k then top-p mask through threshold searches."""
    if 32 % bits:
        raise ValueError(f"search_bits={bits} must divide 32 (1, 2, 4, 8 or 16)")
    key_BxV = _order_keys(scaled_BxV)
    keep_BxV = _keep_top_k_search(key_BxV, top_k, bits) if use_k else jnp.ones(scaled_BxV.shape, bool)
    if use_p:
        keep_BxV = _keep_top_p_search(scaled_BxV, key_BxV, keep_BxV, top_p, bits)
    return keep_BxV


# ---- public ----------------------------------------------------------------------------------------------------

def _keep(scaled_BxV, top_k, top_p, use_k: bool, use_p: bool, method: str, search_bits: int):
    if method == "search":
        return _keep_search(scaled_BxV, top_k, top_p, use_k, use_p, search_bits)
    if method == "sort":
        return _keep_sorted(scaled_BxV, top_k, top_p, use_k, use_p)
    raise ValueError(f"sampling method={method!r}; allowed values: {', '.join(METHODS)}")


def top_k_mask(logits_BxV, top_k, *, method: str = "search", search_bits: int = SEARCH_BITS):
    """Boolean [B,V]: the k highest logits of each row (all when k <= 0 or k >= V)."""
    return _keep(logits_BxV.astype(jnp.float32), top_k, 1.0, True, False, method, search_bits)


def top_p_mask(logits_BxV, top_p, *, method: str = "search", search_bits: int = SEARCH_BITS):
    """Boolean [B,V]: the nucleus of softmax(logits) for probability p (p >= 1: all tokens)."""
    return _keep(logits_BxV.astype(jnp.float32), 0, top_p, False, True, method, search_bits)


def filter_logits(logits_BxV, *, temperature=1.0, top_k=0, top_p=1.0, method: str = "search",
                  search_bits: int = SEARCH_BITS):
    """Logits divided by the temperature (greedy rows: unscaled) with top-k then top-p exclusions set to -inf."""
    B, V = logits_BxV.shape
    t = _rows(temperature, B, jnp.float32)
    scaled = logits_BxV.astype(jnp.float32) / jnp.where(t > 0, t, 1.0)
    use_k = not (isinstance(top_k, int) and (top_k <= 0 or top_k >= V))
    use_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
    if not (use_k or use_p):
        return scaled
    return jnp.where(_keep(scaled, top_k, top_p, use_k, use_p, method, search_bits), scaled, NEG_INF)


def sample(logits_BxV, key, *, temperature=1.0, top_k=0, top_p=1.0, valid_vocab: int | None = None,
           method: str = "search", search_bits: int = SEARCH_BITS):
    """Draws one token per row -> (tokens[B] int32, model log-prob[B], sampling log-prob[B]).

    The model log-prob is log softmax(logits) of the token (temperature 1, no masks), what RL ratios and answer
    confidences use; the sampling log-prob is under the filtered distribution actually sampled (0 for greedy).
    `valid_vocab` excludes ids >= it (a model vocabulary padded beyond the tokenizer's) from sampling and argmax.
    `method` / `search_bits`: how the top-k / top-p masks are computed (module docstring).
    """
    B, V = logits_BxV.shape
    logits_BxV = logits_BxV.astype(jnp.float32)
    allowed = logits_BxV
    if valid_vocab is not None and valid_vocab < V:
        allowed = jnp.where(jnp.arange(V)[None, :] < valid_vocab, logits_BxV, NEG_INF)
    filtered = filter_logits(allowed, temperature=temperature, top_k=top_k, top_p=top_p, method=method,
                             search_bits=search_bits)
    greedy_B = _rows(temperature, B, jnp.float32)[:, 0] <= 0
    drawn = jax.random.categorical(key, filtered, axis=-1)
    tokens_B = jnp.where(greedy_B, jnp.argmax(allowed, axis=-1), drawn).astype(jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, tokens_B[:, None], axis=-1)[:, 0]  # noqa: E731
    model_lp = pick(jax.nn.log_softmax(logits_BxV, axis=-1))
    sample_lp = jnp.where(greedy_B, 0.0, pick(jax.nn.log_softmax(filtered, axis=-1)))
    return tokens_B, model_lp, sample_lp
