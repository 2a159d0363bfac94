"""Pure-jnp oracle of the fused symmetric Gram-plus-affine product used by the Polar Express iteration."""
from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32


def gram_affine(x, c_BxMxM, alpha_B, beta_B, gamma_B, *, transposed: bool = False, out_dtype=None):
    """out[b] = alpha[b] x[b] x[b]^T + beta[b] c[b] + gamma[b] I in out_dtype (default x's); x [B, M, K], or
    [B, K, M] with x^T x when transposed; c [B, M, M] or None.

    fp32 accumulation; alpha x x^T is rounded to out_dtype before the affine part is added in fp32, as a GEMM that
    writes out_dtype would round it (the polar iteration's tested error bounds were set with that rounding).
    """
    out_dtype = out_dtype or x.dtype
    m = x.shape[2] if transposed else x.shape[1]
    gram = jnp.einsum("bki,bkj->bij" if transposed else "bik,bjk->bij", x, x, preferred_element_type=F32)
    col = lambda v: jnp.asarray(v, F32).reshape(-1, 1, 1)
    out = (col(alpha_B) * gram).astype(out_dtype).astype(F32) + col(gamma_B) * jnp.eye(m, dtype=F32)
    if c_BxMxM is not None:
        out = out + col(beta_B) * c_BxMxM.astype(F32)
    return out.astype(out_dtype)
