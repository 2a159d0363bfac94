"""Shared pieces of the Mosaic GPU (Hopper) attention kernels: matmul helpers, masks, loop ranges, soft-cap math.

Each kernel runs 3 warpgroups per CTA: two compute warpgroups (64 rows each of the stationary block) and one
memory warpgroup that streams the other operand through a ring of `num_stages` shared-memory slots with TMA.
With segment ids, block_ranges (plain jnp, in the wrappers) bounds the streamed blocks per 64-row tile and the
kernels read those int32 bounds straight from global memory (read_ranges); the ring slot is the step counter.

Interpret mode (Mosaic GPU's CPU simulator) cannot yet take a matmul operand from registers nor an accumulator
carried through `pl.run_state`; with `interpret=True` the helpers below stage the register operand through a
shared-memory buffer and add a fresh accumulator instead. Everything else (TMA, barriers, masks, softmax) is the
same code on both paths.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

LOG2E = math.log2(math.e)
MASK_S = -1e30        # stands in for a hidden key in the running max of raw logits (finite: keeps alpha NaN-free)
WG_ROWS = 64          # rows of the stationary block per compute warpgroup (one wgmma M tile)
COMPUTE_WGS = 2
TILING = plgpu.TilingTransform((8, 64))
SWIZZLE = plgpu.SwizzleTransform(128)
INTERPRET_PARAMS = plgpu.InterpretGPUParams()   # tests may swap in InterpretGPUParams(detect_races=True)
ROW = plgpu.Layout.WGMMA.reduce(1)   # layout of a per-row vector of a WGMMA-layout matrix
COL = plgpu.Layout.WGMMA.reduce(0)   # layout of a per-column vector


def smem_tiles(shape, dtype):
    """A swizzled shared-memory buffer for a matmul operand (last two dims are the tile)."""
    return plgpu.SMEM(shape, dtype, transforms=(TILING, SWIZZLE))


def zeros(shape):
    """f32 zeros in the WGMMA accumulator layout."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def row_full(n, value):
    """f32 per-row vector filled with value."""
    return plgpu.layout_cast(jnp.full((n,), value, jnp.float32), ROW)


def mm_new(a_smem, b_smem, between=None):
    """a @ b with both operands in shared memory -> f32 [M, N] registers; `between` runs while the MMA is in flight."""
    shape = (a_smem.shape[0], b_smem.shape[1])

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, b_smem)
        if between is not None:
            between()
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mm_acc(acc, a, b_smem, stage_smem, interpret, after_issue=None):
    """acc + a @ b where a is in registers (cast to b's dtype) and b in shared memory -> f32 [M, N]."""
    a = a.astype(b_smem.dtype)
    if interpret:
        stage_smem[...] = a
        plgpu.commit_smem()
        return acc + mm_new(stage_smem, b_smem, after_issue)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_smem)
        if after_issue is not None:
            after_issue()

    return pl.run_state(body)(plgpu.ACC.init(acc))


def bcast_rows(x_M, shape):
    """Per-row vector -> [M, N]."""
    return lax.broadcast_in_dim(x_M, shape, [0])


def bcast_cols(x_N, shape):
    """Per-column vector -> [M, N]."""
    return lax.broadcast_in_dim(x_N, shape, [1])


def visible(shape, row0, col0, *, rows_are_q, causal_offset, kv_len, kv_padded, seg_rows=None, seg_cols=None):
    """Boolean [M, N] block mask: causal (key <= query + offset), key < kv_len, equal segment ids.

    rows_are_q says whether matrix rows index queries (forward, dq) or keys (dk/dv transposed blocks).
    """
    r = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row0
    c = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col0
    q_idx, kv_idx = (r, c) if rows_are_q else (c, r)
    mask = None
    if causal_offset is not None:
        mask = kv_idx <= q_idx + causal_offset
    if kv_padded:
        m = kv_idx < kv_len
        mask = m if mask is None else mask & m
    if seg_rows is not None:
        m = bcast_rows(seg_rows, shape) == bcast_cols(seg_cols, shape)
        mask = m if mask is None else mask & m
    return mask


def softcap_logits2(s, scale, cap):
    """Raw q.k -> (soft-capped logit * log2(e), tanh term or None); the tanh term feeds the backward's derivative."""
    if cap is None:
        return s * (scale * LOG2E), None
    t = jnp.tanh(s * (scale / cap))
    return t * (cap * LOG2E), t


def assemble(scratch):
    """Scratch list with None for unused entries -> (types to allocate, rebuild(refs) re-inserting the Nones)."""
    types = [s for s in scratch if s is not None]

    def rebuild(refs):
        it = iter(refs)
        return [None if s is None else next(it) for s in scratch]

    return types, rebuild


def cdiv(a, b):
    """Ceiling division of int32 scalars (non-negative a)."""
    return lax.div(a + (b - 1), jnp.int32(b))


def clamp(x, lo, hi):
    """Clamp an int32 scalar."""
    return jnp.minimum(jnp.maximum(x, jnp.int32(lo)), jnp.int32(hi) if isinstance(hi, int) else hi)


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


def read_ranges(bounds_ref, b, tile0, wg):
    """Kernel side of block_ranges for a CTA of two warpgroup tiles starting at tile0 -> (cta_lo, n_steps, wg_steps).

    The memory warpgroup streams blocks cta_lo + [0, n_steps); wg_steps = (s0, f0, f1, s1) are this warpgroup's step
    boundaries: drain [0, s0), masked [s0, f0), unmasked [f0, f1), masked [f1, s1), drain [s1, n_steps). Both compute
    warpgroups and the memory warpgroup thus walk the same n_steps ring slots. wg may be None (memory warpgroup).
    """
    t0, t1 = bounds_ref.at[b, tile0], bounds_ref.at[b, tile0 + 1]
    cta_lo = jnp.minimum(t0[0], t1[0])
    n_steps = jnp.maximum(jnp.maximum(t0[3], t1[3]) - cta_lo, 0)
    if wg is None:
        return cta_lo, n_steps, None
    mine = bounds_ref.at[b, tile0 + wg]
    steps, prev = [], jnp.int32(0)
    for j in range(4):
        prev = jnp.minimum(jnp.maximum(mine[j] - cta_lo, prev), n_steps)
        steps.append(prev)
    return cta_lo, n_steps, tuple(steps)
