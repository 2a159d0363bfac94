"""Pallas TPU (Mosaic) flash attention: forward with soft-cap, segment ids and max logits; dK/dV and dQ backward.

Kernels work on head-major [B, H, T, D] copies of the inputs so that every block is (rows, D) with D whole.
Row statistics travel lane-dense as [B, H, 1, T] (lse, max logits, delta); causal grids skip blocks above the
diagonal by clamping the block index (no DMA) and guarding the compute. The dK/dV kernel computes transposed
(key-rows) blocks so that it needs no in-kernel transposes; the GQA group's query heads are its innermost loop.
With segment ids, segment_ranges.block_ranges bounds each row tile's streamed blocks (scalar prefetch, SMEM): blocks
outside [lo, hi) are neither fetched (clamped index) nor computed, and blocks in [full_lo, full_hi) skip the mask.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.attention.block_sizes import BlockSizes
from pallas_kernels.attention.segment_ranges import block_ranges

LANES = 128
MASK_S = -1e30
NT = (((1,), (1,)), ((), ()))        # a @ b.T


def check_tpu_shapes(q, k, v, block_sizes: BlockSizes):
    """Raise ValueError naming the Mosaic tiling constraint these block sizes break."""
    for name in ("block_q", "block_kv", "block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq"):
        b = getattr(block_sizes, name)
        if b % LANES:
            raise ValueError(f"tpu attention needs BlockSizes.{name} a multiple of 128 (lane-dense row statistics "
                             f"and key blocks); got {b}")


def _row_to_col(x_1xN):
    """(1, N) lane vector -> (N, 1) sublane vector via an aligned (128, N) transpose."""
    return jnp.transpose(jnp.broadcast_to(x_1xN, (LANES, x_1xN.shape[1])))[:, :1]


def _col_to_row(x_Nx1):
    """(N, 1) sublane vector -> (1, N) lane vector."""
    return jnp.transpose(jnp.broadcast_to(x_Nx1, (x_Nx1.shape[0], LANES)))[:1, :]


def _logits(s, scale, cap):
    """Raw q.k -> (soft-capped scaled logits, tanh term or None)."""
    if cap is None:
        return s * scale, None
    t = jnp.tanh(s * (scale / cap))
    return t * cap, t


def _mask(shape, row0, col0, *, rows_are_q, causal_offset, kv_len, kv_padded, seg_rows, seg_cols):
    """Visibility of a block: causal (key <= query + offset), key < kv_len, equal segment ids; None if all visible."""
    r = lax.broadcasted_iota(jnp.int32, shape, 0) + row0
    c = lax.broadcasted_iota(jnp.int32, shape, 1) + col0
    q_idx, kv_idx = (r, c) if rows_are_q else (c, r)
    mask = None
    if causal_offset is not None:
        mask = kv_idx <= q_idx + causal_offset
    if kv_padded:
        m = kv_idx < kv_len
        mask = m if mask is None else mask & m
    if seg_rows is not None:
        m = seg_rows == seg_cols
        mask = m if mask is None else mask & m
    return mask


def _last_kv_block(i, bq, bk, causal_offset, nkv):
    """Index of the last key block query block i sees (-1 if none)."""
    if causal_offset is None:
        return jnp.int32(nkv - 1)
    last_row = (i + 1) * bq - 1 + causal_offset
    return jnp.where(last_row < 0, -1, jnp.minimum(lax.div(jnp.maximum(last_row, 0), bk), nkv - 1))


def _needs_mask(i, j, bq, bk, causal_offset, kv_padded, nkv):
    """Whether block (query block i, key block j) has any hidden entry (no segment ids)."""
    need = jnp.bool_(False)
    if causal_offset is not None:
        need = need | ((j + 1) * bk - 1 > i * bq + causal_offset)
    if kv_padded:
        need = need | (j == nkv - 1)
    return need


def segment_bounds(rows_seg_BxR, cols_seg_BxC, *, row_tile, col_block, rows_are_q, causal_offset, kv_len):
    """block_ranges flattened to int32 [B * R/row_tile * 4] for scalar prefetch (1-D keeps SMEM padding small)."""
    return block_ranges(rows_seg_BxR, cols_seg_BxC, row_tile=row_tile, col_block=col_block, rows_are_q=rows_are_q,
                        causal_offset=causal_offset, kv_len=kv_len).reshape(-1)


def _read_bounds(bounds_ref, b, tile, n_tiles):
    """(lo, full_lo, full_hi, hi) of row tile `tile` of batch row b from segment_bounds' flat SMEM array."""
    base = (b * n_tiles + tile) * 4
    return tuple(bounds_ref[base + k] for k in range(4))


def _clamp_to_range(x, bounds_ref, b, tile, n_tiles):
    """Streamed block index x clamped into [lo, hi - 1] (0 for an empty range); a repeated index skips the DMA."""
    lo, _, _, hi = _read_bounds(bounds_ref, b, tile, n_tiles)
    return jnp.maximum(jnp.minimum(jnp.maximum(x, lo), hi - 1), 0)


def _visit(x, bounds_ref, b, tile, n_tiles):
    """(streamed block x holds a visible pair, block x needs a mask) from the bounds."""
    lo, full_lo, full_hi, hi = _read_bounds(bounds_ref, b, tile, n_tiles)
    return (lo <= x) & (x < hi), (x < full_lo) | (x >= full_hi)


def _fwd_kernel(*refs, bq, bk, nq, nkv, has_seg, causal_offset, kv_len, kv_padded, scale, cap):
    if has_seg:
        bounds_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, ml_ref, acc, m_raw, m_cap, l_sum = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, ml_ref, acc, m_raw, m_cap, l_sum = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)
        m_raw[...] = jnp.full(m_raw.shape, MASK_S, jnp.float32)
        m_cap[...] = jnp.full(m_cap.shape, -jnp.inf, jnp.float32)
        l_sum[...] = jnp.zeros(l_sum.shape, jnp.float32)

    def step(masked):
        s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
        logit, _ = _logits(s, scale, cap)
        if masked:
            mask = _mask(s.shape, i * bq, j * bk, rows_are_q=True, causal_offset=causal_offset, kv_len=kv_len,
                         kv_padded=kv_padded, seg_rows=qs_ref[...] if has_seg else None,
                         seg_cols=ks_ref[...] if has_seg else None)
            if mask is not None:
                s = jnp.where(mask, s, MASK_S)
                logit = jnp.where(mask, logit, -jnp.inf)
        m_raw_new = jnp.maximum(m_raw[...], jnp.max(s, axis=1, keepdims=True))
        m_new = m_raw_new * scale if cap is None else cap * jnp.tanh(m_raw_new * (scale / cap))
        alpha = jnp.exp(m_cap[...] - m_new)
        p = jnp.exp(logit - m_new[:, :1])
        l_sum[...] = alpha * l_sum[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc[...] = acc[...] * alpha[:, :1] + pv
        m_raw[...] = m_raw_new
        m_cap[...] = m_new

    if has_seg:
        visible, need = _visit(j, bounds_ref, pl.program_id(0), i, nq)
    else:
        visible = j <= _last_kv_block(i, bq, bk, causal_offset, nkv)
        need = _needs_mask(i, j, bq, bk, causal_offset, kv_padded, nkv)
    pl.when(visible & need)(functools.partial(step, True))
    pl.when(visible & jnp.logical_not(need))(functools.partial(step, False))

    @pl.when(j == nkv - 1)
    def _finish():
        l = l_sum[:, :1]
        seen = l > 0.0
        safe_l = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen, acc[...] / safe_l, 0.0).astype(o_ref.dtype)
        lse_ref[...] = _col_to_row(jnp.where(seen, m_cap[:, :1] + jnp.log(safe_l), jnp.inf))
        mr = m_raw[:, :1]
        ml_ref[...] = _col_to_row(jnp.where(mr > 0.5 * MASK_S, mr * scale, -jnp.inf))


def _dq_kernel(*refs, bq, bk, nq, nkv, has_seg, causal_offset, kv_len, kv_padded, scale, cap):
    if has_seg:
        bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, acc, lse_c, dl_c = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, acc, lse_c, dl_c = refs
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, jnp.float32)
        lse_c[...] = jnp.broadcast_to(_row_to_col(lse_ref[...]), lse_c.shape)
        dl_c[...] = jnp.broadcast_to(_row_to_col(dl_ref[...]), dl_c.shape)

    def step(masked):
        s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
        logit, t = _logits(s, scale, cap)
        p = jnp.exp(logit - lse_c[:, :1])
        if masked:
            mask = _mask(s.shape, i * bq, j * bk, rows_are_q=True, causal_offset=causal_offset, kv_len=kv_len,
                         kv_padded=kv_padded, seg_rows=qs_ref[...] if has_seg else None,
                         seg_cols=ks_ref[...] if has_seg else None)
            p = p if mask is None else jnp.where(mask, p, 0.0)
        dp = lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - dl_c[:, :1])
        if cap is not None:
            ds = ds * (1.0 - t * t)
        acc[...] += jnp.dot(ds.astype(k_ref.dtype), k_ref[...], preferred_element_type=jnp.float32)

    if has_seg:
        visible, need = _visit(j, bounds_ref, pl.program_id(0), i, nq)
    else:
        visible = j <= _last_kv_block(i, bq, bk, causal_offset, nkv)
        need = _needs_mask(i, j, bq, bk, causal_offset, kv_padded, nkv)
    pl.when(visible & need)(functools.partial(step, True))
    pl.when(visible & jnp.logical_not(need))(functools.partial(step, False))

    @pl.when(j == nkv - 1)
    def _finish():
        dq_ref[...] = (acc[...] * scale).astype(dq_ref.dtype)


def _first_q_block(j, bq, bk, causal_offset):
    """Index of the first query block that sees key block j."""
    if causal_offset is None:
        return jnp.int32(0)
    return lax.div(jnp.maximum(j * bk - causal_offset, 0), bq)


def _dkv_kernel(*refs, bq, bk, nq, nkv, n_steps, has_seg, causal_offset, scale, cap):
    if has_seg:
        (bounds_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dk_ref, dv_ref, dk_acc,
         dv_acc) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    j, n = pl.program_id(2), pl.program_id(3)
    i = lax.rem(n, nq)

    @pl.when(n == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked):
        s_t = lax.dot_general(k_ref[...], q_ref[...], NT, preferred_element_type=jnp.float32)
        logit_t, t_t = _logits(s_t, scale, cap)
        p_t = jnp.exp(logit_t - lse_ref[...])
        if masked:
            mask = _mask(s_t.shape, j * bk, i * bq, rows_are_q=False, causal_offset=causal_offset, kv_len=0,
                         kv_padded=False, seg_rows=ks_ref[...] if has_seg else None,
                         seg_cols=qs_ref[...] if has_seg else None)
            p_t = p_t if mask is None else jnp.where(mask, p_t, 0.0)
        dv_acc[...] += jnp.dot(p_t.astype(do_ref.dtype), do_ref[...], preferred_element_type=jnp.float32)
        dp_t = lax.dot_general(v_ref[...], do_ref[...], NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - dl_ref[...])
        if cap is not None:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk_acc[...] += jnp.dot(ds_t.astype(q_ref.dtype), q_ref[...], preferred_element_type=jnp.float32)

    if has_seg:
        visible, need = _visit(i, bounds_ref, pl.program_id(0), j, nkv)
    else:
        visible = i >= _first_q_block(j, bq, bk, causal_offset)
        need = jnp.bool_(False)
        if causal_offset is not None:
            need = need | ((j + 1) * bk - 1 > i * bq + causal_offset)
    pl.when(visible & need)(functools.partial(step, True))
    pl.when(visible & jnp.logical_not(need))(functools.partial(step, False))

    @pl.when(n == n_steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _head_major(x):
    return jnp.swapaxes(x, 1, 2)


def _params(interpret):
    return pltpu.InterpretParams() if interpret else False


def _kv_block_fn(has_seg, bq, bk, nq, nkv, causal_offset):
    """Index map piece for query-stationary grids: (b, i, j, *prefetch) -> key block to fetch (clamped, no DMA)."""
    def kv_block(b, i, j, *prefetch):
        if has_seg:
            return _clamp_to_range(j, prefetch[0], b, i, nq)
        return jnp.maximum(jnp.minimum(j, _last_kv_block(i, bq, bk, causal_offset, nkv)), 0)
    return kv_block


def forward(q, k, v, q_seg, kv_seg, *, causal, scale, cap, kv_len, q_len, block_sizes: BlockSizes, interpret):
    """Padded [B,T,H,D] inputs -> (out[B,T,H,Dv], lse[B,H,1,T] (natural log), max_logits[B,H,T])."""
    B, Tp, H, Dqk = q.shape
    Sp, KVH, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // KVH
    bq, bk = block_sizes.block_q, block_sizes.block_kv
    nq, nkv = Tp // bq, Sp // bk
    off = (kv_len - q_len) if causal else None
    has_seg = q_seg is not None
    kv_block = _kv_block_fn(has_seg, bq, bk, nq, nkv, off)
    kv_idx = lambda b, h, i, j, *pf: (b, h // G, kv_block(b, i, j, *pf), 0)
    in_specs = [pl.BlockSpec((None, None, bq, Dqk), lambda b, h, i, j, *_: (b, h, i, 0)),
                pl.BlockSpec((None, None, bk, Dqk), kv_idx), pl.BlockSpec((None, None, bk, Dv), kv_idx)]
    args, prefetch = [_head_major(q), _head_major(k), _head_major(v)], []
    if has_seg:
        prefetch = [segment_bounds(q_seg, kv_seg, row_tile=bq, col_block=bk, rows_are_q=True, causal_offset=off,
                                   kv_len=kv_len)]
        in_specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
                     pl.BlockSpec((None, 1, bk), lambda b, h, i, j, *pf: (b, 0, kv_block(b, i, j, *pf)))]
        args += [q_seg[:, :, None], kv_seg[:, None, :]]
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    kernel = functools.partial(_fwd_kernel, bq=bq, bk=bk, nq=nq, nkv=nkv, has_seg=has_seg, causal_offset=off,
                               kv_len=kv_len, kv_padded=Sp != kv_len, scale=scale, cap=cap)
    out, lse, ml = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(B, H, nq, nkv), in_specs=in_specs,
            out_specs=[pl.BlockSpec((None, None, bq, Dv), lambda b, h, i, j, *_: (b, h, i, 0)), row_spec, row_spec],
            scratch_shapes=[pltpu.VMEM((bq, Dv), jnp.float32)] + [pltpu.VMEM((bq, LANES), jnp.float32)] * 3),
        out_shape=[jax.ShapeDtypeStruct((B, H, Tp, Dv), q.dtype), jax.ShapeDtypeStruct((B, H, 1, Tp), jnp.float32),
                   jax.ShapeDtypeStruct((B, H, 1, Tp), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_params(interpret),
    )(*prefetch, *args)
    return _head_major(out), lse, ml[:, :, 0]


def backward(q, k, v, q_seg, kv_seg, out, lse, do, *, causal, scale, cap, kv_len, q_len,
             block_sizes: BlockSizes, interpret):
    """Padded inputs and forward residuals -> (dq, dk, dv) in the inputs' dtypes."""
    B, Tp, H, Dqk = q.shape
    Sp, KVH, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // KVH
    off = (kv_len - q_len) if causal else None
    has_seg = q_seg is not None
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))[:, :, None, :]
    qh, kh, vh, doh = _head_major(q), _head_major(k), _head_major(v), _head_major(do)
    sem = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

    # dK / dV: grid (B, KVH, key block j, step n over (head in group, query block i)).
    bq, bk = block_sizes.block_q_dkv, block_sizes.block_kv_dkv
    nq, nkv = Tp // bq, Sp // bk
    n_steps = G * nq

    def q_idx(b, kvh, j, n, *prefetch):
        if has_seg:
            i = _clamp_to_range(lax.rem(n, nq), prefetch[0], b, j, nkv)
        else:
            i = jnp.minimum(jnp.maximum(lax.rem(n, nq), _first_q_block(j, bq, bk, off)), nq - 1)
        return b, kvh * G + lax.div(n, nq), i

    kv_spec = lambda d: pl.BlockSpec((None, None, bk, d), lambda b, kvh, j, n, *_: (b, kvh, j, 0))
    in_specs = [pl.BlockSpec((None, None, bq, Dqk), lambda *g: (*q_idx(*g), 0)), kv_spec(Dqk), kv_spec(Dv),
                pl.BlockSpec((None, None, bq, Dv), lambda *g: (*q_idx(*g), 0)),
                pl.BlockSpec((None, None, 1, bq), lambda *g: (*q_idx(*g)[:2], 0, q_idx(*g)[2])),
                pl.BlockSpec((None, None, 1, bq), lambda *g: (*q_idx(*g)[:2], 0, q_idx(*g)[2]))]
    args, prefetch = [qh, kh, vh, doh, lse, delta], []
    if has_seg:
        prefetch = [segment_bounds(kv_seg, q_seg, row_tile=bk, col_block=bq, rows_are_q=False, causal_offset=off,
                                   kv_len=kv_len)]
        in_specs += [pl.BlockSpec((None, 1, bq), lambda *g: (g[0], 0, q_idx(*g)[2])),
                     pl.BlockSpec((None, bk, 1), lambda b, kvh, j, n, *_: (b, j, 0))]
        args += [q_seg[:, None, :], kv_seg[:, :, None]]
    kernel = functools.partial(_dkv_kernel, bq=bq, bk=bk, nq=nq, nkv=nkv, n_steps=n_steps, has_seg=has_seg,
                               causal_offset=off, scale=scale, cap=cap)
    dk, dv = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(B, KVH, nkv, n_steps), in_specs=in_specs,
            out_specs=[kv_spec(Dqk), kv_spec(Dv)],
            scratch_shapes=[pltpu.VMEM((bk, Dqk), jnp.float32), pltpu.VMEM((bk, Dv), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, k.dtype), jax.ShapeDtypeStruct(vh.shape, v.dtype)],
        compiler_params=sem, interpret=_params(interpret),
    )(*prefetch, *args)

    # dQ: grid (B, H, query block i, key block j).
    bq, bk = block_sizes.block_q_dq, block_sizes.block_kv_dq
    nq, nkv = Tp // bq, Sp // bk
    kv_block = _kv_block_fn(has_seg, bq, bk, nq, nkv, off)
    kv_idx = lambda b, h, i, j, *pf: (b, h // G, kv_block(b, i, j, *pf), 0)
    q_spec = lambda d: pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    in_specs = [q_spec(Dqk), pl.BlockSpec((None, None, bk, Dqk), kv_idx), pl.BlockSpec((None, None, bk, Dv), kv_idx),
                q_spec(Dv), row_spec, row_spec]
    args, prefetch = [qh, kh, vh, doh, lse, delta], []
    if has_seg:
        prefetch = [segment_bounds(q_seg, kv_seg, row_tile=bq, col_block=bk, rows_are_q=True, causal_offset=off,
                                   kv_len=kv_len)]
        in_specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i, j, *_: (b, i, 0)),
                     pl.BlockSpec((None, 1, bk), lambda b, h, i, j, *pf: (b, 0, kv_block(b, i, j, *pf)))]
        args += [q_seg[:, :, None], kv_seg[:, None, :]]
    kernel = functools.partial(_dq_kernel, bq=bq, bk=bk, nq=nq, nkv=nkv, has_seg=has_seg, causal_offset=off,
                               kv_len=kv_len, kv_padded=Sp != kv_len, scale=scale, cap=cap)
    dq = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch), grid=(B, H, nq, nkv), in_specs=in_specs, out_specs=q_spec(Dqk),
            scratch_shapes=[pltpu.VMEM((bq, Dqk), jnp.float32)] + [pltpu.VMEM((bq, LANES), jnp.float32)] * 2),
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        compiler_params=sem, interpret=_params(interpret),
    )(*prefetch, *args)
    return _head_major(dq), _head_major(dk), _head_major(dv)
