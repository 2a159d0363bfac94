"""Public fused symmetric Gram-plus-affine product: backends 'reference' (jnp) and 'gpu' (Mosaic GPU, Hopper).

backend=None picks 'gpu' on a GPU when the operands fit it (16-bit, one dtype kept for the output, M % 128 == 0,
K % 64 == 0) and the reference otherwise; interpret=True runs the GPU kernel on CPU in Mosaic GPU's interpret mode.
No gradient: the polar iteration runs on gradients, never under differentiation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.polar import reference

BACKENDS = ("reference", "gpu")


def gpu_fits(x, c_BxMxM=None, out_dtype=None, transposed: bool = False) -> bool:
    """Whether the GPU kernel takes these operands."""
    from pallas_kernels.polar import gpu
    m, k = (x.shape[2], x.shape[1]) if transposed else (x.shape[1], x.shape[2])
    sixteen_bit = jnp.dtype(x.dtype).itemsize == 2 and (c_BxMxM is None or c_BxMxM.dtype == x.dtype)
    return sixteen_bit and jnp.dtype(out_dtype or x.dtype) == x.dtype and gpu.tiling_for(m, k) is not None


def resolve_backend(backend: str | None, x, c_BxMxM=None, out_dtype=None, transposed: bool = False) -> str:
    if backend is None:
        on_gpu = jax.default_backend() in ("gpu", "cuda")
        return "gpu" if on_gpu and gpu_fits(x, c_BxMxM, out_dtype, transposed) else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed values: {BACKENDS} or None (pick from the platform)")
    return backend


def gram_affine(x, c_BxMxM, alpha_B, beta_B, gamma_B, *, transposed: bool = False, out_dtype=None,
                backend: str | None = None, interpret=False):
    """[B, M, M] = alpha x x^T + beta c + gamma I; x [B, M, K] ([B, K, M] and x^T x when transposed); c symmetric
    [B, M, M] or None; the scalars are floats or [B] arrays."""
    backend = resolve_backend(backend, x, c_BxMxM, out_dtype, transposed)
    if backend == "gpu":
        from pallas_kernels.polar import gpu
        if jnp.dtype(out_dtype or x.dtype) != x.dtype:
            raise ValueError(f"gram_affine on GPU writes x's dtype {x.dtype}, got out_dtype={out_dtype}; "
                             "cast the result or pass backend='reference'")
        return gpu.gram_affine(x, c_BxMxM, alpha_B, beta_B, gamma_B, transposed=transposed, interpret=interpret)
    return reference.gram_affine(x, c_BxMxM, alpha_B, beta_B, gamma_B, transposed=transposed, out_dtype=out_dtype)
