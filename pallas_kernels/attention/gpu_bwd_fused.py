"""Mosaic GPU (Hopper) flash-attention backward in one kernel: dK/dV accumulate in registers, dQ by TMA reduce-add.

Per CTA: 128 key rows (two compute warpgroups of 64) stay in shared memory while the memory warpgroup streams
64-row query blocks (q, dO, log2-sum-exp, delta) of every head of the GQA group. Each step a warpgroup recomputes
its 64x64 block of p^T and dS^T, accumulates dV += p^T dO and dK += dS^T Q, and writes dS^T (bf16) to shared
memory; after a barrier between the two warpgroups, the block's dQ contribution dS [64 q, 128 keys] @ K [128, Dqk]
is computed in 64-column chunks (chunk j by warpgroup (j + step) % 2, so the work alternates) and added to a float32
dQ accumulator in global memory by TMA reduce-add. That is 5 block matmuls per block pair where the split backward
(gpu_bwd.py: separate dK/dV and dQ kernels) needs 7.

Interpret mode has no TMA reduce-add: there each CTA writes its dQ contributions to its own slice of a
[kv_ctas, ...] buffer that the wrapper sums, which is the same arithmetic without the atomics.
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
from pallas_kernels.attention.gpu_bwd import _memory_loop, _probs_and_dlogits, backward_inputs

CTA_ROWS = gc.COMPUTE_WGS * gc.WG_ROWS
DQ_CHUNK = 64          # dQ columns per reduce-add tile (one 128-byte swizzle tile of K)


def preferred(d_qk: int) -> bool:
    """Whether ops uses this backward rather than the split one: on the H200 it is faster only at Dqk = 64
    (d64 shape: 2.03 vs 2.55 ms of backward kernels), slower at 128 (2.04 vs 1.74) and 192 (4.30 vs 2.76)."""
    return d_qk <= 64


def _fused_kernel(*refs, dq_acc, G, nqt, bqs, stages, has_seg, causal_offset, scale, cap, interpret):
    """Kernel body; refs = inputs, dk, dv, then the scratch listed in `backward`. dq_acc: closed-over f32 ref."""
    if has_seg:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, bnd_ref, dk_ref, dv_ref, *scratch) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref, *scratch) = refs
        qs_ref = ks_ref = bnd_ref = None
    (k_smem, v_smem, ks_smem, q_smem, do_smem, lse_smem, dl_smem, qs_smem, ds_smem, dq_smem, stage_smem,
     kv_bar, ks_bar, q_bar, do_bar, lse_bar, dl_bar, qs_bar, cons, ds_ready) = scratch
    bk = gc.WG_ROWS
    dqk = k_smem.shape[-1]
    store_cols = dq_smem.shape[-1]
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
            _, _, (s0, f0, f1, s1) = gc.read_ranges(bnd_ref, b, kv_tile * gc.COMPUTE_WGS, wg)
        else:
            start = first_tile(kv0)
            if causal_offset is None:
                diag_end = start
            else:
                diag_end = gc.clamp(gc.cdiv(jnp.maximum(kv0 + bk - 1 - causal_offset, 0), bqs), 0, nqt)
                diag_end = jnp.maximum(diag_end, start)
        # dQ reads the other warpgroup's K rows too: wait for both halves
        for w in range(gc.COMPUTE_WGS):
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
            """After both halves of dS^T for stream step n are in shared memory: this warpgroup's dQ chunks."""
            par = lax.rem(n, jnp.int32(2))
            plgpu.commit_smem()
            plgpu.barrier_arrive(ds_ready.at[par])
            plgpu.barrier_wait(ds_ready.at[par])
            rows = pl.ds(tile * bqs, bqs)
            h = kvh * G + g
            for j in range(dqk // DQ_CHUNK):
                cols = pl.ds(j * DQ_CHUNK, DQ_CHUNK)

                @pl.when(lax.rem(n + wg + j, jnp.int32(2)) == 0)
                def _chunk():
                    def body(acc_ref):
                        for w in range(gc.COMPUTE_WGS):
                            plgpu.wgmma(acc_ref, ds_smem.at[par, w].T, k_smem.at[w, :, cols])
                        return acc_ref[...]

                    dq = pl.run_scoped(body, plgpu.ACC((bqs, DQ_CHUNK), jnp.float32))
                    out = dq_smem.at[wg]
                    for c0 in range(0, DQ_CHUNK, store_cols):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the previous store left the buffer
                        out[...] = dq if store_cols == DQ_CHUNK else dq[:, c0:c0 + store_cols]
                        plgpu.commit_smem()
                        sub = pl.ds(j * DQ_CHUNK + c0, store_cols)
                        if interpret:
                            plgpu.copy_smem_to_gmem(out, dq_acc.at[kv_tile, b, rows, h, sub])
                        else:
                            plgpu.copy_smem_to_gmem(out, dq_acc.at[b, rows, h, sub], reduction_op="add")

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
            ds_T = ds_T.astype(qt.dtype)
            ds_smem.at[lax.rem(n, jnp.int32(2)), wg][...] = ds_T
            st = stage_smem.at[wg] if interpret else None
            dv = gc.mm_acc(dv, p_T, dot, st, interpret)
            dk = gc.mm_acc(dk, ds_T, qt, st, interpret)
            plgpu.barrier_arrive(cons.at[slot])
            dq_share(n, tile, g)
            return dk, dv

        def skip(n, tile, g):
            """A query block none of this warpgroup's keys see: zero dS^T, so the shared dQ chunks stay exact."""
            slot = lax.rem(n, jnp.int32(stages))
            wait_inputs(slot)
            ds_smem.at[lax.rem(n, jnp.int32(2)), wg][...] = jnp.zeros(ds_smem.shape[2:], ds_smem.dtype)
            plgpu.barrier_arrive(cons.at[slot])
            dq_share(n, tile, g)

        def head(g, carry):
            base = g * per_head - start_cta       # stream index of q tile `tile` of head g is base + tile

            def run(lo, hi, masked, carry):
                return lax.fori_loop(lo, hi, lambda tile, c: step(base + tile, c, tile, g, masked), carry)

            def skip_range(lo, hi):
                lax.fori_loop(lo, hi, lambda tile, _: skip(base + tile, tile, g), None)

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
        plgpu.wait_smem_to_gmem(0)
        kw_out, vw_out = k_smem.at[wg], v_smem.at[wg]
        plgpu.barrier_arrive(ds_ready.at[lax.rem(n_total, jnp.int32(2))])   # the other warpgroup may still
        plgpu.barrier_wait(ds_ready.at[lax.rem(n_total, jnp.int32(2))])     # read our K rows for its dQ
        kw_out[...] = (dk * scale).astype(kw_out.dtype)
        vw_out[...] = dv.astype(vw_out.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(kw_out, dk_ref.at[b, pl.ds(kv0, bk), kvh], commit_group=False)
        plgpu.copy_smem_to_gmem(vw_out, dv_ref.at[b, pl.ds(kv0, bk), kvh], commit_group=False)
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


def backward(q, k, v, q_seg, kv_seg, out, lse2, do, *, causal, scale, cap, kv_len, q_len,
             block_sizes: BlockSizes, interpret):
    """Padded inputs and forward residuals -> (dq, dk, dv) in the inputs' dtypes, from one fused kernel."""
    B, Tp, H, Dqk = q.shape
    Sp, KVH, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if Dqk % DQ_CHUNK:
        raise ValueError(f"the fused gpu backward needs Dqk a multiple of {DQ_CHUNK}; got {Dqk}")
    has_seg = q_seg is not None
    dtype, f32 = q.dtype, jnp.float32
    stages, bqs = block_sizes.num_stages, block_sizes.block_q_dkv
    wg, bk = gc.COMPUTE_WGS, gc.WG_ROWS
    n_kv = Sp // CTA_ROWS
    store_cols = DQ_CHUNK if Dqk + Dv <= 256 else DQ_CHUNK // 2   # MLA: 16 KB less shared memory
    ins = backward_inputs(q, k, v, q_seg, kv_seg, out, lse2, do, causal=causal, kv_len=kv_len, q_len=q_len,
                          block_sizes=block_sizes)
    if has_seg:
        ins = ins[:-1]   # the dQ-kernel bounds of the split backward are not needed here
    dq_acc = jax.new_ref(jnp.zeros(((n_kv,) if interpret else ()) + (B, Tp, H, Dqk), f32))
    types, rebuild = gc.assemble([
        gc.smem_tiles((wg, bk, Dqk), dtype), gc.smem_tiles((wg, bk, Dv), dtype),
        plgpu.SMEM((wg, bk), jnp.int32) if has_seg else None,
        gc.smem_tiles((stages, bqs, Dqk), dtype), gc.smem_tiles((stages, bqs, Dv), dtype),
        plgpu.SMEM((stages, bqs), f32), plgpu.SMEM((stages, bqs), f32),
        plgpu.SMEM((stages, bqs), jnp.int32) if has_seg else None,
        gc.smem_tiles((2, wg, bk, bqs), dtype),                  # dS^T, double-buffered by step parity
        plgpu.SMEM((wg, bqs, store_cols), f32),                    # dQ columns on their way to the reduce-add
        gc.smem_tiles((wg, bk, bqs), dtype) if interpret else None,
        plgpu.Barrier(num_barriers=(2, wg)), plgpu.Barrier(num_barriers=wg) if has_seg else None,
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages) if has_seg else None,
        plgpu.Barrier(num_arrivals=wg, num_barriers=stages),
        plgpu.Barrier(num_arrivals=wg, num_barriers=2),
    ])
    body = functools.partial(_fused_kernel, dq_acc=dq_acc, G=H // KVH, nqt=Tp // bqs, bqs=bqs, stages=stages,
                             has_seg=has_seg, causal_offset=(kv_len - q_len) if causal else None, scale=scale,
                             cap=cap, interpret=interpret)
    n_in = len(ins)
    dk, dv = plgpu.kernel(
        lambda *r: body(*r[:n_in + 2], *rebuild(r[n_in + 2:])),
        out_type=(jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype)),
        scratch_types=types, grid=(KVH, B, n_kv), grid_names=("h", "b", "kv"),
        num_threads=wg + 1, thread_name="wg", kernel_name="flash_bwd_fused",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=gc.INTERPRET_PARAMS if interpret else None)(*ins)
    dq_f32 = dq_acc[...]
    if interpret:
        dq_f32 = dq_f32.sum(axis=0)
    return (dq_f32 * scale).astype(dtype), dk, dv
