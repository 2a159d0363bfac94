"""Mosaic GPU (Hopper) flash-attention backward: a dK/dV kernel (key rows stationary, query blocks of every head of
the GQA group streamed) and a dQ kernel (query rows stationary, key blocks streamed). Probabilities are recomputed
from the forward's log2-sum-exp; the soft-cap derivative is (1 - tanh^2). With segment ids both kernels visit only
the blocks gc.block_ranges keeps (blocks between different documents are skipped).

Fused variant (used where fused_preferred says): the dK/dV kernel also produces dQ, so S and dP are not recomputed
by a second kernel (5 block matmuls per block pair instead of 7). Each warpgroup writes its 64x64 block of dS^T
(bf16) to shared memory; after a barrier between the two warpgroups, the block's dQ = dS [64 q, 128 keys] @ K is
computed in 64-column chunks (chunk j by the warpgroup with (j + step + wg) even, so the work alternates) and added
to a float32 dQ accumulator in global memory by TMA reduce-add. Interpret mode has no TMA reduce-add: there each
CTA writes its chunks to its own slice of a [kv_ctas, ...] buffer that the wrapper sums (same arithmetic).
"""
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
DQ_CHUNK = 64          # fused variant: dQ columns per matmul (one 128-byte swizzle tile of K)


def fused_preferred(d_qk: int) -> bool:
    """Whether backward() uses the fused variant. On the H200 it is faster only at Dqk = 64 (d64 shape: 2.03 vs
    2.55 ms of backward kernels) and slower at 128 (2.04 vs 1.74) and 192 (4.30 vs 2.76): BENCHMARKS.md."""
    return d_qk <= 64


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


def _dkv_kernel(*refs, G, nqt, bqs, stages, has_seg, causal_offset, scale, cap, interpret, dq_acc=None):
    """dK/dV body (and dQ by reduce-add into the closed-over f32 ref dq_acc when given). Rows of the transposed
    blocks are keys, columns are queries."""
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, bnd_ref, _, dk_ref, dv_ref, *scratch) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *scratch) = refs
        qs_ref = ks_ref = bnd_ref = None
    (k_smem, v_smem, ks_smem, q_smem, do_smem, lse_smem, dl_smem, qs_smem, stage_smem,
     kv_bar, ks_bar, q_bar, do_bar, lse_bar, dl_bar, qs_bar, cons, ds_smem, dq_smem, ds_ready) = scratch
    fused = dq_acc is not None
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
        for w in range(gc.COMPUTE_WGS) if fused else (wg,):   # fused dQ reads the other warpgroup's K rows too
            plgpu.barrier_wait(kv_bar.at[0, w])
        plgpu.barrier_wait(kv_bar.at[1, wg])
        kv_seg = None
        if has_seg:
            plgpu.barrier_wait(ks_bar.at[wg])
            kv_seg = plgpu.load(ks_smem.at[wg], layout=gc.ROW)

        def wait_inputs(slot):
            for bar in (q_bar, do_bar, lse_bar, dl_bar) + ((qs_bar,) if has_seg else ()):
                plgpu.barrier_wait(bar.at[slot])

        def dq_share(n, tile, g):
            """Fused: once both halves of dS^T for stream step n are in shared memory, this warpgroup's dQ chunks."""
            par = lax.rem(n, jnp.int32(2))
            plgpu.commit_smem()
            plgpu.barrier_arrive(ds_ready.at[par])
            plgpu.barrier_wait(ds_ready.at[par])
            rows, h, store_cols = pl.ds(tile * bqs, bqs), kvh * G + g, dq_smem.shape[-1]
            for j in range(k_smem.shape[-1] // DQ_CHUNK):
                @pl.when(lax.rem(n + wg + j, jnp.int32(2)) == 0)
                def _chunk():
                    def body(acc_ref):
                        for w in range(gc.COMPUTE_WGS):
                            plgpu.wgmma(acc_ref, ds_smem.at[par, w].T, k_smem.at[w, :, pl.ds(j * DQ_CHUNK, DQ_CHUNK)])
                        return acc_ref[...]

                    dq = pl.run_scoped(body, plgpu.ACC((bqs, DQ_CHUNK), jnp.float32))
                    out = dq_smem.at[wg]
                    for c0 in range(0, DQ_CHUNK, store_cols):   # MLA stores 32-column halves (shared memory)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous store left the buffer
                        out[...] = dq if store_cols == DQ_CHUNK else dq[:, c0:c0 + store_cols]
                        plgpu.commit_smem()
                        cols = pl.ds(j * DQ_CHUNK + c0, store_cols)
                        if interpret:
                            plgpu.copy_smem_to_gmem(out, dq_acc.at[kv_tile, b, rows, h, cols])
                        else:
                            plgpu.copy_smem_to_gmem(out, dq_acc.at[b, rows, h, cols], reduction_op="add")

        def step(n, carry, tile, g, masked):
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
            if fused:
                ds_T = ds_T.astype(qt.dtype)
                ds_smem.at[lax.rem(n, jnp.int32(2)), wg][...] = ds_T
            st = stage_smem.at[wg] if interpret else None
            dv = gc.mm_acc(dv, p_T, dot, st, interpret)
            dk = gc.mm_acc(dk, ds_T, qt, st, interpret)
            plgpu.barrier_arrive(cons.at[slot])
            if fused:
                dq_share(n, tile, g)
            return dk, dv

        def skip(n, base, g):
            """A query block none of this warpgroup's keys see (fused: zero dS^T keeps the shared dQ chunks exact)."""
            wait_inputs(lax.rem(n, jnp.int32(stages)))
            if fused:
                ds_smem.at[lax.rem(n, jnp.int32(2)), wg][...] = jnp.zeros(ds_smem.shape[2:], ds_smem.dtype)
            plgpu.barrier_arrive(cons.at[lax.rem(n, jnp.int32(stages))])
            if fused:
                dq_share(n, n - base, g)

        def head(g, carry):
            base = g * per_head - start_cta       # stream index of q tile `tile` of head g is base + tile

            def run(lo, hi, masked, carry):
                body = lambda tile, c: step(base + tile, c, tile, g, masked)
                return lax.fori_loop(lo, hi, body, carry)

            def skip_range(lo, hi):
                lax.fori_loop(base + lo, base + hi, lambda n, _: skip(n, base, g), None)

            if has_seg:   # skip the other warpgroup's blocks, masked / unmasked / masked, skip the rest
                at = lambda j: start_cta + j
                skip_range(at(0), at(s0))
                carry = run(at(s0), at(f0), True, carry)
                carry = run(at(f0), at(f1), False, carry)
                carry = run(at(f1), at(s1), True, carry)
                skip_range(at(s1), at(per_head))
                return carry
            skip_range(start_cta, start)
            carry = run(start, diag_end, True, carry)
            return run(diag_end, jnp.int32(nqt), False, carry)

        dk, dv = lax.fori_loop(0, G, head, (gc.zeros((bk, kw.shape[-1])), gc.zeros((bk, vw.shape[-1]))))
        if fused:   # the other warpgroup may still read our K rows for its last dQ chunk; reuse kw after it is done
            plgpu.wait_smem_to_gmem(0)
            plgpu.barrier_arrive(ds_ready.at[lax.rem(n_total, jnp.int32(2))])
            plgpu.barrier_wait(ds_ready.at[lax.rem(n_total, jnp.int32(2))])
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


def _dkv_call(ins, k, v, *, G, has_seg, causal_offset, scale, cap, block_sizes: BlockSizes, interpret,
              dq_acc=None):
    """The dK/dV kernel over ins = (q, k, v, do, lse2, delta[, q_seg, kv_seg, dkv_bounds, dq_bounds]) -> (dk, dv);
    with dq_acc (a float32 ref) also dQ / scale, added into dq_acc (the fused variant)."""
    B, Tp, _, Dqk = ins[0].shape
    Sp, KVH, Dv = k.shape[1], k.shape[2], v.shape[-1]
    dtype, f32, stages = k.dtype, jnp.float32, block_sizes.num_stages
    wg, bq, bqs = gc.COMPUTE_WGS, gc.WG_ROWS, block_sizes.block_q_dkv
    fused = dq_acc is not None
    store_cols = DQ_CHUNK if Dqk + Dv <= 256 else DQ_CHUNK // 2   # MLA: 16 KB less shared memory
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
        gc.smem_tiles((2, wg, bq, bqs), dtype) if fused else None,         # dS^T, double-buffered by step parity
        plgpu.SMEM((wg, bqs, store_cols), f32) if fused else None,          # dQ columns on their way out
        plgpu.Barrier(num_arrivals=wg, num_barriers=2) if fused else None,  # both halves of dS^T written
    ])
    body = functools.partial(_dkv_kernel, G=G, nqt=Tp // bqs, bqs=bqs, stages=stages, has_seg=has_seg,
                             causal_offset=causal_offset, scale=scale, cap=cap, interpret=interpret, dq_acc=dq_acc)
    n_in = len(ins)
    return plgpu.kernel(
        lambda *r: body(*r[:n_in + 2], *rebuild(r[n_in + 2:])),
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=types, grid=(KVH, B, Sp // CTA_ROWS), grid_names=("h", "b", "kv"),
        num_threads=wg + 1, thread_name="wg", kernel_name="flash_bwd_fused" if fused else "flash_bwd_dkv",
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
    """Padded inputs and forward residuals -> (dq, dk, dv) in the inputs' dtypes: the fused kernel where
    fused_preferred(Dqk), else the dK/dV kernel and then the dQ kernel."""
    ins = backward_inputs(q, k, v, q_seg, kv_seg, out, lse2, do, causal=causal, kv_len=kv_len, q_len=q_len,
                          block_sizes=block_sizes)
    kw = dict(G=q.shape[2] // k.shape[2], has_seg=q_seg is not None,
              causal_offset=(kv_len - q_len) if causal else None, scale=scale, cap=cap, block_sizes=block_sizes,
              interpret=interpret)
    if not fused_preferred(q.shape[-1]):
        dk, dv = _dkv_call(ins, k, v, **kw)
        return _dq_call(ins, k, v, kv_len=kv_len, **kw), dk, dv
    n_kv = k.shape[1] // CTA_ROWS   # interpret mode: one dQ slice per key CTA, summed below
    dq_acc = jax.new_ref(jnp.zeros(((n_kv,) if interpret else ()) + q.shape, jnp.float32))
    dk, dv = _dkv_call(ins, k, v, dq_acc=dq_acc, **kw)
    dq = dq_acc[...].sum(axis=0) if interpret else dq_acc[...]
    return (dq * scale).astype(q.dtype), dk, dv
