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
    """Swizzled 128-byte layout for tiles whose minor dimension is a multiple of 128 bytes (64 bf16, 128 fp8)."""
    swizzle = 128
    elems = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(swizzle)


_FP8 = (jnp.dtype(jnp.float8_e4m3fn), jnp.dtype(jnp.float8_e5m2))


def check_wgmma_dtypes(lhs, rhs, name, allow_fp8=False):
    """wgmma takes two 16-bit operands of one dtype, or (kernels reading both operands K-major, allow_fp8) two
    fp8 operands (e4m3/e5m2, mixed allowed); anything else gets an error naming the fix."""
    if allow_fp8 and jnp.dtype(lhs.dtype) in _FP8 and jnp.dtype(rhs.dtype) in _FP8:
        return
    if lhs.dtype != rhs.dtype or jnp.dtype(lhs.dtype).itemsize != 2:
        raise ValueError(
            f"{name} on GPU takes bf16/fp16 operands of one dtype or two fp8 (e4m3/e5m2) operands (wgmma), got "
            f"{lhs.dtype} and {rhs.dtype}; cast them to bfloat16 or pass backend='reference'")


def persistent_kernel(body, out_type, interpret):
    """A persistent kernel: one CTA per SM, three warpgroups (one TMA, two wgmma), warpgroup lowering semantics."""
    return plgpu.kernel(body, out_type=out_type, grid=(num_sms(interpret),), grid_names=("sm",), num_threads=3,
                        thread_name="wg",
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
                        interpret=interpret_params(interpret))
