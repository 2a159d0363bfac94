"""Pure-jnp grouped matmuls: a per-group loop (the test oracle) and a blocked path cheap enough for CPU training.

Convention shared by every backend: lhs rows are sorted by group, group g holding rows
[offsets[g], offsets[g+1]); rows past sum(group_sizes) belong to no group and give zero output rows.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.moe import tiling as tiling_lib


def _rhs_dims(transpose_rhs):
    return (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))


def gmm_reference(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs=False, out_dtype=None):
    """Oracle: loop over groups, out rows of group g = lhs rows @ rhs[g] in fp32. Costs E dense matmuls."""
    out_dtype = out_dtype or lhs_MxK.dtype
    m = lhs_MxK.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    offsets = tiling_lib.group_offsets(group_sizes_E)
    rows_M = jnp.arange(m)

    def body(g, out_MxN):
        y = lax.dot_general(lhs_MxK, rhs[g], _rhs_dims(transpose_rhs), preferred_element_type=jnp.float32)
        mine = (rows_M >= offsets[g]) & (rows_M < offsets[g + 1])
        return out_MxN + jnp.where(mine[:, None], y, 0.0)

    out = lax.fori_loop(0, rhs.shape[0], body, jnp.zeros((m, n), jnp.float32))
    return out.astype(out_dtype)


def tgmm_reference(lhs_KxM, rhs_MxN, group_sizes_E, *, out_dtype=None):
    """Oracle: out[g] = lhs[:, rows of g] @ rhs[rows of g] in fp32, for every group (zeros when empty)."""
    out_dtype = out_dtype or lhs_KxM.dtype
    offsets = tiling_lib.group_offsets(group_sizes_E)
    rows_M = jnp.arange(lhs_KxM.shape[1])

    def one(g):
        mine = (rows_M >= offsets[g]) & (rows_M < offsets[g + 1])
        return jnp.dot(jnp.where(mine[None, :], lhs_KxM, 0), jnp.where(mine[:, None], rhs_MxN, 0),
                       preferred_element_type=jnp.float32)

    return lax.map(one, jnp.arange(group_sizes_E.shape[0])).astype(out_dtype)


def default_block_rows(m: int, num_groups: int) -> int:
    """Rows per block of the blocked path: about the mean group size, a power of two in [8, 512]."""
    mean = max(1, m // max(num_groups, 1))
    return int(min(512, max(8, 1 << (mean - 1).bit_length())))


def _blocks(group_sizes_E, m, tm):
    meta = tiling_lib.group_tiles(group_sizes_E.astype(jnp.int32), tm,
                                  tiling_lib.max_group_tiles(m, tm, group_sizes_E.shape[0]))
    r_R = jnp.arange(tm)[None, :]
    idx_TxR = meta.row_start[:, None] + r_R
    valid_TxR = (r_R >= meta.lo[:, None]) & (r_R < meta.hi[:, None])
    return meta.group_ids, jnp.where(valid_TxR, idx_TxR, m), valid_TxR


def gmm_blocked(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs=False, out_dtype=None, block_rows=None):
    """CPU path: blocks of block_rows rows inside one group, one batched matmul over <= M/block + E blocks."""
    out_dtype = out_dtype or lhs_MxK.dtype
    m, k = lhs_MxK.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm = block_rows or default_block_rows(m, rhs.shape[0])
    gid_T, idx_TxR, valid_TxR = _blocks(group_sizes_E, m, tm)
    x_TxRxK = jnp.where(valid_TxR[..., None], lhs_MxK[jnp.minimum(idx_TxR, m - 1)], 0)
    spec = "trk,tnk->trn" if transpose_rhs else "trk,tkn->trn"
    y_TxRxN = jnp.einsum(spec, x_TxRxK, rhs[gid_T], preferred_element_type=jnp.float32)
    out = jnp.zeros((m, n), jnp.float32).at[idx_TxR.reshape(-1)].set(y_TxRxN.reshape(-1, n), mode="drop")
    return out.astype(out_dtype)


def tgmm_blocked(lhs_KxM, rhs_MxN, group_sizes_E, *, out_dtype=None, block_rows=None):
    """CPU path of tgmm: per-block lhs.T @ rhs, summed into the block's group."""
    out_dtype = out_dtype or lhs_KxM.dtype
    k, m = lhs_KxM.shape
    num_groups = group_sizes_E.shape[0]
    tm = block_rows or default_block_rows(m, num_groups)
    gid_T, idx_TxR, valid_TxR = _blocks(group_sizes_E, m, tm)
    safe = jnp.minimum(idx_TxR, m - 1)
    x_TxRxK = jnp.where(valid_TxR[..., None], lhs_KxM.T[safe], 0)
    y_TxRxN = jnp.where(valid_TxR[..., None], rhs_MxN[safe], 0)
    per_block = jnp.einsum("trk,trn->tkn", x_TxRxK, y_TxRxN, preferred_element_type=jnp.float32)
    return jax.ops.segment_sum(per_block, gid_T, num_segments=num_groups).astype(out_dtype)
