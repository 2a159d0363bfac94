"""Fused Gram-plus-affine kernel (Muon's step polynomial) vs its jnp reference, GPU kernel in interpret mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.optim import orthogonalize as ot
from pallas_kernels.polar import ops


def _inputs(seed, b, m, k):
    kx, kc, ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(kx, (b, m, k), jnp.bfloat16)
    c = jax.random.normal(kc, (b, m, m), jnp.float32)
    c = ((c + jnp.swapaxes(c, 1, 2)) / 2).astype(jnp.bfloat16)      # the kernel mirrors tiles: c symmetric
    alpha, beta, gamma = jax.random.uniform(ks, (3, b), minval=-2.0, maxval=2.0)
    return x, c, alpha, beta, gamma


@pytest.mark.parametrize("b,m,k", [(2, 384, 128), (3, 128, 192)])  # 3 x 3 tiles (mirrored ones), one tile
def test_gpu_kernel_matches_reference(b, m, k):
    args = _inputs(m + k, b, m, k)
    got = ops.gram_affine(*args, backend="gpu", interpret=True)
    want = ops.gram_affine(*args, backend="reference")
    assert got.dtype == want.dtype == jnp.bfloat16
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-2 * scale
    # The identity lands on the diagonal only: compare diagonal and off-diagonal parts separately.
    eye = np.eye(m, dtype=bool)[None]
    assert np.abs(np.where(eye, got - want, 0)).max() <= 1e-2 * scale
    assert np.abs(np.where(eye, 0, got - want)).max() <= 1e-2 * scale


@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_gram_without_c_matches_reference_for_wide_and_tall_inputs(transposed):
    """The Gram matrix of the polar iteration: x x^T of a wide [B, M, K] x, x^T x of a tall [B, K, M] one."""
    x, _, alpha, _, _ = _inputs(11, 2, 256, 320)
    x = jnp.swapaxes(x, 1, 2) if transposed else x
    got = ops.gram_affine(x, None, alpha, 0.0, 0.0, transposed=transposed, backend="gpu", interpret=True)
    want = ops.gram_affine(x, None, alpha, 0.0, 0.0, transposed=transposed, backend="reference")
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == (2, 256, 256)
    assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max()
    np.testing.assert_array_equal(got, np.swapaxes(got, 1, 2))   # mirrored tiles: exactly symmetric


def test_reference_is_alpha_gram_plus_beta_c_plus_gamma_identity():
    x, c, alpha, beta, gamma = _inputs(1, 2, 8, 4)
    x32, c32 = np.asarray(x, np.float64), np.asarray(c, np.float64)
    got = np.asarray(ops.gram_affine(x, c, alpha, beta, gamma, out_dtype=jnp.float32))
    a, bt, g = (np.asarray(v, np.float64)[:, None, None] for v in (alpha, beta, gamma))
    want = a * np.einsum("bik,bjk->bij", x32, x32) + bt * c32 + g * np.eye(8)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_orthogonalization_with_the_gpu_kernel_matches_the_reference_path():
    x = jax.random.normal(jax.random.PRNGKey(7), (2, 128, 256), jnp.float32)
    x = x * jnp.logspace(0, -2, 256)[None, None, :]          # condition ~1e2: every step's polynomial matters
    got = ot.orthogonalize_group([x], kernel_backend="gpu", interpret=True, algorithm="gram")[0]
    want = ot.orthogonalize_group([x], kernel_backend="reference", algorithm="gram")[0]
    assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 2e-2
    s = np.linalg.svd(np.asarray(got, np.float64), compute_uv=False)
    assert np.abs(s - 1).max() < 0.35                        # orthogonal to the 5-step set's accuracy


def test_bad_shapes_and_dtypes_get_errors_that_name_the_fix():
    x, c, alpha, beta, gamma = _inputs(2, 1, 192, 64)
    with pytest.raises(ValueError, match="M=192"):
        ops.gram_affine(x, c, alpha, beta, gamma, backend="gpu", interpret=True)
    with pytest.raises(ValueError, match="bfloat16"):
        ops.gram_affine(x.astype(jnp.float32), c.astype(jnp.float32), alpha, beta, gamma, backend="gpu",
                        interpret=True)
    with pytest.raises(ValueError, match="allowed values"):
        ops.gram_affine(x, c, alpha, beta, gamma, backend="tpu")
    assert ops.resolve_backend(None, x, c) == "reference"      # CPU, and M=192 does not tile anyway


@pytest.mark.parametrize("shape,transposed,with_c", [((128, 768, 768), False, True), ((128, 768, 2048), False, False),
                                                     ((128, 2048, 768), True, False)], ids=["poly", "gram", "gram_tall"])
def test_gpu_kernel_lowers_for_hopper_at_the_muon_expert_shapes(shape, transposed, with_c):
    """Mosaic GPU lowering at the benchmark's expert shapes (wgmma shapes, layouts, <= 227 KB of shared memory)."""
    from pallas_kernels.polar import gpu
    sds = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    fn = lambda a: gpu.gram_affine(a, a if with_c else None, 0.25, 1.0, 1.0, transposed=transposed)
    text = jax.jit(fn).trace(sds).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_equal_shape_calls_share_one_lowered_kernel():
    """A Muon update calls the kernel many times per matrix shape; they must lower (and compile) one kernel."""
    import re
    from pallas_kernels.polar import gpu

    def two_steps(a):
        b = gpu.gram_affine(a, a, 0.25, 1.0, 1.0)
        return gpu.gram_affine(b, b, 0.5, 2.0, 1.0)

    text = jax.jit(two_steps).trace(jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"func\.func private @_gram_affine", text)) == 1
    assert len(re.findall(r"call @_gram_affine", text)) == 2
