"""Mosaic GPU (Hopper, wgmma + TMA) flash-attention forward with soft-cap, segment ids and returned max logits.

Layout per CTA: 128 query rows (two compute warpgroups of 64, ping-ponging softmax against the tensor core through
a shared "schedule" barrier) and one memory warpgroup streaming K/V blocks. Causal CTAs stop at the diagonal; the
blocks left of it run without masks. With segment ids every warpgroup instead walks the key-block range that
gc.block_ranges computed for it (blocks of other documents are skipped, fully visible blocks run without masks).
Backward kernels live in gpu_bwd.py (dK/dV + dQ kernels, or one fused kernel with dQ by TMA reduce-add).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.attention import gpu_common as gc
from pallas_kernels.attention.block_sizes import BlockSizes

CTA_ROWS = gc.COMPUTE_WGS * gc.WG_ROWS


MAX_SMEM_BYTES = 232448  # shared memory one CTA may use on the H100/H200 (227 KB, what Mosaic GPU reports)
_SMEM_EXTRA = 2048  # what Mosaic GPU's forward took beyond its scratch list at Dqk/Dv = 256/192 (see smem_bytes)


def smem_bytes(Dqk: int, Dv: int, block_sizes: BlockSizes, has_seg: bool) -> dict[str, int]:
    """Shared memory of each kernel the call runs, {kernel name: bytes}, from the scratch lists in `forward`,
    gpu_bwd._dkv_call and gpu_bwd._dq_call: each buffer rounded up to 1 KB, 8 bytes per barrier, plus
    _SMEM_EXTRA for the forward and dQ kernels. Checked against Mosaic GPU's own count (the H200, and lowering for
    CUDA on CPU: tests/test_attention_aot.py): exact for the dK/dV kernel at Dqk = Dv = 256 (264,304 bytes) and the
    forward at 256/192 (233,560, which is 2,048 beyond its list); the dQ kernel's extra is assumed, not seen."""
    from pallas_kernels.attention import gpu_bwd
    wg, bq, st = gc.COMPUTE_WGS, gc.WG_ROWS, block_sizes.num_stages
    buf = lambda *shape_and_bytes: -(-math.prod(shape_and_bytes) // 1024) * 1024
    seg = int(has_seg)
    bk = block_sizes.block_kv
    fwd = (buf(wg, bq, Dqk, 2) + (0 if Dqk == Dv else buf(wg, bq, Dv, 2)) + buf(st, bk, Dqk, 2) + buf(st, bk, Dv, 2)
           + seg * (buf(wg, bq, 4) + buf(st, bk, 4)) + 2 * buf(wg, bq, 4)
           + 8 * (wg + seg * wg + 4 * st + seg * st + 1))
    bqs = block_sizes.block_q_dkv
    fused = gpu_bwd.fused_preferred(Dqk)
    store_cols = gpu_bwd.DQ_CHUNK if Dqk + Dv <= 256 else gpu_bwd.DQ_CHUNK // 2
    dkv = (buf(wg, bq, Dqk, 2) + buf(wg, bq, Dv, 2) + seg * buf(wg, bq, 4) + buf(st, bqs, Dqk, 2)
           + buf(st, bqs, Dv, 2) + 2 * buf(st, bqs, 4) + seg * buf(st, bqs, 4)
           + 8 * (2 * wg + seg * wg + 5 * st + seg * st)
           + fused * (buf(2, wg, bq, bqs, 2) + buf(wg, bqs, store_cols, 4) + 8 * 2))
    out = {"flash_fwd": fwd + _SMEM_EXTRA, "flash_bwd_fused" if fused else "flash_bwd_dkv": dkv}
    if not fused:
        bks = block_sizes.block_kv_dq
        out["flash_bwd_dq"] = (buf(wg, bq, Dqk, 2) + buf(wg, bq, Dv, 2) + buf(2, wg, bq, 4) + seg * buf(wg, bq, 4)
                               + buf(st, bks, Dqk, 2) + buf(st, bks, Dv, 2) + seg * buf(st, bks, 4)
                               + 8 * (4 * wg + seg * wg + 3 * st + seg * st) + _SMEM_EXTRA)
    return out


def check_gpu_shapes(q, k, v, block_sizes: BlockSizes, has_seg: bool = False):
    """Raise ValueError naming the constraint the Mosaic GPU kernels need that these inputs break."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"gpu attention needs q, k, v all bfloat16 or all float16 (wgmma operands); got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}: cast them, or use backend='reference'")
    for name, d in (("Dqk", q.shape[-1]), ("Dv", v.shape[-1])):
        if d % 64 or d > 256:
            raise ValueError(f"gpu attention needs {name} a multiple of 64 and <= 256 (swizzled tiles); got {d}")
    for name in ("block_kv", "block_q_dkv", "block_kv_dq"):
        b = getattr(block_sizes, name)
        if b % 64 or b > 256:
            raise ValueError(f"gpu attention needs BlockSizes.{name} a multiple of 64 and <= 256 (wgmma K tiles of "
                             f"the 128-byte swizzle); got {b}")
    Dqk, Dv = q.shape[-1], v.shape[-1]
    for kernel, used in smem_bytes(Dqk, Dv, block_sizes, has_seg).items():
        if used > MAX_SMEM_BYTES:
            raise ValueError(
                f"gpu attention at Dqk={Dqk}, Dv={Dv}{' with segment ids' if has_seg else ''}: kernel {kernel} needs "
                f"~{used} bytes of shared memory > {MAX_SMEM_BYTES} (227 KB per CTA on Hopper) with {block_sizes}; "
                "its stationary blocks are 128 rows and its ring at least 2 x 64 rows of both head dims, about "
                "512 x (Dqk + Dv) bytes plus 2-4 KB, so Dqk + Dv <= 384 (e.g. Dqk=256 with Dv <= 128, Dqk=192 with "
                "Dv <= 192); use backend='reference' or smaller heads")


def _fwd_kernel(*refs, G, nq, nkv, bk, stages, has_seg, causal_offset, kv_len, kv_padded, scale, cap,
                interpret):
    """Kernel body; refs = inputs, outputs, then the scratch listed in `forward`."""
    if has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, bnd_ref, out_ref, lse_ref, ml_ref, *scratch = refs
    else:
        q_ref, k_ref, v_ref, out_ref, lse_ref, ml_ref, *scratch = refs
        qs_ref = ks_ref = bnd_ref = None
    (q_smem, o_smem, k_smem, v_smem, qs_smem, ks_smem, lse_smem, ml_smem, p_stage,
     q_bar, qs_bar, k_bar, v_bar, s_bar, k_cons, v_cons, sched) = scratch
    bq = gc.WG_ROWS
    h = lax.axis_index("h")
    b = lax.axis_index("b")
    tile = (nq - 1) - lax.axis_index("q")          # heaviest causal tiles launch first
    wg = lax.axis_index("wg")
    q0_cta = tile * CTA_ROWS
    cta_lo = None                                  # key block streamed at step i is cta_lo + i (or i)
    if has_seg:                                    # segment-aware block range (block_ranges in the wrapper)
        cta_lo, cta_steps, _ = gc.read_ranges(bnd_ref, b, tile * gc.COMPUTE_WGS, None)
    elif causal_offset is None:
        cta_steps = jnp.int32(nkv)
    else:
        cta_steps = gc.clamp(gc.cdiv(q0_cta + CTA_ROWS + causal_offset, bk), 0, nkv)

    def sched_sync():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < gc.COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q0 = q0_cta + wg * bq
        qw, ow = q_smem.at[wg], o_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], qw, q_bar.at[wg])
        if has_seg:
            plgpu.copy_gmem_to_smem(qs_ref.at[b, pl.ds(q0, bq)], qs_smem.at[wg], qs_bar.at[wg])
        if has_seg:
            _, _, (s0, f0, f1, wg_steps) = gc.read_ranges(bnd_ref, b, tile * gc.COMPUTE_WGS, wg)
        elif causal_offset is None:
            wg_steps = jnp.int32(nkv)
            full = wg_steps
        else:
            wg_steps = gc.clamp(gc.cdiv(q0 + bq + causal_offset, bk), 0, nkv)
            full = gc.clamp(lax.div(q0 + causal_offset + 1, jnp.int32(bk)), 0, wg_steps)
            full = jnp.minimum(full, wg_steps)
        if not has_seg and kv_padded:
            full = jnp.minimum(full, jnp.int32(nkv - 1))
        plgpu.barrier_wait(q_bar.at[wg])
        q_seg = None
        if has_seg:
            plgpu.barrier_wait(qs_bar.at[wg])
            q_seg = plgpu.load(qs_smem.at[wg], layout=gc.ROW)

        def step(i, carry, masked):
            acc, m_raw, m2, l = carry
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])
            s = gc.mm_new(qw, k_smem.at[slot].T, between=sched_sync)
            plgpu.barrier_arrive(k_cons.at[slot])
            logit2, _ = gc.softcap_logits2(s, scale, cap)
            if masked and (causal_offset is not None or kv_padded or has_seg):
                kv_seg = None
                if has_seg:
                    plgpu.barrier_wait(s_bar.at[slot])
                    kv_seg = plgpu.load(ks_smem.at[slot], layout=gc.COL)
                col0 = (i if cta_lo is None else cta_lo + i) * bk
                mask = gc.visible(s.shape, q0, col0, rows_are_q=True, causal_offset=causal_offset,
                                  kv_len=kv_len, kv_padded=kv_padded, seg_rows=q_seg, seg_cols=kv_seg)
                s = jnp.where(mask, s, gc.MASK_S)
                logit2 = jnp.where(mask, logit2, -jnp.inf)
            elif has_seg:
                plgpu.barrier_wait(s_bar.at[slot])
            m_raw_new = jnp.maximum(m_raw, s.max(axis=1))
            if cap is None:
                m2_new = m_raw_new * (scale * gc.LOG2E)
            else:
                m2_new = jnp.tanh(m_raw_new * (scale / cap)) * (cap * gc.LOG2E)
            alpha = jnp.exp2(m2 - m2_new)
            p = jnp.exp2(logit2 - gc.bcast_rows(m2_new, logit2.shape))
            l = l * alpha + p.sum(axis=1)
            acc = acc * gc.bcast_rows(alpha, acc.shape)
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(v_bar.at[slot])
            plgpu.barrier_wait(sched)
            acc = gc.mm_acc(acc, p, v_smem.at[slot], p_stage.at[wg] if interpret else None, interpret)
            plgpu.barrier_arrive(v_cons.at[slot])
            return acc, m_raw_new, m2_new, l

        def drain(i, _):
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_arrive(k_cons.at[slot])
            sched_sync()
            if has_seg:
                plgpu.barrier_wait(s_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            sched_sync()
            plgpu.barrier_arrive(v_cons.at[slot])

        carry = (gc.zeros((bq, v_smem.shape[-1])), gc.row_full(bq, gc.MASK_S), gc.row_full(bq, -jnp.inf),
                 gc.row_full(bq, 0.0))
        pl.when(wg == 1)(sched_sync)
        carry = gc.walk_blocks(step, drain, carry, seg_steps=(s0, f0, f1) if has_seg else None,
                               full=None if has_seg else full, wg_steps=wg_steps, cta_steps=cta_steps)
        pl.when(wg == 0)(sched_sync)

        acc, m_raw, m2, l = carry
        seen = l > 0.0
        inv_l = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
        ow[...] = (acc * gc.bcast_rows(inv_l, acc.shape)).astype(ow.dtype)
        lse_smem.at[wg][...] = jnp.where(seen, m2 + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)
        ml_smem.at[wg][...] = jnp.where(m_raw > 0.5 * gc.MASK_S, m_raw * scale, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(ow, out_ref.at[b, pl.ds(q0, bq), h], commit_group=False)
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(q0, bq)], commit_group=False)
        plgpu.copy_smem_to_gmem(ml_smem.at[wg], ml_ref.at[b, h, pl.ds(q0, bq)], commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == gc.COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")
        kvh = lax.div(h, jnp.int32(G))

        def issue(i, slot):
            rows = pl.ds((i if cta_lo is None else cta_lo + i) * bk, bk)
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, kvh], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, kvh], v_smem.at[slot], v_bar.at[slot])
            if has_seg:
                plgpu.copy_gmem_to_smem(ks_ref.at[b, rows], ks_smem.at[slot], s_bar.at[slot])

        for i in range(stages):
            pl.when(i < cta_steps)(functools.partial(issue, i, i))

        @pl.loop(stages, jnp.maximum(cta_steps, stages))
        def _(i):
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(k_cons.at[slot])
            plgpu.barrier_wait(v_cons.at[slot])
            issue(i, slot)

        @pl.loop(jnp.maximum(cta_steps - stages, 0), cta_steps)
        def _(i):   # observe the last consumptions so that no barrier phase is left unobserved at exit
            slot = lax.rem(i, jnp.int32(stages))
            plgpu.barrier_wait(k_cons.at[slot])
            plgpu.barrier_wait(v_cons.at[slot])


def forward(q, k, v, q_seg, kv_seg, *, causal, scale, cap, kv_len, q_len, block_sizes: BlockSizes, interpret):
    """Padded inputs (T, S multiples of 128 / block_kv) -> (out[B,T,H,Dv], lse2[B,H,T] (log2 units), max_logits[B,H,T])."""
    B, Tp, H, Dqk = q.shape
    Sp, KVH, Dv = k.shape[1], k.shape[2], v.shape[-1]
    bk, stages = block_sizes.block_kv, block_sizes.num_stages
    nq, nkv = Tp // CTA_ROWS, Sp // bk
    has_seg = q_seg is not None
    dtype = q.dtype
    bq = gc.WG_ROWS
    kernel = functools.partial(
        _fwd_kernel, G=H // KVH, nq=nq, nkv=nkv, bk=bk, stages=stages, has_seg=has_seg,
        causal_offset=(kv_len - q_len) if causal else None, kv_len=kv_len, kv_padded=Sp != kv_len,
        scale=scale, cap=cap, interpret=interpret)
    f32 = jnp.float32
    types, rebuild = gc.assemble([
        gc.smem_tiles((gc.COMPUTE_WGS, bq, Dqk), dtype),
        None if Dqk == Dv else gc.smem_tiles((gc.COMPUTE_WGS, bq, Dv), dtype),   # else the output reuses q's
        gc.smem_tiles((stages, bk, Dqk), dtype),
        gc.smem_tiles((stages, bk, Dv), dtype),
        plgpu.SMEM((gc.COMPUTE_WGS, bq), jnp.int32) if has_seg else None,
        plgpu.SMEM((stages, bk), jnp.int32) if has_seg else None,
        plgpu.SMEM((gc.COMPUTE_WGS, bq), f32),
        plgpu.SMEM((gc.COMPUTE_WGS, bq), f32),
        gc.smem_tiles((gc.COMPUTE_WGS, bq, bk), dtype) if interpret else None,
        plgpu.Barrier(num_barriers=gc.COMPUTE_WGS),
        plgpu.Barrier(num_barriers=gc.COMPUTE_WGS) if has_seg else None,
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages) if has_seg else None,
        plgpu.Barrier(num_arrivals=gc.COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=gc.COMPUTE_WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=gc.COMPUTE_WGS),
    ])
    out_type = (jax.ShapeDtypeStruct((B, Tp, H, Dv), dtype), jax.ShapeDtypeStruct((B, H, Tp), f32),
                jax.ShapeDtypeStruct((B, H, Tp), f32))

    n_io = (6 if has_seg else 3) + 3

    def entry(*refs):
        scratch = rebuild(refs[n_io:])
        if scratch[1] is None:
            scratch[1] = scratch[0]
        kernel(*refs[:n_io], *scratch)

    call = plgpu.kernel(
        entry, out_type=out_type, scratch_types=types,
        grid=(H, B, nq), grid_names=("h", "b", "q"), num_threads=gc.COMPUTE_WGS + 1, thread_name="wg",
        kernel_name="flash_fwd",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=gc.INTERPRET_PARAMS if interpret else None)
    if has_seg:
        bounds = gc.block_ranges(q_seg, kv_seg, row_tile=bq, col_block=bk, rows_are_q=True,
                                 causal_offset=(kv_len - q_len) if causal else None, kv_len=kv_len)
        args = (q, k, v, q_seg, kv_seg, bounds)
    else:
        args = (q, k, v)
    return call(*args)
