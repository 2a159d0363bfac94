"""Mosaic GPU (Hopper wgmma) grouped matmul kernels: gmm (rows grouped) and tgmm (per-group weight gradient).

Both are persistent kernels (one CTA per SM) with three warpgroups: one issues TMA loads, two run wgmma on
halves of the output tile. gmm tiles start at each group's start rounded down to 8 rows (TMA into tiled shared
memory), so no tile computes two groups; a tile's own rows are stored with a ladder of power-of-two TMA stores.
Rows beyond sum(group_sizes) are written as zeros. tgmm masks the rows of neighbouring groups in its edge blocks.
tgmm_kmajor (the fp8 weight gradient) reads both operands K-major, [K, P] and [N, P] with the contraction dim P
minor (wgmma takes 8-bit operands only so), in a group-padded layout: group g's rows start at a multiple of tm
and its padding is zeros, so no block holds two groups and nothing needs masking.

Any row count M works: M is zero-padded up to a multiple of 8 (and at least one tile) inside the op, the padded
rows fall in the tail past the groups (written as zeros, then sliced off). With tiling=None, tk and tn shrink to
divide K and N (e.g. N=384 -> tn=128); where no legal block divides them, the error names the constraint.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import hopper
from pallas_kernels.moe import tiling as tiling_lib
from pallas_kernels.moe.tiling import Tiling

DEFAULT_GMM = Tiling(tm=128, tk=64, tn=256, stages=3)
DEFAULT_GMM_FP8 = Tiling(tm=128, tk=128, tn=256, stages=3)  # 128-byte rows of K: one swizzle width of fp8
DEFAULT_TGMM = Tiling(tm=64, tk=128, tn=256, stages=3)
DEFAULT_TGMM_KMAJOR = Tiling(tm=128, tk=128, tn=256, stages=3)  # tm: contraction block, one 128-byte fp8 row
_ALIGN = 8  # TMA into (8, 64)-tiled shared memory needs row offsets that are multiples of 8


def _store_rows(src_smem, dst_gmem_rows, start, count, max_rows):
    """TMA-store rows [start, start+count) (dynamic; count <= max_rows) of src_smem [R, C] with a ladder of
    power-of-two stores (TMA boxes are static); dst_gmem_rows(off, p) is the target of rows [off, off+p)."""
    off = start
    p = 1 << (max_rows.bit_length() - 1)
    while p >= 1:
        @pl.when((count & p) != 0)
        def _(off=off, p=p):
            plgpu.copy_smem_to_gmem(src_smem.at[pl.ds(off, p)], dst_gmem_rows(off, p))
        off = off + (count & p)
        p //= 2


def default_gmm_tiling(k: int, n: int, dtype) -> Tiling:
    """DEFAULT_GMM (DEFAULT_GMM_FP8 for 8-bit operands) with tn shrunk to divide N; ValueError naming the
    constraint when K or N admits no legal block."""
    base = DEFAULT_GMM_FP8 if jnp.dtype(dtype).itemsize == 1 else DEFAULT_GMM
    tk = tiling_lib.pick_block(k, (base.tk,))  # one 128-byte swizzle row: the smallest legal tk
    tn = tiling_lib.pick_block(n, (base.tn, 128))  # two warpgroups of >= 64 columns
    if tk is None or tn is None:
        raise ValueError(
            f"gmm on GPU: [M,K={k}] x rhs -> [M,N={n}] needs K % {base.tk} == 0 (one 128-byte swizzle row of "
            f"{jnp.dtype(dtype).name}) and N % 128 == 0 (two wgmma halves of 64 columns); zero-pad the weights' "
            "K/N up to those multiples (and slice the output), or use backend='reference'")
    return dataclasses.replace(base, tk=tk, tn=tn)


def default_tgmm_tiling(k: int, n: int) -> Tiling:
    """DEFAULT_TGMM with tn shrunk to divide N; ValueError naming the constraint when none can."""
    tk = tiling_lib.pick_block(k, (DEFAULT_TGMM.tk,))
    tn = tiling_lib.pick_block(n, (DEFAULT_TGMM.tn, 128, 64))
    if tk is None or tn is None:
        raise ValueError(
            f"tgmm on GPU: out [E,K={k},N={n}] needs K % 128 == 0 (two warpgroups of 64 rows) and N % 64 == 0 "
            "(swizzled 128-byte tiles); zero-pad K/N up to those multiples, or use backend='reference'")
    return dataclasses.replace(DEFAULT_TGMM, tk=tk, tn=tn)


def default_tgmm_kmajor_tiling(k: int, n: int, dtype) -> Tiling:
    """DEFAULT_TGMM_KMAJOR (tm = one 128-byte swizzle row of `dtype`) with tn shrunk to divide N; ValueError
    naming the constraint when K or N admits no legal block."""
    tm = 128 // jnp.dtype(dtype).itemsize
    tk = tiling_lib.pick_block(k, (DEFAULT_TGMM_KMAJOR.tk, 64))
    tn = tiling_lib.pick_block(n, (DEFAULT_TGMM_KMAJOR.tn, 128))
    if tk is None or tn is None:
        raise ValueError(
            f"tgmm_kmajor on GPU: out [E,K={k},N={n}] needs K % 64 == 0 (wgmma rows) and N % 128 == 0 (two "
            "warpgroups of 64 columns); zero-pad K/N up to those multiples, or use backend='reference'")
    return dataclasses.replace(DEFAULT_TGMM_KMAJOR, tm=tm, tk=tk, tn=tn)


def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs=False, out_dtype=None, tiling: Tiling | None = None,
        interpret=False, scales_E=None):
    """out[M,N] = lhs rows of group g @ rhs[g] ([E,K,N], or [E,N,K] when transpose_rhs); rows past the groups are 0.

    fp8 operands (e4m3/e5m2, mixed allowed) need transpose_rhs=True (wgmma reads 8-bit operands K-major only);
    `scales_E` (float32 [E], optional) multiplies group g's fp32 accumulator before the cast to out_dtype."""
    hopper.check_wgmma_dtypes(lhs_MxK, rhs, "gmm", allow_fp8=True)
    fp8 = jnp.dtype(lhs_MxK.dtype).itemsize == 1
    if fp8 and not transpose_rhs:
        raise ValueError("gmm on GPU with fp8 operands needs rhs as [E,N,K] (transpose_rhs=True): wgmma reads "
                         "8-bit operands K-major only; transpose the quantized weights once")
    out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
    m, k, n, num_experts = tiling_lib.gmm_dims(lhs_MxK, rhs, transpose_rhs)
    t = tiling or default_gmm_tiling(k, n, lhs_MxK.dtype)
    tm, tk, tn = t.tm, t.tk, t.tn
    tk_align = 128 // jnp.dtype(lhs_MxK.dtype).itemsize  # one 128-byte swizzle row
    if tm % 64 or tk % tk_align or tn % 128 or k % tk or n % tn:
        raise ValueError(
            f"gmm GPU tiling {t} needs tm % 64 == 0, tk % {tk_align} == 0 ({lhs_MxK.dtype}), tn % 128 == 0, "
            f"K={k} % tk == 0 and N={n} % tn == 0; pass a Tiling that divides the shape, or tiling=None to pick one")
    if scales_E is not None and scales_E.shape != (num_experts,):
        raise ValueError(f"gmm: scales_E must be [E={num_experts}] float32, got {scales_E.shape}")
    m_pad = max(tm, tiling_lib.round_up(m, _ALIGN))
    if m_pad != m:  # TMA: rows a multiple of 8, boxes no larger than the array. Padded rows = tail past the groups
        out = gmm(jnp.pad(lhs_MxK, ((0, m_pad - m), (0, 0))), rhs, group_sizes_E, transpose_rhs=transpose_rhs,
                  out_dtype=out_dtype, tiling=t, interpret=interpret, scales_E=scales_E)
        return out[:m]
    # group E (rows past the groups) writes a zero accumulator; its scale is never used
    scales = (jnp.ones((num_experts + 1,), jnp.float32) if scales_E is None else
              jnp.concatenate([scales_E.astype(jnp.float32), jnp.ones((1,), jnp.float32)]))
    sizes = tiling_lib.with_tail_group(group_sizes_E, m)
    max_tiles = tiling_lib.max_group_tiles(m, tm, num_experts + 1, _ALIGN)
    meta = tiling_lib.group_tiles(sizes, tm, max_tiles, _ALIGN)
    grid_n = n // tn
    half_n = tn // 2
    transforms = hopper.swizzled_transforms(lhs_MxK.dtype)
    stages = max(2, min(t.stages, k // tk))

    def mma(_, lhs_smem, rhs_smem, acc_ref):
        cols = pl.ds(pl.multiple_of(lax.axis_index("wg") * half_n, half_n), half_n)
        b = rhs_smem.at[cols].T if transpose_rhs else rhs_smem.at[:, cols]
        plgpu.wgmma(acc_ref, lhs_smem, b)
        plgpu.wgmma_wait(0)
        return acc_ref

    rhs_block = (tn, tk) if transpose_rhs else (tk, tn)

    def make_pipeline(row0, ni, epilogue):
        def compute_context(run):
            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, half_n), jnp.float32))
            def _(acc_ref):
                run(acc_ref)
                epilogue(acc_ref)

        return plgpu.emit_pipeline_warp_specialized(
            mma,
            grid=(k // tk,),
            memory_registers=hopper.MEMORY_REGISTERS,
            in_specs=[
                plgpu.BlockSpec((pl.Element(tm), tk), lambda kk: (row0, kk), transforms=transforms),
                plgpu.BlockSpec(rhs_block, (lambda kk: (ni, kk)) if transpose_rhs else (lambda kk: (kk, ni)),
                                transforms=transforms),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=stages,
            compute_context=compute_context,
        )

    def body(gid_ref, start_ref, lo_ref, hi_ref, scale_ref, lhs_gmem, rhs_gmem, out_gmem):
        ignore = lambda *_, **__: None
        allocs = make_pipeline(0, 0, ignore).get_allocations(lhs_gmem, rhs_gmem.at[0])

        @functools.partial(
            pl.run_scoped, allocs=allocs, out_smem=plgpu.SMEM((2, tm, half_n), out_dtype), collective_axes="wg")
        def _(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((max_tiles * grid_n,), collective_axes="sm")
            def _(info):
                (lin,) = info.index
                tile, ni = lin // grid_n, lin % grid_n
                g, lo, hi = gid_ref[tile], lo_ref[tile], hi_ref[tile]
                row0 = pl.multiple_of(start_ref[tile], _ALIGN)

                def epilogue(acc_ref):
                    acc = acc_ref[...]
                    if scales_E is not None:
                        acc = acc * scale_ref[g]
                    acc = acc.astype(out_dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile's stores have read out_smem
                    out_smem.at[wg][...] = acc
                    plgpu.commit_smem()
                    cols = pl.ds(ni * tn + wg * half_n, half_n)
                    _store_rows(out_smem.at[wg], lambda off, p: out_gmem.at[pl.ds(row0 + off, p), cols], lo,
                                hi - lo, min(tm, m))

                @pl.when((hi > 0) & (g < num_experts))
                def _():
                    make_pipeline(row0, ni, epilogue)(lhs_gmem, rhs_gmem.at[g], allocations=allocs)

                @pl.when((hi > 0) & (g == num_experts) & (wg < 2))
                def _():
                    pl.run_scoped(epilogue, plgpu.ACC((tm, half_n), jnp.float32))  # zero accumulator

            @pl.when(wg < 2)
            def _():
                plgpu.wait_smem_to_gmem(0)

    kernel = hopper.persistent_kernel(body, jax.ShapeDtypeStruct((m, n), out_dtype), interpret)
    return kernel(meta.group_ids, meta.row_start, meta.lo, meta.hi, scales, lhs_MxK, rhs)


def tgmm(lhs_MxK, rhs_MxN, group_sizes_E, *, out_dtype=None, tiling: Tiling | None = None, interpret=False):
    """out[E,K,N] = lhs[rows of g].T @ rhs[rows of g]; empty groups give zeros. Note lhs is row-major [M,K]."""
    hopper.check_wgmma_dtypes(lhs_MxK, rhs_MxN, "tgmm")
    out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
    m, k = lhs_MxK.shape
    m2, n = rhs_MxN.shape
    if m != m2:
        raise ValueError(f"tgmm: lhs has {m} rows, rhs has {m2}")
    t = tiling or default_tgmm_tiling(k, n)
    num_experts = group_sizes_E.shape[0]
    tm, tk, tn = t.tm, t.tk, t.tn
    if tm % 64 or tk % 128 or tn % 64 or k % tk or n % tn:
        raise ValueError(
            f"tgmm GPU tiling {t} needs tm % 64 == 0, tk % 128 == 0, tn % 64 == 0, K={k} % tk == 0 and "
            f"N={n} % tn == 0; pass a Tiling that divides the shape, or tiling=None to pick one")
    m_pad = max(tm, tiling_lib.round_up(m, _ALIGN))
    if m_pad != m:  # as in gmm; the zero rows past the groups belong to no group
        pad = ((0, m_pad - m), (0, 0))
        return tgmm(jnp.pad(lhs_MxK, pad), jnp.pad(rhs_MxN, pad), group_sizes_E, out_dtype=out_dtype, tiling=t,
                    interpret=interpret)
    offsets = tiling_lib.group_offsets(group_sizes_E)
    starts, ends = offsets[:-1], offsets[1:]
    bases = starts // _ALIGN * _ALIGN
    grid_k, grid_n = k // tk, n // tn
    half_k = tk // 2
    transforms = hopper.swizzled_transforms(lhs_MxK.dtype)

    def body(starts_ref, ends_ref, bases_ref, lhs_gmem, rhs_gmem, out_gmem):
        wg = lax.axis_index("wg")

        @functools.partial(
            pl.run_scoped, out_smem=plgpu.SMEM((2, half_k, tn), out_dtype, transforms=transforms),
            collective_axes="wg")
        def _(out_smem):
            @plgpu.nd_loop((num_experts * grid_k * grid_n,), collective_axes="sm")
            def _(info):
                (lin,) = info.index
                g = lin // (grid_k * grid_n)
                ki = (lin // grid_n) % grid_k
                ni = lin % grid_n
                start, end = starts_ref[g], ends_ref[g]
                base = pl.multiple_of(bases_ref[g], _ALIGN)
                steps = (end - base + tm - 1) // tm

                def epilogue(acc_ref):
                    acc = acc_ref[...].astype(out_dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    out_smem.at[wg][...] = acc
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg], out_gmem.at[g, pl.ds(ki * tk + wg * half_k, half_k), pl.ds(ni * tn, tn)])

                def mma(idx, lhs_smem, rhs_smem, acc_ref):
                    (step,) = idx
                    a = lhs_smem.at[:, pl.ds(pl.multiple_of(wg * half_k, half_k), half_k)]
                    chunk = base + step * tm
                    first_partial = (step == 0) & (start != base)
                    last_partial = (step == steps - 1) & ((end - base) % tm != 0)

                    @pl.when(first_partial | last_partial)
                    def _():  # zero the block's rows that belong to the neighbouring groups
                        rows = lax.broadcasted_iota(jnp.int32, (tm, half_k), 0)
                        rows = plgpu.layout_cast(rows, plgpu.Layout.WGMMA)
                        keep = ((rows >= start - chunk) & (rows < end - chunk)).astype(a.dtype)
                        a[...] = a[...] * keep
                        plgpu.commit_smem()

                    plgpu.wgmma(acc_ref, a.T, rhs_smem)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                def compute_context(run):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((half_k, tn), jnp.float32))
                    def _(acc_ref):
                        run(acc_ref)
                        epilogue(acc_ref)

                @pl.when(end > start)
                def _():
                    plgpu.emit_pipeline_warp_specialized(
                        mma,
                        grid=(steps,),
                        memory_registers=hopper.MEMORY_REGISTERS,
                        in_specs=[
                            plgpu.BlockSpec((pl.Element(tm), tk),
                                            lambda s: (pl.multiple_of(base + s * tm, _ALIGN), ki),
                                            transforms=transforms),
                            plgpu.BlockSpec((pl.Element(tm), tn),
                                            lambda s: (pl.multiple_of(base + s * tm, _ALIGN), ni),
                                            transforms=transforms),
                        ],
                        wg_axis="wg",
                        num_compute_wgs=2,
                        max_concurrent_steps=t.stages,
                        compute_context=compute_context,
                    )(lhs_gmem, rhs_gmem)

                @pl.when((end == start) & (wg < 2))
                def _():
                    pl.run_scoped(epilogue, plgpu.ACC((half_k, tn), jnp.float32))

            @pl.when(wg < 2)
            def _():
                plgpu.wait_smem_to_gmem(0)

    kernel = hopper.persistent_kernel(body, jax.ShapeDtypeStruct((num_experts, k, n), out_dtype), interpret)
    return kernel(starts, ends, bases, lhs_MxK, rhs_MxN)


def tgmm_kmajor(lhs_KxP, rhs_NxP, group_sizes_E, *, out_dtype=jnp.bfloat16, tiling: Tiling | None = None,
                interpret=False, scales_E=None):
    """out[E,K,N] = lhs[:, cols of g] @ rhs[:, cols of g]^T (* scales_E[g]) on the group-padded layout.

    Group g owns columns [o[g], o[g+1]) with o = tiling.padded_group_offsets(group_sizes, tm) (its size rounded
    up to tm, the padding zeros: pallas_kernels/moe/fp8.py `kmajor_by_group` makes it); P % tm == 0 and
    P >= o[E]. Operands fp8 (e4m3/e5m2, mixed allowed) or one 16-bit dtype; fp32 accumulation; empty groups 0."""
    hopper.check_wgmma_dtypes(lhs_KxP, rhs_NxP, "tgmm_kmajor", allow_fp8=True)
    if lhs_KxP.ndim != 2 or rhs_NxP.ndim != 2 or lhs_KxP.shape[1] != rhs_NxP.shape[1]:
        raise ValueError(f"tgmm_kmajor: want lhs[K,P], rhs[N,P]; got {lhs_KxP.shape}, {rhs_NxP.shape}")
    k, p = lhs_KxP.shape
    n = rhs_NxP.shape[0]
    num_experts = group_sizes_E.shape[0]
    t = tiling or default_tgmm_kmajor_tiling(k, n, lhs_KxP.dtype)
    tm, tk, tn = t.tm, t.tk, t.tn
    tm_align = 128 // jnp.dtype(lhs_KxP.dtype).itemsize  # one 128-byte swizzle row of the contraction dim
    if tm % tm_align or tk % 64 or tn % 128 or k % tk or n % tn or p % tm:
        raise ValueError(
            f"tgmm_kmajor GPU tiling {t} needs tm % {tm_align} == 0 ({lhs_KxP.dtype}), tk % 64 == 0, "
            f"tn % 128 == 0, K={k} % tk == 0, N={n} % tn == 0 and P={p} % tm == 0; pass a Tiling that divides "
            "the shape, or tiling=None to pick one")
    if scales_E is not None and scales_E.shape != (num_experts,):
        raise ValueError(f"tgmm_kmajor: scales_E must be [E={num_experts}] float32, got {scales_E.shape}")
    scales = jnp.ones((num_experts,), jnp.float32) if scales_E is None else scales_E.astype(jnp.float32)
    offsets = tiling_lib.padded_group_offsets(group_sizes_E, tm)
    first_block, n_blocks = offsets[:-1] // tm, (offsets[1:] - offsets[:-1]) // tm
    grid_k, grid_n = k // tk, n // tn
    half_n = tn // 2
    transforms = hopper.swizzled_transforms(lhs_KxP.dtype)

    def mma(_, lhs_smem, rhs_smem, acc_ref):
        cols = pl.ds(pl.multiple_of(lax.axis_index("wg") * half_n, half_n), half_n)
        plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.at[cols].T)
        plgpu.wgmma_wait(0)
        return acc_ref

    def make_pipeline(block0, ki, ni, steps, epilogue):
        def compute_context(run):
            @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tk, half_n), jnp.float32))
            def _(acc_ref):
                run(acc_ref)
                epilogue(acc_ref)

        return plgpu.emit_pipeline_warp_specialized(
            mma,
            grid=(steps,),
            memory_registers=hopper.MEMORY_REGISTERS,
            in_specs=[plgpu.BlockSpec((tk, tm), lambda s: (ki, block0 + s), transforms=transforms),
                      plgpu.BlockSpec((tn, tm), lambda s: (ni, block0 + s), transforms=transforms)],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=t.stages,
            compute_context=compute_context,
        )

    def body(first_ref, blocks_ref, scale_ref, lhs_gmem, rhs_gmem, out_gmem):
        ignore = lambda *_, **__: None
        # a static grid of `stages` steps: the pipeline's buffers for its deepest use (a dynamic grid uses them all)
        allocs = make_pipeline(0, 0, 0, t.stages, ignore).get_allocations(lhs_gmem, rhs_gmem)

        @functools.partial(
            pl.run_scoped, allocs=allocs, out_smem=plgpu.SMEM((2, tk, half_n), out_dtype), collective_axes="wg")
        def _(allocs, out_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((num_experts * grid_k * grid_n,), collective_axes="sm")
            def _(info):
                (lin,) = info.index
                g = lin // (grid_k * grid_n)
                ki = (lin // grid_n) % grid_k
                ni = lin % grid_n
                steps = blocks_ref[g]

                def epilogue(acc_ref):
                    acc = (acc_ref[...] * scale_ref[g]).astype(out_dtype)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # previous tile's store has read out_smem
                    out_smem.at[wg][...] = acc
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(
                        out_smem.at[wg], out_gmem.at[g, pl.ds(ki * tk, tk), pl.ds(ni * tn + wg * half_n, half_n)])

                @pl.when(steps > 0)
                def _():
                    make_pipeline(first_ref[g], ki, ni, steps, epilogue)(lhs_gmem, rhs_gmem, allocations=allocs)

                @pl.when((steps == 0) & (wg < 2))
                def _():
                    pl.run_scoped(epilogue, plgpu.ACC((tk, half_n), jnp.float32))  # empty group: zeros

            @pl.when(wg < 2)
            def _():
                plgpu.wait_smem_to_gmem(0)

    kernel = hopper.persistent_kernel(body, jax.ShapeDtypeStruct((num_experts, k, n), out_dtype), interpret)
    return kernel(first_block, n_blocks, scales, lhs_KxP, rhs_NxP)
