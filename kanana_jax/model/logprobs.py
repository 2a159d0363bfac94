"""Per-token log-probabilities (and entropies) of targets from the final hidden states, chunked over positions so
that the [B, T, V] float32 logits never exist at once (at vocabulary 128K they are 8 GB per 16K tokens).

    h_BxTxD = model.apply({"params": p}, tokens_BxT, positions, segments, return_hidden=True)
    logp_BxT, entropy_BxT = token_logprobs(h_BxTxD, head_weight(p, cfg.model), targets_BxT)

Each chunk of `chunk` tokens (of the flattened B x T positions) computes its logits [chunk, V] in float32 (`layers.logits_matmul`, the LM
head's own matmul), the log-softmax at the targets and the entropy, inside `jax.checkpoint`: the backward pass
recomputes one chunk's logits at a time. B x T need not be a multiple of `chunk` (the tail is padded, then cut).
`full_token_logprobs` is the unchunked reference (tests).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kanana_jax.config import ModelConfig
from kanana_jax.model.layers import logits_matmul


def head_weight(params, cfg: ModelConfig):
    """The output projection W [D, V] of a Transformer's params (the embedding's transpose when tied)."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def _chunk_stats(h_BxCxD, w_DxV, targets_BxC):
    logits = logits_matmul(h_BxCxD, w_DxV)                              # [B, C, V] float32
    lse_BxC = jax.nn.logsumexp(logits, axis=-1)
    picked_BxC = jnp.take_along_axis(logits, targets_BxC[..., None], axis=-1)[..., 0]
    probs = jnp.exp(logits - lse_BxC[..., None])
    entropy_BxC = lse_BxC - jnp.sum(probs * logits, axis=-1)
    return picked_BxC - lse_BxC, entropy_BxC


def token_logprobs(h_BxTxD, w_DxV, targets_BxT, chunk: int = 2048):
    """(log p(target) [B,T] float32, entropy of the predictive distribution [B,T] float32) per position, `chunk`
    tokens (over the flattened B*T positions) at a time: the logits in flight are [chunk, V] float32."""
    B, T, D = h_BxTxD.shape
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    N = B * T
    c = min(chunk, N)
    n = -(-N // c)
    h_NxD, t_N = h_BxTxD.reshape(N, D), targets_BxT.reshape(N)
    if n * c > N:
        h_NxD = jnp.pad(h_NxD, ((0, n * c - N), (0, 0)))
        t_N = jnp.pad(t_N, (0, n * c - N))
    stats = jax.checkpoint(lambda h, t: _chunk_stats(h[None], w_DxV, t[None]))

    def body(_, xs):
        logp, ent = stats(*xs)
        return None, (logp[0], ent[0])

    _, (logp_KxC, ent_KxC) = jax.lax.scan(body, None, (h_NxD.reshape(n, c, D), t_N.reshape(n, c)))
    unchunk = lambda x: x.reshape(n * c)[:N].reshape(B, T)
    return unchunk(logp_KxC), unchunk(ent_KxC)


def full_token_logprobs(h_BxTxD, w_DxV, targets_BxT):
    """The same from the full [B,T,V] logits (the reference for tests)."""
    return _chunk_stats(h_BxTxD, w_DxV, targets_BxT)


def sequence_logprob(logp_BxT, mask_BxT):
    """Sum of the masked per-token log-probs of each row [B] (a response's log-likelihood)."""
    return jnp.sum(logp_BxT * mask_BxT, axis=-1)
