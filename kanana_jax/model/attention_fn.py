"""The one attention entry point of the model: reference (pure jnp) or the Pallas flash-attention kernel."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(T: int, S: int, segment_ids_BxT, causal: bool):
    """Boolean visibility [B or 1, 1, T, S]: causal (query t sees keys <= t, aligned at the end) and same segment."""
    mask = jnp.ones((1, 1, T, S), bool)
    if causal:
        q_pos = jnp.arange(T)[:, None] + (S - T)
        mask = mask & (jnp.arange(S)[None, :] <= q_pos)[None, None]
    if segment_ids_BxT is not None:
        same = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        mask = mask & same[:, None]
    return mask


def reference_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxDv, *, segment_ids_BxT=None, causal=True,
                        sm_scale=None, logit_soft_cap=None):
    """Softmax attention in float32; returns (out[B,T,H,Dv], max_logits[B,H,T] of scaled logits before soft-cap)."""
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    if H % K:
        raise ValueError(f"query heads H={H} must be a multiple of key/value heads KVH={K}")
    G = H // K
    scale = D ** -0.5 if sm_scale is None else sm_scale
    q = q_BxTxHxD.reshape(B, T, K, G, D)
    logits_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxD, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(T, S, segment_ids_BxT, causal)[:, :, None]  # [B,1,1,T,S]
    max_logits = jnp.max(jnp.where(mask, logits_BxKxGxTxS, -jnp.inf), axis=-1)
    if logit_soft_cap is not None:
        logits_BxKxGxTxS = logit_soft_cap * jnp.tanh(logits_BxKxGxTxS / logit_soft_cap)
    logits_BxKxGxTxS = jnp.where(mask, logits_BxKxGxTxS, -1e30)
    probs = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v_BxSxKxDv.dtype), v_BxSxKxDv,
                     preferred_element_type=jnp.float32)
    out_BxTxHxDv = out.reshape(B, T, H, v_BxSxKxDv.shape[-1]).astype(q_BxTxHxD.dtype)
    return out_BxTxHxDv, jax.lax.stop_gradient(max_logits.reshape(B, H, T))


def attend(q_BxTxHxD, k_BxSxKxD, v_BxSxKxDv, *, segment_ids_BxT=None, causal=True, sm_scale=None,
           logit_soft_cap=None, impl="reference"):
    """Causal (optionally soft-capped, segmented) attention -> (out[B,T,H,Dv], max_logits[B,H,T] float32)."""
    if impl == "reference":
        return reference_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxDv, segment_ids_BxT=segment_ids_BxT,
                                   causal=causal, sm_scale=sm_scale, logit_soft_cap=logit_soft_cap)
    if impl == "kernel":
        from pallas_kernels.attention import flash_attention
        return flash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxDv, causal=causal, sm_scale=sm_scale,
                               logit_soft_cap=logit_soft_cap, segment_ids=segment_ids_BxT, return_max_logits=True)
    raise ValueError(f"model.attention_impl={impl!r}; allowed values: 'reference', 'kernel'")
