"""Grouped matmul kernels vs the per-group reference: outputs and gradients, TPU and GPU kernels in interpret mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.moe import GmmTilings, Tiling, gmm, reference, tgmm

TPU_TILES = GmmTilings(fwd=Tiling(64, 128, 128), dlhs=Tiling(64, 128, 128), drhs=Tiling(128, 128, 128))
GPU_TILES = GmmTilings(fwd=Tiling(64, 64, 128, 2), dlhs=Tiling(64, 64, 128, 2), drhs=Tiling(64, 128, 128, 2))
TOL = {jnp.bfloat16: 2e-2, jnp.float32: 1e-4}


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def sizes_case(case, m, e, seed):
    """Group sizes: 'ragged' = random with empty groups and rows past the groups; 'one' = one group holds all."""
    rng = np.random.default_rng(seed)
    if case == "one":
        sizes = np.zeros(e, np.int32)
        sizes[rng.integers(e)] = m
        return sizes
    if case == "full":  # every row in a group (no tail), empty groups included
        p = rng.dirichlet(np.ones(e))
        p[rng.choice(e, min(2, e - 1), replace=False)] = 0
        return rng.multinomial(m, p / p.sum()).astype(np.int32)
    p = rng.dirichlet(np.ones(e))
    p[rng.choice(e, 2, replace=False)] = 0
    return rng.multinomial(max(m - int(rng.integers(1, 40)), 0), p / p.sum()).astype(np.int32)


def operands(m, k, n, e, dtype, seed):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    lhs = jax.random.normal(ks[0], (m, k), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(ks[1], (e, k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    dout = jax.random.normal(ks[2], (m, n), jnp.float32).astype(dtype)
    return lhs, rhs, dout


def check_gmm_and_grads(backend, tilings, dtype, case, seed, *, m, k, n, e, transpose_rhs=False, interpret=True):
    lhs, rhs, dout = operands(m, k, n, e, dtype, seed)
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    gs = jnp.asarray(sizes_case(case, m, e, seed))
    ours = lambda l, r: gmm(l, r, gs, transpose_rhs=transpose_rhs, tiling=tilings, backend=backend,
                            interpret=interpret)
    ref = lambda l, r: reference.gmm_reference(l, r, gs, transpose_rhs=transpose_rhs)
    out, vjp = jax.vjp(ours, lhs, rhs)
    out_ref, vjp_ref = jax.vjp(ref, lhs, rhs)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, out_ref) < TOL[dtype]
    total = int(gs.sum())
    assert np.all(np.asarray(out[total:], np.float32) == 0), "rows past sum(group_sizes) must be 0"
    for got, want, name in zip(vjp(dout), vjp_ref(dout), ("dlhs", "drhs")):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert rel_err(got, want) < TOL[dtype], name


@pytest.mark.parametrize("dtype,case,seed", [(jnp.bfloat16, "ragged", 0), (jnp.float32, "ragged", 0),
                                             (jnp.bfloat16, "one", 1)])
def test_tpu_kernel_matches_reference(dtype, case, seed):
    check_gmm_and_grads("tpu", TPU_TILES, dtype, case, seed, m=200, k=256, n=256, e=6)


def test_tpu_kernel_transposed_rhs():
    check_gmm_and_grads("tpu", TPU_TILES, jnp.float32, "ragged", 2, m=136, k=256, n=128, e=5, transpose_rhs=True)


@pytest.mark.parametrize("case,seed", [("ragged", 3), ("one", 4)])
def test_gpu_kernel_matches_reference(case, seed):
    check_gmm_and_grads("gpu", GPU_TILES, jnp.bfloat16, case, seed, m=200, k=128, n=256, e=6)


def test_gpu_kernel_transposed_rhs_and_tiny_m():
    check_gmm_and_grads("gpu", GPU_TILES, jnp.bfloat16, "ragged", 5, m=40, k=128, n=128, e=3, transpose_rhs=True)


def test_gpu_kernel_rejects_fp32_with_a_fix():
    lhs, rhs, _ = operands(64, 64, 128, 2, jnp.float32, 0)
    with pytest.raises(ValueError, match="bfloat16"):
        gmm(lhs, rhs, jnp.array([30, 34]), backend="gpu", interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_reference_backend_blocked_path_matches_loop(dtype):
    check_gmm_and_grads("reference", GmmTilings(), dtype, "ragged", 6, m=300, k=32, n=48, e=7, interpret=False)


@pytest.mark.parametrize("backend,tiling", [("tpu", Tiling(128, 128, 128)), ("gpu", Tiling(64, 128, 128, 2)),
                                            ("reference", None)])
def test_tgmm_matches_reference_with_empty_groups(backend, tiling):
    m, k, n, e = 190, 128, 128, 5
    lhs, _, dout = operands(m, k, n, e, jnp.bfloat16, 7)
    gs = jnp.array([0, 70, 0, 101, 3], jnp.int32)  # empty groups, 16 rows past the groups
    got = tgmm(lhs.T, dout, gs, tiling=tiling, backend=backend, interpret=backend != "reference")
    want = reference.tgmm_reference(lhs.T, dout, gs)
    assert got.shape == (e, k, n)
    assert rel_err(got, want) < 2e-2
    assert np.all(np.asarray(got[0], np.float32) == 0) and np.all(np.asarray(got[2], np.float32) == 0)


def test_bad_arguments_name_the_problem():
    lhs, rhs, _ = operands(64, 128, 128, 2, jnp.bfloat16, 0)
    with pytest.raises(ValueError, match="disagree"):
        gmm(lhs, rhs, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="cast"):
        gmm(lhs, rhs.astype(jnp.float32), jnp.array([30, 34]))
    with pytest.raises(ValueError, match="Tiling"):
        gmm(lhs, rhs, jnp.array([30, 34]), tiling=Tiling(64, 96, 128), backend="gpu", interpret=True)


# Shapes a user may pass (issue 24): row counts that are no multiple of 8 or of the tile (ragged tails past the
# groups, empty groups), a single row, and N=384 that the default tn=256 does not divide: default tilings
# (tiling=None) must pick a legal block themselves. The H200 runs the real sizes (M=3001, 4097, 2049, 100):
# `benchmarks/moe.py shapes`.
@pytest.mark.parametrize("m,case", [(201, "full"), (1, "one")])
def test_gpu_kernel_any_row_count_default_tiling(m, case):
    check_gmm_and_grads("gpu", None, jnp.bfloat16, case, 11 + m, m=m, k=128, n=384, e=4)


@pytest.mark.parametrize("m,case", [(201, "ragged"), (1, "one")])
def test_tpu_kernel_any_row_count_default_tiling(m, case):
    check_gmm_and_grads("tpu", None, jnp.bfloat16, case, 21 + m, m=m, k=128, n=384, e=4)


def test_default_tiling_names_the_constraint_when_none_fits():
    lhs, rhs, _ = operands(16, 64, 96, 2, jnp.bfloat16, 0)  # N=96: no multiple of 128 divides it
    with pytest.raises(ValueError, match=r"N % 128 == 0"):
        gmm(lhs, rhs, jnp.array([8, 8]), backend="gpu", interpret=True)
    lhs, rhs, _ = operands(16, 128, 1100, 2, jnp.bfloat16, 0)  # N=1100 > tn=1024, no multiple of 128 divides it
    with pytest.raises(ValueError, match=r"no such block exists"):
        gmm(lhs, rhs, jnp.array([8, 8]), backend="tpu", interpret=True)
