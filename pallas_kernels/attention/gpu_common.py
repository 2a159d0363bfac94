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

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention.segment_ranges import block_ranges  # noqa: F401  (re-exported: gc.block_ranges)

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


def walk_blocks(step, drain, carry, *, seg_steps, full, wg_steps, cta_steps):
    """Runs one compute warpgroup over the CTA's ring steps and returns the carry.

    With segment ids, seg_steps = (s0, f0, f1) from read_ranges: drain [0, s0), masked [s0, f0), unmasked
    [f0, f1), masked [f1, wg_steps); without (seg_steps None), unmasked [0, full), masked [full, wg_steps).
    Then drain [wg_steps, cta_steps), so every warpgroup observes every slot the memory warpgroup fills.
    step(i, carry, masked=...) -> carry; drain(i, None) -> None.
    """
    if seg_steps is not None:
        s0, f0, f1 = seg_steps
        lax.fori_loop(0, s0, drain, None)
        carry = lax.fori_loop(s0, f0, functools.partial(step, masked=True), carry)
        carry = lax.fori_loop(f0, f1, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(f1, wg_steps, functools.partial(step, masked=True), carry)
    else:
        carry = lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(full, wg_steps, functools.partial(step, masked=True), carry)
    lax.fori_loop(wg_steps, cta_steps, drain, None)
    return carry
