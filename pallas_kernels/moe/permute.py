"""Token permutation into expert order and the weighted combine back, with gather-only backward passes.

impl='gather' (default): forward and backward are gathers (the routing is a permutation, so every scatter-add
has a gather form); impl='xla': plain indexing, whose autodiff emits scatter-adds. BENCHMARKS.md (MoE) records
which is faster on the H200.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.moe.router import Routing

IMPLS = ("gather", "xla")


@jax.custom_vjp
def _permute(x_TxD, token_M, slot_TxK):
    return x_TxD[token_M]


def _permute_fwd(x_TxD, token_M, slot_TxK):
    return x_TxD[token_M], (token_M, slot_TxK)


def _permute_bwd(res, dxs_MxD):
    token_M, slot_TxK = res
    dx_TxD = jnp.sum(dxs_MxD[slot_TxK].astype(jnp.float32), axis=1).astype(dxs_MxD.dtype)
    return dx_TxD, None, None


_permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def _combine(y_MxD, weights_TxK, order_M, token_M, slot_TxK):
    return _combine_fwd(y_MxD, weights_TxK, order_M, token_M, slot_TxK)[0]


def _combine_fwd(y_MxD, weights_TxK, order_M, token_M, slot_TxK):
    y_TxKxD = y_MxD[slot_TxK].astype(jnp.float32)
    out = jnp.einsum("tkd,tk->td", y_TxKxD, weights_TxK.astype(jnp.float32)).astype(y_MxD.dtype)
    return out, (y_MxD, weights_TxK, order_M, token_M, slot_TxK)


def _combine_bwd(res, dout_TxD):
    y_MxD, weights_TxK, order_M, token_M, slot_TxK = res
    w_M = weights_TxK.reshape(-1)[order_M].astype(jnp.float32)
    dy_MxD = (dout_TxD[token_M].astype(jnp.float32) * w_M[:, None]).astype(y_MxD.dtype)
    dw_TxK = jnp.einsum("tkd,td->tk", y_MxD[slot_TxK].astype(jnp.float32), dout_TxD.astype(jnp.float32))
    return dy_MxD, dw_TxK.astype(weights_TxK.dtype), None, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def permute(x_TxD, routing: Routing, *, impl: str = "gather"):
    """Token rows in expert order: [T,D] -> [M=T*k, D] (row i is token routing.token_M[i])."""
    if impl not in IMPLS:
        raise ValueError(f"permute impl={impl!r}; allowed values: {IMPLS}")
    if impl == "xla":
        return x_TxD[routing.token_M]
    return _permute(x_TxD, routing.token_M, routing.slot_TxK)


def combine(y_MxD, routing: Routing, weights_TxK=None, *, impl: str = "gather"):
    """Weighted sum of each token's k expert rows back to token order: [M,D] -> [T,D] (y's dtype, fp32 sums)."""
    if impl not in IMPLS:
        raise ValueError(f"combine impl={impl!r}; allowed values: {IMPLS}")
    w_TxK = routing.weights_TxK if weights_TxK is None else weights_TxK
    if impl == "xla":
        w_M = w_TxK.reshape(-1)[routing.order_M].astype(jnp.float32)
        t = routing.slot_TxK.shape[0]
        y_MxD_w = y_MxD.astype(jnp.float32) * w_M[:, None]
        out = jnp.zeros((t, y_MxD.shape[1]), jnp.float32).at[routing.token_M].add(y_MxD_w)
        return out.astype(y_MxD.dtype)
    return _combine(y_MxD, w_TxK, routing.order_M, routing.token_M, routing.slot_TxK)
