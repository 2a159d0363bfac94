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


# ---- the fp8 weight gradient (wgrad='fp8', precision.fp8_expert_wgrad): K-major tgmm on the group-padded layout

WGRAD_TILES = {"reference": None,
               "gpu": GmmTilings(Tiling(64, 128, 128, 2), Tiling(64, 128, 128, 2), Tiling(128, 64, 128, 2))}


def test_kmajor_by_group_lays_each_group_out_padded_to_the_block():
    from pallas_kernels.moe import tiling
    from pallas_kernels.moe.fp8 import kmajor_by_group
    x = jnp.arange(1, 201 * 3 + 1, dtype=jnp.float32).reshape(201, 3)  # no zero entry: padding is visible
    gs = jnp.asarray([30, 0, 50, 70, 20, 20], jnp.int32)  # empty group, 11 rows past the groups
    got = np.asarray(kmajor_by_group(x, gs, 16))
    assert got.shape == (3, tiling.padded_group_len(201, 6, 16)) and got.shape[1] % 16 == 0
    want = np.zeros_like(got)
    col, row = 0, 0
    for size in np.asarray(gs):
        want[:, col:col + size] = np.asarray(x)[row:row + size].T
        col, row = col + -(-size // 16) * 16, row + size
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(tiling.padded_group_offsets(gs, 16)), [0, 32, 32, 96, 176, 208, 240])
    # fp8 with K % 4 == 0 takes the 4-byte word gather: the same layout
    q = fp8_lib.quantize(jnp.tile(x, (1, 4)) / 600, "e4m3", 1.0)  # [201, 12]
    got8 = np.asarray(kmajor_by_group(q, gs, 16), np.float32)
    np.testing.assert_array_equal(got8, np.asarray(kmajor_by_group(q.astype(jnp.float32), gs, 16)))
    assert got8.shape == (12, got.shape[1]) and np.count_nonzero(got8) > 0


def _tgmm_bound(a, b, fa, fb, sa, sb, rows):
    """Elementwise |q(a)^T q(b) - a^T b| bound per group (a [M,K], b [M,N]) -> [E,K,N]."""
    out = np.zeros((len(rows), a.shape[1], b.shape[1]))
    for g, (lo, hi) in enumerate(rows):
        x, y = a[lo:hi], b[lo:hi]
        ex, ey = U[fa] * np.abs(x) + A[fa] * sa, U[fb] * np.abs(y) + A[fb] * sb
        out[g] = ex.T @ (np.abs(y) + ey) + np.abs(x).T @ ey
    return out


@pytest.mark.parametrize("backend", ["reference", "gpu"])
def test_fp8_weight_gradient_within_the_bound_and_the_rest_unchanged(backend):
    """wgrad='fp8': dw = q(x)^T q(g) s_x s_g per group, within the e4m3 x e5m2 bound of the exact product (and
    equal to the dequantized product up to the bf16 output cast); out and dx are those of wgrad='bf16'."""
    x, w, g, gs = _case(0)
    interpret = backend != "reference"

    @functools.partial(jax.jit, static_argnames="wgrad")
    def fwd_bwd(x, w, g, wgrad):
        tiling = (WGRAD_TILES if wgrad == "fp8" else TILES)[backend]
        f = lambda x, w: gmm_fp8(x, w, gs, wgrad=wgrad, tiling=tiling, backend=backend, interpret=interpret)
        out, vjp = jax.vjp(f, x, w)
        return (out, *vjp(g))
    out, dx, dw = fwd_bwd(x, w, g, "fp8")
    out_b, dx_b, _ = fwd_bwd(x, w, g, "bf16")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(out_b, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_b, np.float32))
    assert dw.dtype == w.dtype and np.all(np.asarray(dw[1], np.float32) == 0), "empty group: zeros"
    r = _references()
    x32, g32, dw32 = np.asarray(x, np.float32), np.asarray(g, np.float32), np.asarray(dw, np.float32)
    ends = np.cumsum(np.asarray(gs))
    rows = list(zip(np.concatenate([[0], ends[:-1]]), ends))
    bound = _tgmm_bound(x32, g32, "e4m3", "e5m2", float(r["sx"]), float(r["sg"]), rows)
    assert np.all(np.abs(dw32 - r["dw_exact"]) <= bound * 1.0001 + 2 ** -8 * np.abs(r["dw_exact"]) + 1e-5)
    qx = fp8_lib.quantize(x, "e4m3", r["sx"])
    qg = fp8_lib.quantize(g, "e5m2", r["sg"])
    sim = np.asarray(reference.tgmm_reference(fp8_lib.dequantize(qx, r["sx"]).T, fp8_lib.dequantize(qg, r["sg"]),
                                              gs, out_dtype=jnp.float32))
    assert np.all(np.abs(dw32 - sim) <= 2 ** -8 * np.abs(sim) + 1e-5), "the dequantized product, bf16-rounded"


@pytest.mark.parametrize("stages", [2, 3])
def test_kmajor_tgmm_kernel_over_groups_of_several_blocks(stages):
    """gpu.tgmm_kmajor in interpret mode: groups of 1-3 contraction blocks (pipelines deeper than one step), an
    empty group, rows past the groups, per-group scales; equals the float32 product of the same fp8 operands."""
    from pallas_kernels.moe.fp8 import quantize_tensor, scaled_tgmm
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((640, 128)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((640, 256)), jnp.bfloat16)
    gs = jnp.asarray([300, 0, 129, 120, 60], jnp.int32)  # 3, 0, 2, 1, 1 blocks of 128; 31 rows past the groups
    (qx, sx), (qg, sg) = quantize_tensor(x), quantize_tensor(g, "e5m2")
    tiling = Tiling(128, 64, 128, stages)
    got = jax.jit(lambda a, b, s: scaled_tgmm(a, b, gs, s, out_dtype=jnp.float32, tiling=tiling, backend="gpu",
                                              interpret=True))(qx, qg, sx * sg)
    want = reference.tgmm_reference(fp8_lib.dequantize(qx, sx).T, fp8_lib.dequantize(qg, sg), gs,
                                    out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(got[1]) == 0)


def test_fp8_weight_gradient_rejects_tpu_and_bad_tilings_naming_the_fix():
    from pallas_kernels.moe import gpu
    x, w, gs = jnp.zeros((64, 128), jnp.bfloat16), jnp.zeros((2, 128, 128), jnp.bfloat16), jnp.asarray([30, 34])
    with pytest.raises(ValueError, match="no TPU kernel"):
        gmm_fp8(x, w, gs, wgrad="fp8", backend="tpu")
    with pytest.raises(ValueError, match="allowed: 'bf16', 'fp8'"):
        gmm_fp8(x, w, gs, wgrad="e4m3")
    q = jnp.zeros((128, 256), fp8_lib.E4M3)
    with pytest.raises(ValueError, match="tm % 128"):
        gpu.tgmm_kmajor(q, q, gs, tiling=Tiling(64, 64, 128, 2), interpret=True)
    with pytest.raises(ValueError, match="P=200 % tm"):
        gpu.tgmm_kmajor(q[:, :200], q[:, :200], gs, tiling=Tiling(128, 64, 128, 2), interpret=True)


@pytest.mark.parametrize("k,n", [(2048, 768), (768, 2048)])
def test_fp8_weight_gradient_lowers_for_hopper_at_the_30b_a3b_shapes(k, n):
    """The gate/up (K=2048, N=768) and down (K=768, N=2048) grouped matmuls of the 30B-A3B slice, fwd+bwd with
    the fp8 weight gradient, default tilings: Mosaic GPU's TMA / wgmma rules are checked at lowering."""
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    loss = lambda lhs, rhs, gs: jnp.sum(gmm_fp8(lhs, rhs, gs, wgrad="fp8", backend="gpu").astype(jnp.float32) ** 2)
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(
        sds(49152, k), sds(128, k, n), jax.ShapeDtypeStruct((128,), jnp.int32)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 3, "fwd gmm, dlhs gmm and the K-major tgmm"
    from pallas_kernels.moe.tiling import padded_group_len
    p = padded_group_len(49152, 128, 128)  # 65408: the group-padded operands [K, P] e4m3 and [N, P] e5m2
    assert f"tensor<{k}x{p}xf8E4M3FN>" in text and f"tensor<{n}x{p}xf8E5M2>" in text
