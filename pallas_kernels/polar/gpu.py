"""Mosaic GPU (Hopper wgmma) kernel: out[b] = alpha[b] x[b] x[b]^T + beta[b] c[b] + gamma[b] I, symmetric, one pass.

Muon's polar iteration needs two symmetric products: the Gram matrix X X^T of an m x n matrix (K = n; X stored
either [m, n] or, for tall matrices, [n, m] with `transposed=True`, giving X^T X) and the step polynomial
I + A + kappa A^2 of a symmetric A (x = c = A, since A A^T = A^2). The output is symmetric (c must be), so the kernel
computes only the 128 x 128 tiles on and above the diagonal (21 of 36 at m = 768) and stores each off-diagonal tile
twice, the second time through a transposed shared-memory view. One persistent kernel: a CTA per SM, one TMA
warpgroup streaming K blocks of both operands, two wgmma warpgroups on the two 64-column halves of a tile; the
epilogue adds the c tile (fetched by TMA while the tile's matmul runs) and the identity before the bf16 stores.
XLA instead runs cuBLAS on the full square and the affine part as a separate elementwise pass over [B, M, M].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import hopper
from pallas_kernels.moe.tiling import Tiling

DEFAULT = Tiling(tm=128, tk=64, tn=128, stages=3)  # fastest of benchmarks/polar_kernel.py's sweep at 128 x 768^2
F32 = jnp.float32


def tiling_for(m: int, k: int) -> Tiling | None:
    """DEFAULT when it divides an M x M output with contraction K; None otherwise."""
    return DEFAULT if m % DEFAULT.tm == 0 and k % DEFAULT.tk == 0 else None


def gram_affine(x, c_BxMxM, alpha_B, beta_B, gamma_B, *, transposed: bool = False, tiling: Tiling | None = None,
                interpret=False):
    """[B, M, M] in x's dtype = alpha x x^T + beta c + gamma I (x [B, M, K]; [B, K, M] and x^T x if transposed).

    alpha, beta, gamma: per-batch fp32 scalars or floats; c: symmetric [B, M, M] or None; fp32 accumulation.
    The kernel sits behind a jit keyed by shapes and flags only (the scalars are runtime arrays), so the many
    calls of one Muon update with the same matrix shape lower and compile one Mosaic GPU kernel, not one per call.
    """
    b = x.shape[0]
    scalars = [jnp.broadcast_to(jnp.asarray(v, F32), (b,)) for v in (alpha_B, beta_B, gamma_B)]
    return _gram_affine(x, c_BxMxM, *scalars, transposed=transposed, tiling=tiling, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("transposed", "tiling", "interpret"))
def _gram_affine(x, c_BxMxM, alpha_B, beta_B, gamma_B, *, transposed, tiling, interpret):
    hopper.check_wgmma_dtypes(x, x if c_BxMxM is None else c_BxMxM, "gram_affine")
    b, k, m = x.shape if transposed else (x.shape[0], x.shape[2], x.shape[1])
    if c_BxMxM is not None and c_BxMxM.shape != (b, m, m):
        raise ValueError(f"gram_affine: c must be [B, M, M] = {(b, m, m)} for x {x.shape}, got {c_BxMxM.shape}")
    t = tiling or tiling_for(m, k)
    if t is None or t.tm != t.tn or t.tm % 128 or t.tk % 64 or m % t.tm or k % t.tk:
        raise ValueError(f"gram_affine GPU tiling {t} needs square tiles tm == tn, a multiple of 128 dividing "
                         f"M={m} (M % tm == 0), and tk % 64 == 0 dividing K={k}; use backend='reference' for this "
                         "shape")
    out_dtype = x.dtype
    tm, tk = t.tm, t.tk
    half_n = tm // 2
    grid = m // tm
    upper = [(i, j) for i in range(grid) for j in range(i, grid)]     # tiles on and above the diagonal
    tile_i = jnp.array([i for i, _ in upper], jnp.int32)
    tile_j = jnp.array([j for _, j in upper], jnp.int32)
    transforms = hopper.swizzled_transforms(x.dtype)
    has_c = c_BxMxM is not None

    def mma(_, lhs_smem, rhs_smem, acc_ref):
        cols = pl.ds(pl.multiple_of(lax.axis_index("wg") * half_n, half_n), half_n)
        if transposed:      # blocks [tk, tm] of x [K, M]: out tile = lhs^T rhs
            plgpu.wgmma(acc_ref, lhs_smem.T, rhs_smem.at[:, cols])
        else:               # blocks [tm, tk] of x [M, K]: out tile = lhs rhs^T
            plgpu.wgmma(acc_ref, lhs_smem, rhs_smem.at[cols].T)
        plgpu.wgmma_wait(0)
        return acc_ref

    def block(row_tile):
        if transposed:
            return plgpu.BlockSpec((tk, tm), lambda kk: (kk, row_tile), transforms=transforms)
        return plgpu.BlockSpec((tm, tk), lambda kk: (row_tile, kk), transforms=transforms)

    def make_pipeline(mi, ni, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            mma,
            grid=(k // tk,),
            memory_registers=hopper.MEMORY_REGISTERS,
            in_specs=[block(mi), block(ni)],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=max(2, min(t.stages, k // tk)),
            compute_context=compute_context,
        )

    def body(alpha_ref, beta_ref, gamma_ref, tile_i_ref, tile_j_ref, x_gmem, *refs):
        c_gmem, out_gmem = refs if has_c else (None, refs[0])
        allocs = make_pipeline(0, 0, None).get_allocations(x_gmem.at[0], x_gmem.at[0])

        @functools.partial(
            pl.run_scoped, allocs=allocs,
            tile_smem=plgpu.SMEM((2, tm, half_n), out_dtype, transforms=transforms),
            tile_t_smem=plgpu.SMEM((2, half_n, tm), out_dtype, transforms=transforms),
            c_bar=plgpu.Barrier(num_barriers=2), collective_axes="wg")
        def _(allocs, tile_smem, tile_t_smem, c_bar):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((b * len(upper),), collective_axes="sm")
            def _(info):
                (lin,) = info.index
                bi, ti = lin // len(upper), lin % len(upper)
                mi, ni = tile_i_ref[ti], tile_j_ref[ti]
                col0 = ni * tm + wg * half_n

                def compute_context(run):
                    # tile_smem holds this warpgroup's c tile, then its output tile: the previous tile's stores
                    # must have read both buffers before anything lands in them.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    if has_c:
                        plgpu.copy_gmem_to_smem(c_gmem.at[bi, pl.ds(mi * tm, tm), pl.ds(col0, half_n)],
                                                tile_smem.at[wg], c_bar.at[wg])

                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, half_n), F32))
                    def _(acc_ref):
                        run(acc_ref)
                        rows = plgpu.broadcasted_iota(jnp.int32, (tm, half_n), 0, layout=plgpu.Layout.WGMMA)
                        cols = plgpu.broadcasted_iota(jnp.int32, (tm, half_n), 1, layout=plgpu.Layout.WGMMA)
                        # alpha x x^T rounded to the output dtype first, as the reference rounds it
                        out = (alpha_ref[bi] * acc_ref[...]).astype(out_dtype).astype(F32)
                        out = out + jnp.where(rows + mi * tm == cols + col0, gamma_ref[bi], 0.0)
                        if has_c:
                            plgpu.barrier_wait(c_bar.at[wg])
                            out = out + beta_ref[bi] * plgpu.load(tile_smem.at[wg], layout=plgpu.Layout.WGMMA
                                                                  ).astype(F32)
                        tile_smem.at[wg][...] = out.astype(out_dtype)

                        @pl.when(mi != ni)
                        def _():
                            tile_t_smem.at[wg].T[...] = out.astype(out_dtype)

                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(tile_smem.at[wg],
                                                out_gmem.at[bi, pl.ds(mi * tm, tm), pl.ds(col0, half_n)])

                        @pl.when(mi != ni)
                        def _():  # the mirrored tile below the diagonal
                            plgpu.copy_smem_to_gmem(tile_t_smem.at[wg],
                                                    out_gmem.at[bi, pl.ds(col0, half_n), pl.ds(mi * tm, tm)])

                make_pipeline(mi, ni, compute_context)(x_gmem.at[bi], x_gmem.at[bi], allocations=allocs)

            @pl.when(wg < 2)
            def _():
                plgpu.wait_smem_to_gmem(0)

    kernel = hopper.persistent_kernel(body, jax.ShapeDtypeStruct((b, m, m), out_dtype), interpret)
    return kernel(alpha_B, beta_B, gamma_B, tile_i, tile_j, x, *([c_BxMxM] if has_c else []))
