"""Plumbing shared by the persistent Mosaic GPU (Hopper wgmma) matmul kernels: grid, interpret mode, smem layout."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import mosaic_gpu as plgpu

INTERPRET_SMS = 3  # CTAs in interpret mode: small, but > 1 so the persistent loop strides
HOPPER_SMS = 132   # H100 / H200 SXM: the grid when lowering ahead of time on a host without a GPU
MEMORY_REGISTERS = 40  # registers per thread of the TMA-issuing warpgroup


def num_sms(interpret) -> int:
    """CTAs of a persistent kernel: one per SM of the default device, INTERPRET_SMS in interpret mode."""
    if interpret:
        return INTERPRET_SMS
    return getattr(jax.devices()[0], "core_count", HOPPER_SMS)


def interpret_params(interpret):
    """Mosaic GPU interpret parameters for interpret=True / an InterpretGPUParams; None to compile."""
    if not interpret:
        return None
    return interpret if isinstance(interpret, plgpu.InterpretGPUParams) else plgpu.InterpretGPUParams()


def swizzled_transforms(dtype):
    """Swizzled 128-byte layout for 16-bit tiles whose minor dimension is a multiple of 64."""
    swizzle = 128
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)


def check_wgmma_dtypes(lhs, rhs, name):
    """wgmma takes two 16-bit operands of one dtype; anything else gets an error naming the fix."""
    if lhs.dtype != rhs.dtype or jnp.dtype(lhs.dtype).itemsize != 2:
        raise ValueError(
            f"{name} on GPU takes bf16/fp16 operands of one dtype (wgmma), got {lhs.dtype} and {rhs.dtype}; "
            "cast them to bfloat16 or pass backend='reference'")


def persistent_kernel(body, out_type, interpret):
    """A persistent kernel: one CTA per SM, three warpgroups (one TMA, two wgmma), warpgroup lowering semantics."""
    return plgpu.kernel(body, out_type=out_type, grid=(num_sms(interpret),), grid_names=("sm",), num_threads=3,
                        thread_name="wg",
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                        interpret=interpret_params(interpret))
