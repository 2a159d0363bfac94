"""Mosaic GPU (Hopper) flash-attention backward: a dK/dV kernel (key rows stationary, query blocks of every head of
the GQA group streamed) and a dQ kernel (query rows stationary, key blocks streamed). Probabilities are recomputed
from the forward's log2-sum-exp; the soft-cap derivative is (1 - tanh^2). With segment ids both kernels visit only
the blocks gc.block_ranges keeps (blocks between different documents are skipped)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import gpu_common as gc
from pallas_kernels.attention.block_sizes import BlockSizes

CTA_ROWS = gc.COMPUTE_WGS * gc.WG_ROWS


def _probs_and_dlogits(s, dp, lse2, delta, bcast, mask, scale, cap):
    """Recompute p from raw q.k and return d(loss)/d(q.k) / scale, in the layout of s."""
    logit2, t = gc.softcap_logits2(s, scale, cap)
    p = jnp.exp2(logit2 - bcast(lse2, s.shape))
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    ds = p * (dp - bcast(delta, s.shape))
    if cap is not None:
        ds = ds * (1.0 - t * t)
    return p, ds


def _dkv_kernel(*refs, G, nqt, bqs, stages, has_seg, causal_offset, scale, cap, interpret):
    """dK/dV body. Rows of the transposed blocks are keys, columns are queries."""
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, bnd_ref, _, dk_ref, dv_ref, *scratch) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *scratch) = refs
        qs_ref = ks_ref = bnd_ref = None
    (k_smem, v_smem, ks_smem, q_smem, do_smem, lse_smem, dl_smem, qs_smem, stage_smem,
     kv_bar, ks_bar, q_bar, do_bar, lse_bar, dl_bar, qs_bar, cons) = scratch
    bk = gc.WG_ROWS
    kvh = lax.axis_index("h")
    b = lax.axis_index("b")
    wg = lax.axis_index("wg")
    kv_tile = lax.axis_index("kv")
    kv0_cta = kv_tile * CTA_ROWS

    def first_tile(kv0):
        if causal_offset is None:
            return jnp.int32(0)
        return gc.clamp(lax.div(jnp.maximum(kv0 - causal_offset, 0), jnp.int32(bqs)), 0, nqt)

    if has_seg:   # segment-aware query-block range: stream position j of every head is query block start_cta + j
        start_cta, per_head, _ = gc.read_ranges(bnd_ref, b, kv_tile * gc.COMPUTE_WGS, None)
    else:
        start_cta = first_tile(kv0_cta)
        per_head = jnp.int32(nqt) - start_cta
    n_total = per_head * G

    @pl.when(wg < gc.COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        kv0 = kv0_cta + wg * bk
        kw, vw = k_smem.at[wg], v_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[b, pl.ds(kv0, bk), kvh], kw, kv_bar.at[0, wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(kv0, bk), kvh], vw, kv_bar.at[1, wg])
        if has_seg:
            plgpu.copy_gmem_to_smem(ks_ref.at[b, pl.ds(kv0, bk)], ks_smem.at[wg], ks_bar.at[wg])
        if has_seg:
            _, _, (s0, f0, f1, s1) = gc.read_ranges(bnd_ref, b, kv_tile * gc.COMPUTE_WGS, wg)
        else:
            start = first_tile(kv0)
            if causal_offset is None:
                diag_end = start
            else:
                diag_end = gc.clamp(gc.cdiv(jnp.maximum(kv0 + bk - 1 - causal_offset, 0), bqs), 0, nqt)
                diag_end = jnp.maximum(diag_end, start)
        plgpu.barrier_wait(kv_bar.at[0, wg])
        plgpu.barrier_wait(kv_bar.at[1, wg])
        kv_seg = None
        if has_seg:
            plgpu.barrier_wait(ks_bar.at[wg])
            kv_seg = plgpu.load(ks_smem.at[wg], layout=gc.ROW)

        def wait_inputs(slot):
            for bar in (q_bar, do_bar, lse_bar, dl_bar) + ((qs_bar,) if has_seg else ()):
                plgpu.barrier_wait(bar.at[slot])

        def step(n, carry, tile, masked):
            dk, dv = carry
            slot = lax.rem(n, jnp.int32(stages))
            wait_inputs(slot)
            qt, dot = q_smem.at[slot], do_smem.at[slot]
            s_T = gc.mm_new(kw, qt.T)
            dp_T = gc.mm_new(vw, dot.T)
            mask = None
            if masked:
                q_seg = plgpu.load(qs_smem.at[slot], layout=gc.COL) if has_seg else None
                mask = gc.visible(s_T.shape, kv0, tile * bqs, rows_are_q=False, causal_offset=causal_offset,
                                  kv_len=0, kv_padded=False, seg_rows=kv_seg, seg_cols=q_seg)
            lse2 = plgpu.load(lse_smem.at[slot], layout=gc.COL)
            delta = plgpu.load(dl_smem.at[slot], layout=gc.COL)
            p_T, ds_T = _probs_and_dlogits(s_T, dp_T, lse2, delta, gc.bcast_cols, mask, scale, cap)
            st = stage_smem.at[wg] if interpret else None
            dv = gc.mm_acc(dv, p_T, dot, st, interpret)
            dk = gc.mm_acc(dk, ds_T, qt, st, interpret)
            plgpu.barrier_arrive(cons.at[slot])
            return dk, dv

        def skip(n, _):
            wait_inputs(lax.rem(n, jnp.int32(stages)))
            plgpu.barrier_arrive(cons.at[lax.rem(n, jnp.int32(stages))])

        def head(g, carry):
            base = g * per_head - start_cta       # stream index of q tile `tile` of head g is base + tile

            def run(lo, hi, masked, carry):
                body = lambda tile, c: step(base + tile, c, tile, masked)
                return lax.fori_loop(lo, hi, body, carry)

            if has_seg:   # skip the other warpgroup's blocks, masked / unmasked / masked, skip the rest
                at = lambda j: start_cta + j
                lax.fori_loop(base + at(0), base + at(s0), skip, None)
                carry = run(at(s0), at(f0), True, carry)
                carry = run(at(f0), at(f1), False, carry)
                carry = run(at(f1), at(s1), True, carry)
                lax.fori_loop(base + at(s1), base + at(per_head), skip, None)
                return carry
            lax.fori_loop(base + start_cta, base + start, skip, None)
            carry = run(start, diag_end, True, carry)
            return run(diag_end, jnp.int32(nqt), False, carry)

        dk, dv = lax.fori_loop(0, G, head, (gc.zeros((bk, kw.shape[-1])), gc.zeros((bk, vw.shape[-1]))))
        kw[...] = (dk * scale).astype(kw.dtype)
        vw[...] = dv.astype(vw.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(kw, dk_ref.at[b, pl.ds(kv0, bk), kvh], commit_group=False)
        plgpu.copy_smem_to_gmem(vw, dv_ref.at[b, pl.ds(kv0, bk), kvh], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == gc.COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        def issue(n, slot):
            g = lax.div(n, jnp.maximum(per_head, 1))
            tile = start_cta + lax.rem(n, jnp.maximum(per_head, 1))
            h = kvh * G + g
            rows = pl.ds(tile * bqs, bqs)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], lse_bar.at[slot])
            plgpu.copy_gmem_to_smem(dl_ref.at[b, h, rows], dl_smem.at[slot], dl_bar.at[slot])
            if has_seg:
                plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qs_smem.at[slot], qs_bar.at[slot])

        _memory_loop(issue, cons, n_total, stages)


def _memory_loop(issue, cons, n_total, stages):
    """Fill the ring, then refill each slot once both compute warpgroups consumed it; finally observe the tail."""
    for j in range(stages):
        pl.when(j < n_total)(functools.partial(issue, jnp.int32(j), j))

    @pl.loop(stages, jnp.maximum(n_total, stages))
    def _(n):
        slot = lax.rem(n, jnp.int32(stages))
        plgpu.barrier_wait(cons.at[slot])
        issue(n, slot)

    @pl.loop(jnp.maximum(n_total - stages, 0), n_total)
    def _(n):
        plgpu.barrier_wait(cons.at[lax.rem(n, jnp.int32(stages))])


def _dq_kernel(*refs, G, nq, nkv, bks, stages, has_seg, causal_offset, kv_len, kv_padded, scale, cap, interpret):
    """dQ body: query rows stationary, key blocks streamed."""
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, _, bnd_ref, dq_ref, *scratch) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref, *scratch) = refs
        qs_ref = ks_ref = bnd_ref = None
    (q_smem, do_smem, rows_smem, qs_smem, k_smem, v_smem, ks_smem, stage_smem,
     in_bar, qs_bar, k_bar, v_bar, ks_bar, cons) = scratch
    bq = gc.WG_ROWS
    h = lax.axis_index("h")
    b = lax.axis_index("b")
    wg = lax.axis_index("wg")
    tile = (nq - 1) - lax.axis_index("q")
    q0_cta = tile * CTA_ROWS
    cta_lo = None                                  # key block streamed at step i is cta_lo + i (or i)
    if has_seg:
        cta_lo, cta_steps, _ = gc.read_ranges(bnd_ref, b, tile * gc.COMPUTE_WGS, None)
    elif causal_offset is None:
        cta_steps = jnp.int32(nkv)
    else:
        cta_steps = gc.clamp(gc.cdiv(jnp.maximum(q0_cta + CTA_ROWS + causal_offset, 0), bks), 0, nkv)

    @pl.when(wg < gc.COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q0 = q0_cta + wg * bq
        qw, dow = q_smem.at[wg], do_smem.at[wg]
        rows = pl.ds(q0, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], qw, in_bar.at[0, wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], dow, in_bar.at[1, wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], rows_smem.at[0, wg], in_bar.at[2, wg])
        plgpu.copy_gmem_to_smem(dl_ref.at[b, h, rows], rows_smem.at[1, wg], in_bar.at[3, wg])
        if has_seg:
            plgpu.copy_gmem_to_smem(qs_ref.at[b, rows], qs_smem.at[wg], qs_bar.at[wg])
        if has_seg:
            _, _, (s0, f0, f1, wg_steps) = gc.read_ranges(bnd_ref, b, tile * gc.COMPUTE_WGS, wg)
        elif causal_offset is None:
            wg_steps = full = jnp.int32(nkv)
        else:
            wg_steps = gc.clamp(gc.cdiv(jnp.maximum(q0 + bq + causal_offset, 0), bks), 0, nkv)
            full = jnp.minimum(gc.clamp(lax.div(jnp.maximum(q0 + causal_offset + 1, 0), jnp.int32(bks)), 0, nkv),
                               wg_steps)
        if not has_seg and kv_padded:
            full = jnp.minimum(full, jnp.int32(nkv - 1))
        for j in range(4):
            plgpu.barrier_wait(in_bar.at[j, wg])
        lse2 = plgpu.load(rows_smem.at[0, wg], layout=gc.ROW)
        delta = plgpu.load(rows_smem.at[1, wg], layout=gc.ROW)
        q_seg = None
        if has_seg:
            plgpu.barrier_wait(qs_bar.at[wg])
            q_seg = plgpu.load(qs_smem.at[wg], layout=gc.ROW)
        needs_mask = causal_offset is not None or kv_padded or has_seg

        def wait_inputs(slot):
            for bar in (k_bar, v_bar) + ((ks_bar,) if has_seg else ()):
                plgpu.barrier_wait(bar.at[slot])

        def step(i, dq, masked):
            slot = lax.rem(i, jnp.int32(stages))
            wait_inputs(slot)
            kt, vt = k_smem.at[slot], v_smem.at[slot]
            s = gc.mm_new(qw, kt.T)
            dp = gc.mm_new(dow, vt.T)
            mask = None
            if masked and needs_mask:
                kv_seg = plgpu.load(ks_smem.at[slot], layout=gc.COL) if has_seg else None
                col0 = (i if cta_lo is None else cta_lo + i) * bks
                mask = gc.visible(s.shape, q0, col0, rows_are_q=True, causal_offset=causal_offset,
                                  kv_len=kv_len, kv_padded=kv_padded, seg_rows=q_seg, seg_cols=kv_seg)
            _, ds = _probs_and_dlogits(s, dp, lse2, delta, gc.bcast_rows, mask, scale, cap)
            dq = gc.mm_acc(dq, ds, kt, stage_smem.at[wg] if interpret else None, interpret)
            plgpu.barrier_arrive(cons.at[slot])
            return dq

        def drain(i, _):
            wait_inputs(lax.rem(i, jnp.int32(stages)))
            plgpu.barrier_arrive(cons.at[lax.rem(i, jnp.int32(stages))])

        dq = gc.zeros((bq, qw.shape[-1]))
        dq = gc.walk_blocks(step, drain, dq, seg_steps=(s0, f0, f1) if has_seg else None,
                               full=None if has_seg else full, wg_steps=wg_steps, cta_steps=cta_steps)
        qw[...] = (dq * scale).astype(qw.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qw, dq_ref.at[b, rows, h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == gc.COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kvh = lax.div(h, jnp.int32(G))

        def issue(i, slot):
            rows = pl.ds((i if cta_lo is None else cta_lo + i) * bks, bks)
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], v_bar.at[slot])
            if has_seg:
                plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem.at[slot], ks_bar.at[slot])

        _memory_loop(issue, cons, cta_steps, stages)


def _dkv_call(ins, k, v, *, G, has_seg, causal_offset, scale, cap, block_sizes: BlockSizes, interpret):
    """The dK/dV kernel over ins = (q, k, v, do, lse2, delta[, q_seg, kv_seg, dkv_bounds, dq_bounds]) -> (dk, dv)."""
    B, Tp, _, Dqk = ins[0].shape
    Sp, KVH, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dtype, f32, stages = k.dtype, jnp.float32, block_sizes.num_stages
    wg, bq, bqs = gc.COMPUTE_WGS, gc.WG_ROWS, block_sizes.block_q_dkv
    types, rebuild = gc.assemble([
        gc.smem_tiles((wg, bq, Dqk), dtype), gc.smem_tiles((wg, bq, Dv), dtype),
        plgpu.SMEM((wg, bq), jnp.int32) if has_seg else None,
        gc.smem_tiles((stages, bqs, Dqk), dtype), gc.smem_tiles((stages, bqs, Dv), dtype),
        plgpu.SMEM((stages, bqs), f32), plgpu.SMEM((stages, bqs), f32),
        plgpu.SMEM((stages, bqs), jnp.int32) if has_seg else None,
        gc.smem_tiles((wg, bq, bqs), dtype) if interpret else None,
        plgpu.Barrier(num_barriers=(2, wg)), plgpu.Barrier(num_barriers=wg) if has_seg else None,
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages) if has_seg else None,
        plgpu.Barrier(num_arrivals=wg, num_barriers=stages),
    ])
    body = functools.partial(_dkv_kernel, G=G, nqt=Tp // bqs, bqs=bqs, stages=stages, has_seg=has_seg,
                             causal_offset=causal_offset, scale=scale, cap=cap, interpret=interpret)
    n_in = len(ins)
    return plgpu.kernel(
        lambda *r: body(*r[:n_in + 2], *rebuild(r[n_in + 2:])),
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=types, grid=(KVH, B, Sp // CTA_ROWS), grid_names=("h", "b", "kv"),
        num_threads=wg + 1, thread_name="wg", kernel_name="flash_bwd_dkv",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=gc.INTERPRET_PARAMS if interpret else None)(*ins)


def _dq_call(ins, k, v, *, G, has_seg, causal_offset, kv_len, scale, cap, block_sizes: BlockSizes, interpret):
    """The dQ kernel over the same ins as _dkv_call -> dq."""
    q = ins[0]
    B, Tp, H, Dqk = q.shape
    Sp, Dv = k.shape[1], v.shape[-1]
    dtype, f32, stages = q.dtype, jnp.float32, block_sizes.num_stages
    wg, bq, bks = gc.COMPUTE_WGS, gc.WG_ROWS, block_sizes.block_kv_dq
    types, rebuild = gc.assemble([
        gc.smem_tiles((wg, bq, Dqk), dtype), gc.smem_tiles((wg, bq, Dv), dtype),
        plgpu.SMEM((2, wg, bq), f32), plgpu.SMEM((wg, bq), jnp.int32) if has_seg else None,
        gc.smem_tiles((stages, bks, Dqk), dtype), gc.smem_tiles((stages, bks, Dv), dtype),
        plgpu.SMEM((stages, bks), jnp.int32) if has_seg else None,
        gc.smem_tiles((wg, bq, bks), dtype) if interpret else None,
        plgpu.Barrier(num_barriers=(4, wg)), plgpu.Barrier(num_barriers=wg) if has_seg else None,
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages) if has_seg else None,
        plgpu.Barrier(num_arrivals=wg, num_barriers=stages),
    ])
    nq = Tp // CTA_ROWS
    body = functools.partial(_dq_kernel, G=G, nq=nq, nkv=Sp // bks, bks=bks, stages=stages, has_seg=has_seg,
                             causal_offset=causal_offset, kv_len=kv_len, kv_padded=Sp != kv_len, scale=scale,
                             cap=cap, interpret=interpret)
    n_in = len(ins)
    return plgpu.kernel(
        lambda *r: body(*r[:n_in + 1], *rebuild(r[n_in + 1:])),
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        scratch_types=types, grid=(H, B, nq), grid_names=("h", "b", "q"),
        num_threads=wg + 1, thread_name="wg", kernel_name="flash_bwd_dq",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=gc.INTERPRET_PARAMS if interpret else None)(*ins)


def backward_inputs(q, k, v, q_seg, kv_seg, out, lse2, do, *, causal, kv_len, q_len, block_sizes: BlockSizes):
    """Forward residuals -> the kernels' inputs (q, k, v, do, lse2, delta[, segment ids and block bounds])."""
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
    ins = (q, k, v, do, lse2, delta)
    if q_seg is not None:   # per 64-row tile, the blocks of the streamed operand that can hold a visible pair
        ranges = functools.partial(gc.block_ranges, causal_offset=(kv_len - q_len) if causal else None,
                                   kv_len=kv_len)
        bq = gc.WG_ROWS
        ins += (q_seg, kv_seg,
                ranges(kv_seg, q_seg, row_tile=bq, col_block=block_sizes.block_q_dkv, rows_are_q=False),
                ranges(q_seg, kv_seg, row_tile=bq, col_block=block_sizes.block_kv_dq, rows_are_q=True))
    return ins


def backward(q, k, v, q_seg, kv_seg, out, lse2, do, *, causal, scale, cap, kv_len, q_len,
             block_sizes: BlockSizes, interpret):
    """Padded inputs and forward residuals -> (dq, dk, dv) in the inputs' dtypes (dK/dV kernel, then dQ kernel)."""
    ins = backward_inputs(q, k, v, q_seg, kv_seg, out, lse2, do, causal=causal, kv_len=kv_len, q_len=q_len,
                          block_sizes=block_sizes)
    kw = dict(G=q.shape[2] // k.shape[2], has_seg=q_seg is not None,
              causal_offset=(kv_len - q_len) if causal else None, scale=scale, cap=cap, block_sizes=block_sizes,
              interpret=interpret)
    dk, dv = _dkv_call(ins, k, v, **kw)
    return _dq_call(ins, k, v, kv_len=kv_len, **kw), dk, dv
