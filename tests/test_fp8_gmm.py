"""FP8 grouped matmul (pallas_kernels/moe/fp8.py) vs float32 references: reference backend, and the GPU (Mosaic
GPU, fp8 wgmma) and TPU (Mosaic, fp8 storage) kernels in interpret mode.

Bound as in test_fp8_ops.py: per output element sum_k e_x |w| + |x| e_w (+ e_x e_w) with e = u |v| + a s,
u = 2^-4 (e4m3) / 2^-3 (e5m2), plus the bf16 output cast 2^-8 |y|. The weight gradient is a bf16 tgmm.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fp8 as fp8_lib
from pallas_kernels.moe import GmmTilings, Tiling, reference
from pallas_kernels.moe.fp8 import gmm_fp8, gmm_fp8_reference, quantize_weights

U = {"e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}
A = {"e4m3": 2.0 ** -10, "e5m2": 2.0 ** -17}
TILES = {"reference": None,
         "gpu": GmmTilings(Tiling(64, 128, 128, 2), Tiling(64, 128, 128, 2), Tiling(64, 128, 128, 2)),
         "tpu": GmmTilings(Tiling(64, 128, 128), Tiling(64, 128, 128), Tiling(128, 128, 128))}


def _case(seed, m=200, k=128, n=128, e=6):
    rng = np.random.default_rng(seed)  # numpy's generator: no per-shape compiles
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    spread = jnp.asarray([1, 4, 0.25, 1, 2, 1][:e], jnp.float32)[:, None, None]  # experts' ranges differ
    w = (jnp.asarray(rng.standard_normal((e, k, n)), jnp.float32) / np.sqrt(k) * spread).astype(jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    gs = jnp.asarray([30, 0, 50, 70, 20, 20][:e], jnp.int32)  # an empty group, 10 rows past the groups
    return x, w, g, gs


def _per_group_bound(a, b_g, fa, fb, sa, sb_g, rows):
    """Elementwise |q(a) q(b) - a b| bound for rows of each group (a [M,K], b_g [E,K,N])."""
    out = np.zeros((a.shape[0], b_g.shape[2]))
    for g, (lo, hi) in enumerate(rows):
        x, w = a[lo:hi], b_g[g]
        ex, ew = U[fa] * np.abs(x) + A[fa] * sa, U[fb] * np.abs(w) + A[fb] * sb_g[g]
        out[lo:hi] = ex @ (np.abs(w) + ew) + np.abs(x) @ ew
    return out


@functools.lru_cache(maxsize=None)
def _references(seed=0):
    """float32 references of one case, in one jitted program (shared by the backends)."""
    def refs(x, w, g, gs):
        return {"exact": reference.gmm_reference(x, w, gs, out_dtype=jnp.float32),
                "sim": gmm_fp8_reference(x, w, gs), "sw": quantize_weights(w)[2],
                "sx": fp8_lib.scale_for(fp8_lib.amax(x), "e4m3"), "sg": fp8_lib.scale_for(fp8_lib.amax(g), "e5m2"),
                "dx_exact": reference.gmm_reference(g, jnp.swapaxes(w, 1, 2), gs, out_dtype=jnp.float32),
                "dw_exact": reference.tgmm_reference(x.T, g, gs, out_dtype=jnp.float32)}
    return jax.tree.map(np.asarray, jax.jit(refs)(*_case(seed)))


@pytest.mark.parametrize("backend", ["reference", "gpu", "tpu"])
def test_gmm_fp8_forward_and_gradients_within_the_bounds(backend):
    x, w, g, gs = _case(0)

    @jax.jit
    def fwd_bwd(x, w, g):
        f = lambda x, w: gmm_fp8(x, w, gs, tiling=TILES[backend], backend=backend, interpret=backend != "reference")
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(g))
    out, dx, dw = fwd_bwd(x, w, g)
    assert out.dtype == dx.dtype == jnp.bfloat16 and dw.dtype == w.dtype
    r = _references()
    x32, w32, g32 = (np.asarray(a, np.float32) for a in (x, w, g))
    ends = np.cumsum(np.asarray(gs))
    rows = list(zip(np.concatenate([[0], ends[:-1]]), ends))
    exact, sx, sw = r["exact"], float(r["sx"]), r["sw"]
    bound = _per_group_bound(x32, w32, "e4m3", "e4m3", sx, sw, rows) + 2 ** -8 * np.abs(exact)
    assert np.all(np.abs(np.asarray(out, np.float32) - exact) <= bound * 1.0001 + 1e-5)
    assert np.all(np.asarray(out[int(ends[-1]):], np.float32) == 0), "rows past the groups are 0"
    # the kernel computes the dequantized product (only the bf16 output cast differs)
    sim = r["sim"]
    assert np.max(np.abs(np.asarray(out, np.float32) - sim)) <= 2 ** -8 * np.max(np.abs(sim)) + 1e-6
    # dx: e5m2 cotangent x e4m3 weights, per group
    sg, dx_exact = float(r["sg"]), r["dx_exact"]
    dx_bound = _per_group_bound(g32, np.swapaxes(w32, 1, 2), "e5m2", "e4m3", sg, sw, rows)
    assert np.all(np.abs(np.asarray(dx, np.float32) - dx_exact) <= dx_bound * 1.0001 + 2 ** -8 * np.abs(dx_exact)
                  + 1e-5)
    # dw: bf16 tgmm, empty group -> zeros
    dw_exact = r["dw_exact"]
    rel = np.max(np.abs(np.asarray(dw, np.float32) - dw_exact)) / np.max(np.abs(dw_exact))
    assert rel < 1e-2 and np.all(np.asarray(dw[1], np.float32) == 0)


def test_gpu_kernel_needs_k_major_fp8_operands_and_names_the_fix():
    from pallas_kernels.moe import gpu
    q = jnp.zeros((64, 128), fp8_lib.E4M3)
    with pytest.raises(ValueError, match="transpose_rhs=True"):
        gpu.gmm(q, jnp.zeros((2, 128, 128), fp8_lib.E4M3), jnp.asarray([30, 34]), interpret=True)
    with pytest.raises(ValueError, match="tk % 128"):
        gpu.gmm(q, jnp.zeros((2, 128, 128), fp8_lib.E4M3), jnp.asarray([30, 34]), transpose_rhs=True,
                tiling=Tiling(64, 64, 128, 2), interpret=True)
