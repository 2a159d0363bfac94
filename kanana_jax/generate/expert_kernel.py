"""Weights-stationary routed SwiGLU experts for decode: a Pallas (Triton) kernel pair over capacity slots.

Decode feeds few rows per expert (batch 256 x top-6 over 128 experts: ~12), so the step is bound by reading the
expert weights, not by arithmetic. Rows sit in capacity slots x[E, C, D] (C >= 16, what a Triton dot needs);
each program streams one column panel of ONE expert's weights once and multiplies it by that expert's C rows;
experts with no row in the slots are skipped, so batch 1 reads only the experts it routes to.

The weights are passed as the whole layer stack w[L, E, ...] with the layer index as an operand, so the kernel
reads w[layer] in place inside the decode loop's layer scan (no dynamic slice of the stack is materialized).
Measured on the H200 (BENCHMARKS.md "Sampler decode speed"): slower than the model's Mosaic GPU gmm at batch
64/256 (untuned blocks, and the capacity rounds are a data-dependent while loop); it is an option, not the default.
jax 0.11 deprecates the Pallas Triton backend (a warning at lowering); a Mosaic GPU port would replace it.

    gate_up(layer[1], rows[E], x[E,C,D], w_gate[L,E,D,F], w_up[L,E,D,F]) -> h[E,C,F] = silu(x w_gate) * (x w_up)
    down(layer[1], rows[E], h[E,C,F], w_down[L,E,F,D]) -> y[E,C,D]

`rows[e]` is the number of occupied slots of expert e (0 skips it; its output slots are zeros). The jnp
reference (`reference_gate_up`, `reference_down`) is the test oracle; `interpret=True` runs the kernels on CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """bn: output columns per program; bk: reduction chunk per step; Triton warps and pipeline stages."""
    bn: int = 64
    bk: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("bn", "bk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"BlockSizes.{name}={v}: must be a power of two >= 16 (a Triton dot tile)")


def _check(x_ExCxK, w_LxExKxN, rows_E, bs: BlockSizes, what: str):
    E, C, K = x_ExCxK.shape
    L, E2, K2, N = w_LxExKxN.shape
    if (E2, K2) != (E, K):
        raise ValueError(f"{what}: x is [E={E}, C={C}, K={K}] but w is [L={L}, E={E2}, K={K2}, N={N}]")
    if rows_E.shape != (E,):
        raise ValueError(f"{what}: rows must be [E={E}], got {rows_E.shape}")
    if C < 16 or C & (C - 1):
        raise ValueError(f"{what}: capacity C={C} must be a power of two >= 16 (a Triton dot tile)")
    if K % bs.bk or N % bs.bn:
        raise ValueError(f"{what}: K={K} must be a multiple of bk={bs.bk} and N={N} of bn={bs.bn}; "
                         f"pass BlockSizes(bn=..., bk=...) that divide them")


def _compiler_params(bs: BlockSizes, interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _matmul_panel(x_ref, w_ref, layer, e, n0, K: int, bk: int, bn: int):
    """f32 [C, bn] = x[:, :K] @ w[layer, e, :K, n0:n0+bn], reduced over K in chunks of bk."""
    C = x_ref.shape[0]

    def body(i, acc):
        k0 = pl.multiple_of(i * bk, bk)
        x = x_ref[:, pl.ds(k0, bk)]
        w = w_ref[layer, e, pl.ds(k0, bk), pl.ds(n0, bn)]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    return lax.fori_loop(0, K // bk, body, jnp.zeros((C, bn), jnp.float32))


def _gate_up_kernel(layer_ref, rows_ref, x_ref, wg_ref, wu_ref, h_ref, *, bs: BlockSizes):
    e, j = pl.program_id(0), pl.program_id(1)
    C, K = x_ref.shape
    n0 = pl.multiple_of(j * bs.bn, bs.bn)
    rows = rows_ref[e]

    @pl.when(rows > 0)
    def _():
        layer = layer_ref[0]
        g = _matmul_panel(x_ref, wg_ref, layer, e, n0, K, bs.bk, bs.bn)
        u = _matmul_panel(x_ref, wu_ref, layer, e, n0, K, bs.bk, bs.bn)
        h_ref[...] = (jax.nn.silu(g) * u).astype(h_ref.dtype)

    @pl.when(rows == 0)
    def _():
        h_ref[...] = jnp.zeros(h_ref.shape, h_ref.dtype)


def _down_kernel(layer_ref, rows_ref, h_ref, wd_ref, y_ref, *, bs: BlockSizes):
    e, j = pl.program_id(0), pl.program_id(1)
    C, K = h_ref.shape
    n0 = pl.multiple_of(j * bs.bn, bs.bn)
    rows = rows_ref[e]

    @pl.when(rows > 0)
    def _():
        y_ref[...] = _matmul_panel(h_ref, wd_ref, layer_ref[0], e, n0, K, bs.bk, bs.bn).astype(y_ref.dtype)

    @pl.when(rows == 0)
    def _():
        y_ref[...] = jnp.zeros(y_ref.shape, y_ref.dtype)


def _call(kernel, layer_1, rows_E, x_ExCxK, weights, N: int, bs: BlockSizes, interpret: bool):
    E, C, K = x_ExCxK.shape
    whole = lambda w: pl.BlockSpec(w.shape, lambda e, j: (0,) * w.ndim)  # noqa: E731  the stack, read in place
    return pl.pallas_call(
        functools.partial(kernel, bs=bs),
        grid=(E, N // bs.bn),
        in_specs=[pl.BlockSpec((1,), lambda e, j: (0,)), pl.BlockSpec((E,), lambda e, j: (0,)),
                  pl.BlockSpec((None, C, K), lambda e, j: (e, 0, 0))] + [whole(w) for w in weights],
        out_specs=pl.BlockSpec((None, C, bs.bn), lambda e, j: (e, 0, j)),
        out_shape=jax.ShapeDtypeStruct((E, C, N), x_ExCxK.dtype),
        compiler_params=_compiler_params(bs, interpret),
        interpret=interpret,
        name=kernel.__name__.strip("_"),
    )(layer_1, rows_E, x_ExCxK, *weights)


@functools.partial(jax.jit, static_argnames=("bs", "interpret"))
def gate_up(layer, rows_E, x_ExCxD, w_gate_LxExDxF, w_up_LxExDxF, *, bs: BlockSizes = BlockSizes(),
            interpret: bool = False):
    """h[E,C,F] = silu(x w_gate[layer]) * (x w_up[layer]) per expert (zeros for experts with rows 0)."""
    _check(x_ExCxD, w_gate_LxExDxF, rows_E, bs, "gate_up")
    layer_1 = jnp.reshape(layer, (1,)).astype(jnp.int32)
    return _call(_gate_up_kernel, layer_1, rows_E.astype(jnp.int32), x_ExCxD, (w_gate_LxExDxF, w_up_LxExDxF),
                 w_gate_LxExDxF.shape[-1], bs, interpret)


@functools.partial(jax.jit, static_argnames=("bs", "interpret"))
def down(layer, rows_E, h_ExCxF, w_down_LxExFxD, *, bs: BlockSizes = BlockSizes(), interpret: bool = False):
    """y[E,C,D] = h w_down[layer] per expert (zeros for experts with rows 0)."""
    _check(h_ExCxF, w_down_LxExFxD, rows_E, bs, "down")
    layer_1 = jnp.reshape(layer, (1,)).astype(jnp.int32)
    return _call(_down_kernel, layer_1, rows_E.astype(jnp.int32), h_ExCxF, (w_down_LxExFxD,),
                 w_down_LxExFxD.shape[-1], bs, interpret)


def reference_gate_up(layer, rows_E, x_ExCxD, w_gate_LxExDxF, w_up_LxExDxF):
    """jnp oracle of `gate_up` (float32 accumulation, output in x's dtype)."""
    f32 = jnp.float32
    g = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate_LxExDxF[layer], preferred_element_type=f32)
    u = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up_LxExDxF[layer], preferred_element_type=f32)
    h = jax.nn.silu(g) * u
    return jnp.where(rows_E[:, None, None] > 0, h, 0.0).astype(x_ExCxD.dtype)


def reference_down(layer, rows_E, h_ExCxF, w_down_LxExFxD):
    """jnp oracle of `down`."""
    y = jnp.einsum("ecf,efd->ecd", h_ExCxF, w_down_LxExFxD[layer], preferred_element_type=jnp.float32)
    return jnp.where(rows_E[:, None, None] > 0, y, 0.0).astype(h_ExCxF.dtype)
