"""Backend-neutral block bounds for packed sequences: which streamed blocks a tile of rows must visit (plain jnp).

Used by the Mosaic GPU kernels (read from global memory) and the Mosaic TPU kernels (scalar prefetch into SMEM).
"""
from __future__ import annotations

import jax.numpy as jnp


def block_ranges(rows_seg_BxR, cols_seg_BxC, *, row_tile, col_block, rows_are_q, causal_offset, kv_len):
    """Per tile of row_tile rows, the blocks of col_block columns worth visiting -> int32 [B, R/row_tile, 4].

    Rows are queries (forward, dq) or keys (dk/dv) as rows_are_q says; *_seg are the padded segment ids. Each
    entry is (lo, full_lo, full_hi, hi): no block outside [lo, hi) holds a visible (query, key) pair (segment-id
    ranges [min, max] disjoint, past the causal diagonal, or only padded keys), so it is exact for any ids and
    tight for sorted ones; every pair in blocks [full_lo, full_hi) is visible (no mask needed). A tile with no
    block is (C/col_block, 0, 0, 0), so a min of lo and a max of hi over tiles ignore it.
    """
    B, R = rows_seg_BxR.shape
    C = cols_seg_BxC.shape[1]
    nr, nc = R // row_tile, C // col_block
    rs = rows_seg_BxR.reshape(B, nr, row_tile)
    cs = cols_seg_BxC.reshape(B, nc, col_block)
    rmin, rmax = rs.min(-1)[:, :, None], rs.max(-1)[:, :, None]          # [B, nr, 1]
    cmin, cmax = cs.min(-1)[:, None, :], cs.max(-1)[:, None, :]          # [B, 1, nc]
    r0 = jnp.arange(nr, dtype=jnp.int32)[:, None] * row_tile            # [nr, 1] first row of each tile
    c0 = jnp.arange(nc, dtype=jnp.int32)[None, :] * col_block           # [1, nc] first column of each block
    r1, c1 = r0 + (row_tile - 1), c0 + (col_block - 1)
    q0, q1, k0, k1 = (r0, r1, c0, c1) if rows_are_q else (c0, c1, r0, r1)
    any_vis = (rmin <= cmax) & (cmin <= rmax) & (k0 < kv_len)
    all_vis = (rmin == rmax) & (cmin == cmax) & (rmin == cmin) & (k1 < kv_len)
    if causal_offset is not None:
        any_vis = any_vis & (k0 <= q1 + causal_offset)
        all_vis = all_vis & (k1 <= q0 + causal_offset)
    idx = jnp.arange(nc, dtype=jnp.int32)
    lo = jnp.where(any_vis, idx, nc).min(-1)
    hi = jnp.where(any_vis, idx + 1, 0).max(-1)
    full_lo = jnp.where(all_vis, idx, nc).min(-1)
    full_hi = jnp.where(~all_vis & (idx > full_lo[..., None]), idx, nc).min(-1)   # end of the first run of full blocks
    none_full = full_lo >= nc
    full_lo = jnp.where(none_full, hi, full_lo)
    full_hi = jnp.where(none_full, hi, jnp.minimum(full_hi, hi))
    return jnp.stack([lo, full_lo, full_hi, hi], axis=-1).astype(jnp.int32)
