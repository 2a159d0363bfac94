"""FP8 grouped matmul (routed experts): e4m3 activations and weights forward, e4m3/e5m2 output gradient for dlhs.

    gmm_fp8(x[M,K], w[E,K,N], group_sizes[E]) ~= gmm(x, w, group_sizes)      (custom_vjp)
    forward  out  = gmm(q(x), q(w)^T[E,N,K]) * s_x s_w[g]             e4m3 x e4m3, fp32 accumulation
    backward dx   = gmm(q(g), q(w)[E,K,N])   * s_g s_w[g]             grad dtype x e4m3
             dw   = tgmm(x^T, g)                                       wgrad='bf16' (default): the operands' dtype
             dw   = tgmm(q(x)^T, q(g)) * s_x s_g                       wgrad='fp8': e4m3 x grad dtype

Scales are powers of two (pallas_kernels/fp8.py), current scaling: one per tensor for x and g, one per expert
for w (experts' weight ranges differ; a per-group scale costs nothing in the kernels, which multiply group g's
accumulator by its scale before the cast). Both forward products read their rhs as [E, N_out, K_contract]:
the layout wgmma needs for 8-bit operands, made by the quantizing pass (`quantize_weights`: both layouts and the
scales). `rhs` is either the weight, quantized in every call, or a `QuantizedExperts` made once per optimizer step
(kanana_jax/model/fp8_weights.py): its `w` stays the differentiable input that receives dW, the fp8 copies are
read as they are (same values as a per-call quantization of the same `w`, so the same results bit for bit).
The weight gradient is a bf16 tgmm, or (wgrad='fp8', precision.fp8_expert_wgrad) an fp8 one: wgmma reads 8-bit
operands K-major only, so both q(x) and q(g) are laid out as [K, P] / [N, P] with the rows (the contraction)
minor and each group padded with zeros to a multiple of the kernel's contraction block (`kmajor_by_group`, one
gather-and-transpose pass each; P <= M + E (block - 1)); the kernel (gpu.tgmm_kmajor) then needs no masking.

Backends: 'reference' (dequantize to f32, blocked jnp; the CPU path and the oracle), 'gpu' (Mosaic GPU wgmma on
fp8 operands, Hopper), 'tpu' (Mosaic TPU: fp8 storage, dequantized to bf16 in the kernel; v5p/v6e have no fp8 MXU).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import fp8 as fp8_lib
from pallas_kernels.moe import ops, reference
from pallas_kernels.moe import tiling as tiling_lib
from pallas_kernels.moe.tiling import GmmTilings, as_gmm_tilings


def quantize_weights(w_xExKxN):
    """(q [...,E,K,N], q^T [...,E,N,K], scales [...,E]) of expert weights in e4m3, one power-of-two scale per
    expert (leading dims, e.g. a scanned layer stack, are batch dims)."""
    s_xE = fp8_lib.scale_for(fp8_lib.amax(w_xExKxN, axis=(-2, -1)), fp8_lib.E4M3)
    q = fp8_lib.quantize(w_xExKxN, fp8_lib.E4M3, s_xE[..., None, None])
    return q, jnp.swapaxes(q, -1, -2), s_xE


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "q", "q_t", "s"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class QuantizedExperts:
    """Expert weights with their e4m3 copies made ahead (once per optimizer step): `w` [E,K,N] in the compute
    dtype (differentiable: receives dW), `q` [E,K,N] / `q_t` [E,N,K] = quantize_weights(w), `s` [E] scales.
    Passes where the weight array does (`.shape`, `.dtype` are w's)."""
    w: jax.Array
    q: jax.Array
    q_t: jax.Array
    s: jax.Array

    @property
    def shape(self):
        return self.w.shape

    @property
    def dtype(self):
        return self.w.dtype

    @classmethod
    def of(cls, w_ExKxN):
        """The weight with its fp8 copies quantized now (what a call of gmm_fp8 on the bare weight does)."""
        return cls(w_ExKxN, *quantize_weights(jax.lax.stop_gradient(w_ExKxN)))


def quantize_tensor(x, dtype=fp8_lib.E4M3):
    """(q, scalar scale) with current per-tensor scaling."""
    s = fp8_lib.scale_for(fp8_lib.amax(x), dtype)
    return fp8_lib.quantize(x, dtype, s), s


def scaled_gmm(q_lhs_MxK, q_rhs_ExNxK, group_sizes_E, scales_E, *, out_dtype, tiling=None, backend="reference",
               interpret=False):
    """out[rows of g] = (q_lhs rows @ q_rhs[g]^T) * scales[g] for fp8 q_lhs [M,K], q_rhs [E,N,K] -> [M,N]."""
    if backend == "gpu":
        from pallas_kernels.moe import gpu
        return gpu.gmm(q_lhs_MxK, q_rhs_ExNxK, group_sizes_E, transpose_rhs=True, out_dtype=out_dtype,
                       tiling=tiling, interpret=interpret, scales_E=scales_E)
    if backend == "tpu":
        from pallas_kernels.moe import tpu
        return tpu.gmm(q_lhs_MxK, q_rhs_ExNxK, group_sizes_E, transpose_rhs=True, out_dtype=out_dtype,
                       tiling=tiling, interpret=interpret, scales_E=scales_E)
    rhs = q_rhs_ExNxK.astype(jnp.float32) * scales_E[:, None, None]
    out = reference.gmm_blocked(q_lhs_MxK.astype(jnp.float32), rhs, group_sizes_E, transpose_rhs=True,
                                out_dtype=jnp.float32, block_rows=tiling.tm if tiling else None)
    return out.astype(out_dtype)


def kmajor_by_group(q_MxK, group_sizes_E, block):
    """[K, P] copy of q [M, K] in the group-padded layout the K-major tgmm reads: rows of group g (in order) at
    columns [o[g], o[g] + size[g]) with o = tiling.padded_group_offsets(sizes, block), zeros elsewhere (padding,
    rows past the groups); P = tiling.padded_group_len(M, E, block)."""
    # Three passes (the barriers): indices, a row gather on 4-byte words, the transpose. As one expression XLA
    # recomputed the index search per element and gathered bytes column-wise: for q [49152, 2048] e4m3 on the
    # H200 2.36 ms fused, 0.98 ms split with a byte gather, 0.32 ms with the word gather (benchmarks/fp8.py
    # wgrad --layout-only, benchmarks/results/fp8_wgrad_layout_h200.json)
    bar = jax.lax.optimization_barrier
    m, k = q_MxK.shape
    src_P, valid_P = bar(tiling_lib.padded_group_rows(group_sizes_E, m, block))
    per_word = 4 // q_MxK.dtype.itemsize
    if q_MxK.dtype.itemsize >= 4 or k % per_word:  # no word view: gather the elements themselves
        return bar(jnp.where(valid_P[:, None], q_MxK[src_P], jnp.zeros((), q_MxK.dtype))).T
    words = jax.lax.bitcast_convert_type(q_MxK.reshape(m, k // per_word, per_word), jnp.uint32)
    rows = bar(jnp.where(valid_P[:, None], words[src_P], jnp.zeros((), jnp.uint32)))
    return jax.lax.bitcast_convert_type(rows, q_MxK.dtype).reshape(-1, k).T


def scaled_tgmm(q_lhs_MxK, q_rhs_MxN, group_sizes_E, scale, *, out_dtype, tiling=None, backend="reference",
                interpret=False):
    """out[g] = (q_lhs rows of g)^T @ (q_rhs rows of g) * scale for fp8 q_lhs [M,K], q_rhs [M,N] -> [E,K,N]
    (empty groups 0, rows past the groups ignored); `scale` a float32 scalar."""
    num_experts = group_sizes_E.shape[0]
    if backend == "gpu":
        from pallas_kernels.moe import gpu
        t = tiling or gpu.default_tgmm_kmajor_tiling(q_lhs_MxK.shape[1], q_rhs_MxN.shape[1], q_lhs_MxK.dtype)
        return gpu.tgmm_kmajor(kmajor_by_group(q_lhs_MxK, group_sizes_E, t.tm),
                               kmajor_by_group(q_rhs_MxN, group_sizes_E, t.tm), group_sizes_E,
                               out_dtype=out_dtype, tiling=t, interpret=interpret,
                               scales_E=jnp.broadcast_to(jnp.asarray(scale, jnp.float32), (num_experts,)))
    if backend == "tpu":
        raise ValueError("scaled_tgmm has no TPU kernel (v5p/v6e have no fp8 MXU): the fp8 weight gradient runs "
                         "on 'gpu' or 'reference'")
    out = reference.tgmm_blocked(q_lhs_MxK.astype(jnp.float32).T, q_rhs_MxN.astype(jnp.float32), group_sizes_E,
                                 out_dtype=jnp.float32, block_rows=tiling.tm if tiling else None)
    return (out * scale).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _gmm_fp8(x_MxK, w_ExKxN, qw, qw_t, sw_E, group_sizes_E, grad_dtype, wgrad, tilings, backend, interpret):
    return _gmm_fp8_fwd(x_MxK, w_ExKxN, qw, qw_t, sw_E, group_sizes_E, grad_dtype, wgrad, tilings, backend,
                        interpret)[0]


def _gmm_fp8_fwd(x_MxK, w_ExKxN, qw, qw_t, sw_E, group_sizes_E, grad_dtype, wgrad, tilings, backend, interpret):
    """w only stands for the differentiable weight (dW's dtype); the products read its fp8 copies qw, qw_t.
    Saved for the weight gradient: x (wgrad='bf16') or its fp8 copy and scale (wgrad='fp8')."""
    qx, sx = quantize_tensor(x_MxK)
    out = scaled_gmm(qx, qw_t, group_sizes_E, sx * sw_E, out_dtype=x_MxK.dtype, tiling=tilings.fwd,
                     backend=backend, interpret=interpret)
    x_saved = (qx, sx) if wgrad == "fp8" else (x_MxK, None)
    return out, (*x_saved, qw, sw_E, group_sizes_E, jnp.zeros((0,), x_MxK.dtype), jnp.zeros((0,), w_ExKxN.dtype))


def _gmm_fp8_bwd(grad_dtype, wgrad, tilings, backend, interpret, res, g_MxN):
    x_saved, sx, qw, sw_E, group_sizes_E, x_proto, w_proto = res
    qg, sg = quantize_tensor(g_MxN, fp8_lib.format_dtype(grad_dtype))
    # dx[rows of g] = g rows @ w[g]^T: rhs read as [E, K_out, N_contract] = q(w) as stored
    dx = scaled_gmm(qg, qw, group_sizes_E, sg * sw_E, out_dtype=x_proto.dtype, tiling=tilings.dlhs,
                    backend=backend, interpret=interpret)
    if wgrad == "fp8":  # x_saved = q(x): dw[g] = q(x)[rows of g]^T q(g)[rows of g] * s_x s_g
        dw = scaled_tgmm(x_saved, qg, group_sizes_E, sx * sg, out_dtype=w_proto.dtype, tiling=tilings.drhs,
                         backend=backend, interpret=interpret)
    else:
        dw = ops.tgmm(x_saved.T, g_MxN.astype(x_proto.dtype), group_sizes_E, preferred_element_type=w_proto.dtype,
                      tiling=tilings.drhs, backend=backend, interpret=interpret)
    return dx, dw, None, None, None, None  # no cotangent for the fp8 copies, scales, group sizes


_gmm_fp8.defvjp(_gmm_fp8_fwd, _gmm_fp8_bwd)


def gmm_fp8(lhs_MxK, rhs_ExKxN, group_sizes_E, *, grad_dtype="e5m2", wgrad="bf16",
            tiling: GmmTilings | None = None, backend: str | None = None, interpret=False):
    """Grouped matmul [M,K] x [E,K,N] -> [M,N] (lhs dtype) through fp8 products; differentiable in lhs and rhs.

    Same row convention as `ops.gmm` (rows sorted by group; rows past sum(group_sizes) give 0). Gradients come
    back in the operands' dtypes. grad_dtype: format of the quantized output gradient, 'e4m3' or 'e5m2'.
    wgrad: the weight gradient as a bf16 tgmm of x and g ('bf16') or an fp8 one of q(x) and q(g) ('fp8';
    tiling.drhs then tiles gpu.tgmm_kmajor).
    `rhs` is the weight (quantized here) or a QuantizedExperts (its fp8 copies read as given, dW to its .w)."""
    pre = rhs_ExKxN if isinstance(rhs_ExKxN, QuantizedExperts) else QuantizedExperts.of(rhs_ExKxN)
    rhs_ExKxN = pre.w
    if lhs_MxK.ndim != 2 or rhs_ExKxN.ndim != 3 or lhs_MxK.shape[1] != rhs_ExKxN.shape[1]:
        raise ValueError(f"gmm_fp8: want lhs[M,K], rhs[E,K,N]; got {lhs_MxK.shape}, {rhs_ExKxN.shape}")
    if rhs_ExKxN.shape[0] != group_sizes_E.shape[0]:
        raise ValueError(f"gmm_fp8: rhs has {rhs_ExKxN.shape[0]} groups, group_sizes {group_sizes_E.shape[0]}")
    fp8_lib.format_dtype(grad_dtype)
    if wgrad not in ("bf16", "fp8"):
        raise ValueError(f"gmm_fp8: wgrad={wgrad!r}; allowed: 'bf16', 'fp8'")
    backend = ops.resolve_backend(backend)
    if wgrad == "fp8" and backend == "tpu":
        raise ValueError("gmm_fp8 wgrad='fp8' (precision.fp8_expert_wgrad) has no TPU kernel: v5p/v6e have no fp8 "
                         "MXU; use wgrad='bf16' there")
    if pre.q_t.shape != rhs_ExKxN.shape[:1] + rhs_ExKxN.shape[:0:-1] or pre.s.shape != rhs_ExKxN.shape[:1]:
        raise ValueError(f"gmm_fp8: quantized copies q_t {pre.q_t.shape}, scales {pre.s.shape} do not fit the "
                         f"weight {rhs_ExKxN.shape} (want [E,N,K] and [E])")
    # inside shard_map: each operand enters as varying over the other's mesh axes too (pcast, whose transpose sums
    # its cotangent over them), as autodiff does for a plain matmul; the custom bwd's dx, dW vary over both sets
    vma = lambda a: set(jax.typeof(a).mat.varying)  # mesh axes a varies over (none outside shard_map)
    lhs_MxK, rhs_ExKxN = (a if not (m := tuple(sorted(vma(b) - vma(a)))) else jax.lax.pcast(a, m, to="varying")
                          for a, b in ((lhs_MxK, rhs_ExKxN), (rhs_ExKxN, lhs_MxK)))
    return _gmm_fp8(lhs_MxK, rhs_ExKxN, pre.q, pre.q_t, pre.s, group_sizes_E.astype(jnp.int32), grad_dtype, wgrad,
                    as_gmm_tilings(tiling), backend, interpret)


def gmm_fp8_reference(lhs_MxK, rhs_ExKxN, group_sizes_E):
    """float32 oracle of gmm_fp8's forward: the same quantization, dequantized, through the per-group loop."""
    qx, sx = quantize_tensor(lhs_MxK)
    qw, _, sw_E = quantize_weights(rhs_ExKxN)
    return reference.gmm_reference(fp8_lib.dequantize(qx, sx), fp8_lib.dequantize(qw, sw_E[:, None, None]),
                                   group_sizes_E, out_dtype=jnp.float32)
