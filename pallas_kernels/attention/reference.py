"""Pure-jnp attention: the test oracle for the kernels and the cheap CPU path (one XLA softmax, no loops)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def visibility_mask(T: int, S: int, q_segment_ids_BxT, kv_segment_ids_BxS, causal: bool):
    """Boolean [B or 1, T, S]: query t sees key s if s <= t + (S - T) (causal, aligned at the end) and segments match."""
    mask_1xTxS = jnp.ones((1, T, S), bool)
    if causal:
        q_pos_T = jnp.arange(T) + (S - T)
        mask_1xTxS = mask_1xTxS & (jnp.arange(S)[None, :] <= q_pos_T[:, None])[None]
    if q_segment_ids_BxT is not None:
        same_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
        return mask_1xTxS & same_BxTxS
    return mask_1xTxS


def attention_reference(q_BxTxHxD, k_BxSxKxD, v_BxSxKxDv, *, causal=True, sm_scale=None, logit_soft_cap=None,
                        q_segment_ids_BxT=None, kv_segment_ids_BxS=None):
    """Softmax attention in float32 -> (out[B,T,H,Dv] in q's dtype, max_logits[B,H,T] f32, lse[B,H,T] f32).

    max_logits is the max over visible keys of the scaled logit before soft-capping (-inf for a row that sees no
    key; such a row's output is 0). lse is the natural-log logsumexp of the (soft-capped) logits.
    """
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    G = H // K
    scale = D ** -0.5 if sm_scale is None else sm_scale
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, G, D)
    s_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                             preferred_element_type=jnp.float32) * scale
    mask_Bx1x1xTxS = visibility_mask(T, S, q_segment_ids_BxT, kv_segment_ids_BxS, causal)[:, None, None]
    max_logits = jnp.max(jnp.where(mask_Bx1x1xTxS, s_BxKxGxTxS, -jnp.inf), axis=-1)
    logits = s_BxKxGxTxS if logit_soft_cap is None else logit_soft_cap * jnp.tanh(s_BxKxGxTxS / logit_soft_cap)
    m = jnp.max(jnp.where(mask_Bx1x1xTxS, logits, -jnp.inf), axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    e = jnp.where(mask_Bx1x1xTxS, jnp.exp(logits - m), 0.0)
    l = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(l == 0.0, 1.0, l)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v_BxSxKxDv.astype(jnp.float32))
    out_BxTxHxDv = out.reshape(B, T, H, v_BxSxKxDv.shape[-1]).astype(q_BxTxHxD.dtype)
    lse_BxHxT = (m + jnp.log(l)).reshape(B, H, T)
    return out_BxTxHxDv, jax.lax.stop_gradient(max_logits.reshape(B, H, T)), lse_BxHxT
