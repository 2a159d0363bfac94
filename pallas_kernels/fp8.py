"""FP8 formats and per-tensor scaling shared by the fp8 matmuls (dense: kanana_jax/model/fp8.py; grouped:
pallas_kernels/moe/fp8.py).

Convention: x ~= dequantize(q, s) = q * s with q = quantize(x, s) = saturate(x / s) in e4m3 or e5m2. Scales are
powers of two, chosen so that the largest magnitude (amax) lands in the top binade of the format; dividing by
them is exact, so the only rounding is the cast to fp8: relative error <= 2^-(mantissa bits + 1) per element
(e4m3: 2^-4 = 6.25%, e5m2: 2^-3 = 12.5%) for values in the normal range.
"""
from __future__ import annotations

import jax.numpy as jnp

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E5M2 = jnp.dtype(jnp.float8_e5m2)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def format_dtype(name_or_dtype):
    """'e4m3' | 'e5m2' | a float8 dtype -> the jnp dtype; anything else raises naming the allowed values."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in FORMATS:
            raise ValueError(f"fp8 format {name_or_dtype!r}; allowed: {', '.join(FORMATS)}")
        return FORMATS[name_or_dtype]
    dt = jnp.dtype(name_or_dtype)
    if dt not in (E4M3, E5M2):
        raise ValueError(f"fp8 format {dt}; allowed: float8_e4m3fn, float8_e5m2")
    return dt


def is_fp8(dtype) -> bool:
    return jnp.dtype(dtype) in (E4M3, E5M2)


def fp8_max(dtype) -> float:
    """Largest finite value: 448 (e4m3), 57344 (e5m2)."""
    return float(jnp.finfo(format_dtype(dtype)).max)


def unit_roundoff(dtype) -> float:
    """Worst relative rounding error of one cast to the format (normal range): 2^-(mantissa bits + 1)."""
    return 2.0 ** -(jnp.finfo(format_dtype(dtype)).nmant + 1)


def amax(x, axis=None):
    """max |x| in float32 (over all elements, or over `axis`)."""
    return jnp.max(jnp.abs(x), axis=axis).astype(jnp.float32)


def scale_for(amax_value, dtype):
    """Power-of-two scale s with amax / s <= fp8_max(dtype) < 2 amax / s; 1 where amax is 0 or not finite."""
    amax_value = jnp.asarray(amax_value, jnp.float32)
    ok = (amax_value > 0) & jnp.isfinite(amax_value)
    ratio = jnp.where(ok, amax_value, 1.0) / fp8_max(dtype)
    mant, exp = jnp.frexp(ratio)  # ratio = mant 2^exp, mant in [0.5, 1): ceil(log2 ratio) = exp (exp-1 at 0.5)
    exp = jnp.where(mant == 0.5, exp - 1, exp)
    return jnp.where(ok, jnp.ldexp(jnp.ones_like(ratio), exp), 1.0).astype(jnp.float32)


def quantize(x, dtype, scale):
    """saturate(x / scale) cast to the fp8 `dtype` (scale broadcasts against x). Saturating matters: e4m3fn
    has no infinity, an out-of-range cast gives NaN."""
    dtype = format_dtype(dtype)
    m = fp8_max(dtype)
    y = x.astype(jnp.float32) * (1.0 / jnp.asarray(scale, jnp.float32))
    return jnp.clip(y, -m, m).astype(dtype)


def dequantize(q, scale, dtype=jnp.float32):
    return (q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)
