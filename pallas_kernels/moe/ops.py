"""Public grouped matmuls: gmm (with custom_vjp: dlhs by gmm with transposed rhs, drhs by tgmm) and tgmm.

Backends: 'reference' (blocked jnp, cheap on CPU; the default there), 'tpu' (Mosaic), 'gpu' (Mosaic GPU, Hopper).
backend=None picks from the default platform. interpret=True runs a kernel backend on CPU in its interpret mode.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.moe import reference
from pallas_kernels.moe.tiling import GmmTilings, Tiling, as_gmm_tilings

BACKENDS = ("reference", "tpu", "gpu")


def resolve_backend(backend: str | None) -> str:
    """The backend to run: the given one, or the one matching jax.default_backend()."""
    if backend is None:
        platform = jax.default_backend()
        return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}.get(platform, "reference")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed values: {BACKENDS} or None (pick from the platform)")
    return backend


# Each kernel call sits behind a jit keyed by shapes and static arguments, so equal calls (the layers of an
# unscanned model, model.scan_layers=False) trace and lower one kernel instead of one per call site.
@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, out_dtype, tiling, backend, interpret):
    if backend == "tpu":
        from pallas_kernels.moe import tpu
        return tpu.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, tiling=tiling,
                       interpret=interpret)
    if backend == "gpu":
        from pallas_kernels.moe import gpu
        return gpu.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, tiling=tiling,
                       interpret=interpret)
    return reference.gmm_blocked(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                                 block_rows=tiling.tm if tiling else None)


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _tgmm_impl(lhs_KxM, rhs_MxN, group_sizes, out_dtype, tiling, backend, interpret):
    if backend == "tpu":
        from pallas_kernels.moe import tpu
        return tpu.tgmm(lhs_KxM, rhs_MxN, group_sizes, out_dtype=out_dtype, tiling=tiling, interpret=interpret)
    if backend == "gpu":
        from pallas_kernels.moe import gpu
        # The GPU kernel reads lhs row-major [M,K]; under jit the two transposes cancel.
        return gpu.tgmm(lhs_KxM.T, rhs_MxN, group_sizes, out_dtype=out_dtype, tiling=tiling, interpret=interpret)
    return reference.tgmm_blocked(lhs_KxM, rhs_MxN, group_sizes, out_dtype=out_dtype,
                                  block_rows=tiling.tm if tiling else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _gmm(lhs, rhs, group_sizes, transpose_rhs, out_dtype, tilings, backend, interpret):
    return _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, out_dtype, tilings.fwd, backend, interpret)


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, out_dtype, tilings, backend, interpret):
    out = _gmm_impl(lhs, rhs, group_sizes, transpose_rhs, out_dtype, tilings.fwd, backend, interpret)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, out_dtype, tilings, backend, interpret, res, dout_MxN):
    lhs, rhs, group_sizes = res
    dout_MxN = dout_MxN.astype(lhs.dtype)
    dlhs = _gmm_impl(dout_MxN, rhs, group_sizes, not transpose_rhs, lhs.dtype, tilings.dlhs, backend, interpret)
    if transpose_rhs:  # rhs[g] is [N,K]: drhs[g] = dout_g.T @ lhs_g
        drhs = _tgmm_impl(dout_MxN.T, lhs, group_sizes, rhs.dtype, tilings.drhs, backend, interpret)
    else:  # rhs[g] is [K,N]: drhs[g] = lhs_g.T @ dout_g
        drhs = _tgmm_impl(lhs.T, dout_MxN, group_sizes, rhs.dtype, tilings.drhs, backend, interpret)
    return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _check(lhs, rhs, group_sizes, transpose_rhs, name):
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(f"{name}: want lhs[M,K], rhs[E,K,N], group_sizes[E]; got {lhs.shape}, {rhs.shape}, "
                         f"{group_sizes.shape}")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(f"{name}: lhs {lhs.shape}, rhs {rhs.shape} (transpose_rhs={transpose_rhs}) and "
                         f"group_sizes {group_sizes.shape} disagree on K or E")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"{name}: lhs is {lhs.dtype} but rhs is {rhs.dtype}; cast both to one dtype")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{name}: group_sizes must be an integer array, got {group_sizes.dtype}")


def gmm(lhs_MxK, rhs, group_sizes_E, *, transpose_rhs=False, preferred_element_type=None,
        tiling: Tiling | GmmTilings | None = None, backend: str | None = None, interpret=False):
    """Grouped matmul [M,K] x [E,K,N] (or [E,N,K] with transpose_rhs) -> [M,N], differentiable in lhs and rhs.

    Rows are sorted by group (group g = rows [sum(sizes[:g]), sum(sizes[:g+1]))); rows past sum(sizes) give 0.
    tiling: one Tiling for the forward call, or GmmTilings(fwd, dlhs, drhs) for all three calls.
    """
    _check(lhs_MxK, rhs, group_sizes_E, transpose_rhs, "gmm")
    out_dtype = jnp.dtype(preferred_element_type or lhs_MxK.dtype)
    return _gmm(lhs_MxK, rhs, group_sizes_E.astype(jnp.int32), transpose_rhs, out_dtype,
                as_gmm_tilings(tiling), resolve_backend(backend), interpret)


def tgmm(lhs_KxM, rhs_MxN, group_sizes_E, *, preferred_element_type=None, tiling: Tiling | None = None,
         backend: str | None = None, interpret=False):
    """Per-group lhs.T-style product: out[g] = lhs[:, rows of g] @ rhs[rows of g] -> [E,K,N] (weight gradients)."""
    if lhs_KxM.ndim != 2 or rhs_MxN.ndim != 2 or lhs_KxM.shape[1] != rhs_MxN.shape[0]:
        raise ValueError(f"tgmm: want lhs[K,M], rhs[M,N]; got {lhs_KxM.shape}, {rhs_MxN.shape}")
    if lhs_KxM.dtype != rhs_MxN.dtype:
        raise ValueError(f"tgmm: lhs is {lhs_KxM.dtype} but rhs is {rhs_MxN.dtype}; cast both to one dtype")
    out_dtype = jnp.dtype(preferred_element_type or lhs_KxM.dtype)
    return _tgmm_impl(lhs_KxM, rhs_MxN, group_sizes_E.astype(jnp.int32), out_dtype, tiling,
                      resolve_backend(backend), interpret)
