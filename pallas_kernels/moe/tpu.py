"""Mosaic TPU grouped matmul kernels: gmm (rows grouped) and tgmm (per-group weight gradient).

Group metadata (group offsets, visit -> group id, visit -> m tile, number of visits) is computed in jnp and
passed by scalar prefetch; the grid is bounded statically by tiles_m + groups - 1 visits. An m tile that holds
rows of several groups is visited once per group, consecutively, and each visit writes only its group's rows.
Any M works (zero-padded to a multiple of 128 inside the op); with tiling=None, tk and tn shrink to divide K and N.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.moe import tiling as tiling_lib
from pallas_kernels.moe.tiling import Tiling

DEFAULT_GMM = Tiling(tm=512, tk=1024, tn=1024)
DEFAULT_TGMM = Tiling(tm=512, tk=1024, tn=1024)
_VMEM_LIMIT = 64 * 1024 * 1024
_M_ALIGN = 128  # M is padded to this inside the ops (lane dim of tgmm's lhs blocks; blocks never exceed the array)


def _interpret_params(interpret):
    if not interpret:
        return False
    return interpret if isinstance(interpret, pltpu.InterpretParams) else pltpu.InterpretParams()


def _fit(block: int, dim: int, align: int, name: str, what: str, auto: bool = False) -> int:
    """Clip a block size to the dimension; it must divide it and be a multiple of `align` (or equal it).
    auto (the default tiling): else the largest multiple of `align` below `block` that divides dim."""
    block = min(block, dim)
    if auto and (dim % block or block % align) and block != dim:
        block = next((b for b in range(block // align * align, 0, -align) if dim % b == 0), block)
    if dim % block or (block != dim and block % align):
        raise ValueError(
            f"{what} TPU tiling: {name}={block} must divide {dim} and be a multiple of {align} (or equal {dim}); "
            + (f"no such block exists: zero-pad that dimension to a multiple of {align}" if auto else
               "pass a Tiling that fits the shape, or tiling=None to pick one"))
    return block


def _sublane(dtype) -> int:
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs=False, out_dtype=None, tiling: Tiling | None = None,
        interpret=False, scales_E=None):
    """out[M,N] = lhs rows of group g @ rhs[g] ([E,K,N], or [E,N,K] when transpose_rhs); rows past the groups are 0.

    fp8 operands (storage only: v5p/v6e have no fp8 MXU) are dequantized to bf16 in the kernel; `scales_E`
    (float32 [E], optional) multiplies group g's fp32 accumulator before the cast to out_dtype."""
    t = tiling or DEFAULT_GMM
    fp8 = jnp.dtype(lhs_MxK.dtype).itemsize == 1 or jnp.dtype(rhs.dtype).itemsize == 1
    out_dtype = jnp.dtype(out_dtype or lhs_MxK.dtype)
    m, k, n, num_experts = tiling_lib.gmm_dims(lhs_MxK, rhs, transpose_rhs)
    if m % _M_ALIGN:  # any M: zero rows up to a multiple of 128 fall in the tail past the groups (zeros), sliced off
        out = gmm(jnp.pad(lhs_MxK, ((0, tiling_lib.round_up(m, _M_ALIGN) - m), (0, 0))), rhs, group_sizes_E,
                  transpose_rhs=transpose_rhs, out_dtype=out_dtype, tiling=tiling, interpret=interpret,
                  scales_E=scales_E)
        return out[:m]
    tm = min(t.tm, -(-m // _sublane(lhs_MxK.dtype)) * _sublane(lhs_MxK.dtype))
    if tm % _sublane(lhs_MxK.dtype):
        raise ValueError(f"gmm TPU tiling: tm={tm} must be a multiple of {_sublane(lhs_MxK.dtype)}")
    tk = _fit(t.tk, k, 128, "tk", "gmm", auto=tiling is None)
    tn = _fit(t.tn, n, 128, "tn", "gmm", auto=tiling is None)
    sizes = tiling_lib.with_tail_group(group_sizes_E, m)  # group E: rows past sum(group_sizes), written as 0
    meta = tiling_lib.aligned_visits(sizes, m, tm, visit_empty=False)
    num_visits_max = meta.group_ids.shape[0]
    dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
    if scales_E is not None and scales_E.shape != (num_experts,):
        raise ValueError(f"gmm: scales_E must be [E={num_experts}] float32, got {scales_E.shape}")
    scales = (jnp.ones((num_experts + 1,), jnp.float32) if scales_E is None else
              jnp.concatenate([scales_E.astype(jnp.float32), jnp.ones((1,), jnp.float32)]))
    compute = jnp.bfloat16 if fp8 else None

    def kernel(offsets_ref, gid_ref, mtile_ref, nv_ref, scale_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        v, kk = pl.program_id(1), pl.program_id(2)
        g = gid_ref[v]
        active = v < nv_ref[0]

        @pl.when(kk == 0)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active & (g < num_experts))
        def _():
            lhs, rhs_blk = lhs_ref[...], rhs_ref[...]
            if compute is not None:
                lhs, rhs_blk = lhs.astype(compute), rhs_blk.astype(compute)
            acc_ref[...] += lax.dot_general(lhs, rhs_blk, dims, preferred_element_type=jnp.float32)

        @pl.when(active & (kk == pl.num_programs(2) - 1))
        def _():
            rows = mtile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            mine = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
            acc = acc_ref[...] if scales_E is None else acc_ref[...] * scale_ref[g]
            out_ref[...] = jnp.where(mine, acc.astype(out_dtype), out_ref[...])

    def rhs_map(ni, v, kk, offs, gid, mt, nv, sc):
        g = jnp.minimum(gid[v], num_experts - 1)
        return (g, ni, kk) if transpose_rhs else (g, kk, ni)

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(n // tn, num_visits_max, k // tk),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda ni, v, kk, offs, gid, mt, nv, sc: (mt[v], kk)),
                pl.BlockSpec(rhs_block, rhs_map),
            ],
            out_specs=pl.BlockSpec((tm, tn), lambda ni, v, kk, offs, gid, mt, nv, sc: (mt[v], ni)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=_VMEM_LIMIT),
        interpret=_interpret_params(interpret),
        name="moe_gmm",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, meta.num_visits, scales, lhs_MxK, rhs)


def tgmm(lhs_KxM, rhs_MxN, group_sizes_E, *, out_dtype=None, tiling: Tiling | None = None, interpret=False):
    """out[E,K,N] = lhs[:, rows of g] @ rhs[rows of g]; empty groups give zeros; rows past the groups are ignored."""
    t = tiling or DEFAULT_TGMM
    out_dtype = jnp.dtype(out_dtype or lhs_KxM.dtype)
    k, m = lhs_KxM.shape
    m2, n = rhs_MxN.shape
    if m != m2:
        raise ValueError(f"tgmm: lhs is [K={k}, M={m}] but rhs has {m2} rows")
    if m % _M_ALIGN:  # any M: the zero rows past the groups belong to no group
        pad = tiling_lib.round_up(m, _M_ALIGN) - m
        return tgmm(jnp.pad(lhs_KxM, ((0, 0), (0, pad))), jnp.pad(rhs_MxN, ((0, pad), (0, 0))), group_sizes_E,
                    out_dtype=out_dtype, tiling=tiling, interpret=interpret)
    num_experts = group_sizes_E.shape[0]
    tm = min(t.tm, -(-m // 128) * 128)
    if tm % 128:
        raise ValueError(f"tgmm TPU tiling: tm={tm} (lane dim of lhs blocks) must be a multiple of 128")
    tk = _fit(t.tk, k, _sublane(lhs_KxM.dtype), "tk", "tgmm", auto=tiling is None)
    tn = _fit(t.tn, n, 128, "tn", "tgmm", auto=tiling is None)
    meta = tiling_lib.aligned_visits(group_sizes_E.astype(jnp.int32), m, tm, visit_empty=True)
    num_visits_max = meta.group_ids.shape[0]

    def kernel(offsets_ref, gid_ref, mtile_ref, nv_ref, lhs_ref, rhs_ref, out_ref, acc_ref):
        v = pl.program_id(2)
        g = gid_ref[v]
        active = v < nv_ref[0]
        first = (v == 0) | (gid_ref[jnp.maximum(v - 1, 0)] != g)
        last = (v == nv_ref[0] - 1) | (gid_ref[jnp.minimum(v + 1, num_visits_max - 1)] != g)

        @pl.when(active & first)
        def _():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(active)
        def _():
            start, end = offsets_ref[g], offsets_ref[g + 1]
            cols = mtile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tk, tm), 1)
            rows = mtile_ref[v] * tm + lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            lhs = jnp.where((cols >= start) & (cols < end), lhs_ref[...], 0)
            rhs = jnp.where((rows >= start) & (rows < end), rhs_ref[...], 0)
            acc_ref[...] += jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)

        @pl.when(active & last)
        def _():
            out_ref[...] = acc_ref[...].astype(out_dtype)

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_experts, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(k // tk, n // tn, num_visits_max),
            in_specs=[
                pl.BlockSpec((tk, tm), lambda ki, ni, v, offs, gid, mt, nv: (ki, mt[v])),
                pl.BlockSpec((tm, tn), lambda ki, ni, v, offs, gid, mt, nv: (mt[v], ni)),
            ],
            out_specs=pl.BlockSpec((None, tk, tn), lambda ki, ni, v, offs, gid, mt, nv: (gid[v], ki, ni)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=_VMEM_LIMIT),
        interpret=_interpret_params(interpret),
        name="moe_tgmm",
    )
    return call(meta.offsets, meta.group_ids, meta.m_tile_ids, meta.num_visits, lhs_KxM, rhs_MxN)
