"""FP8 dense matmul (kanana_jax/model/fp8.py) against float32 references, within the error the formats allow.

Error model (pallas_kernels/fp8.py): scales are powers of two, so quantizing is one rounding to fp8:
|q(x) s - x| <= u |x| + a s per element, u = 2^-4 (e4m3) or 2^-3 (e5m2), a = half the smallest subnormal step
(2^-10 for e4m3, 2^-17 for e5m2). For y = x . w that gives, per output element,
|y~ - y| <= sum_k (u_x |x| + a_x s_x)(|w| + u_w |w| + a_w s_w) + |x| (u_w |w| + a_w s_w), plus the output cast.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.model import fp8
from pallas_kernels import fp8 as fp8_lib

U = {"e4m3": 2.0 ** -4, "e5m2": 2.0 ** -3}
A = {"e4m3": 2.0 ** -10, "e5m2": 2.0 ** -17}


def _operands(seed, m=96, k=256, n=(4, 48), dtype=jnp.bfloat16):
    """x [m, k], w [k, *n] with log-normal magnitudes, g [m, *n] (numpy's generator: no per-shape compiles)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((k,) + n) * 0.05 * np.exp(rng.standard_normal((k,) + n) * 0.5), jnp.float32)
    g = jnp.asarray(rng.standard_normal((m,) + n), jnp.float32).astype(dtype)
    return x, w, g


def _bound(a, b, fa, fb, sa, sb):
    """Elementwise bound of |q(a) q(b) - a b| summed over the contraction (a[M,K] @ b[K,N], numpy)."""
    ea = U[fa] * np.abs(a) + A[fa] * sa
    eb = U[fb] * np.abs(b) + A[fb] * sb
    return ea @ (np.abs(b) + eb) + np.abs(a) @ eb


def _scale(x, fmt):
    """The power-of-two scale that puts amax in the top binade (numpy: the oracle of fp8_lib.scale_for)."""
    amax = float(np.max(np.abs(np.asarray(x, np.float64))))
    return float(2.0 ** np.ceil(np.log2(amax / fp8_lib.fp8_max(fmt))))


def test_forward_within_the_e4m3_bound_and_equal_to_the_dequantized_product():
    x, w, _ = _operands(0)
    recipe = fp8.Fp8Recipe()
    y, y_ref = jax.jit(lambda x, w: (fp8.matmul(x, w, recipe, out_dtype=jnp.float32),
                                     fp8.reference_matmul(x, w, recipe)))(x, w)
    x32, w32 = np.asarray(x, np.float32), np.asarray(w, np.float32).reshape(x.shape[1], -1)
    exact = (x32 @ w32).reshape(y.shape)
    bound = _bound(x32, w32, "e4m3", "e4m3", _scale(x, "e4m3"), _scale(w, "e4m3")).reshape(y.shape)
    err = np.abs(np.asarray(y) - exact)
    assert np.all(err <= bound * 1.0001 + 1e-6)
    rel = np.linalg.norm(err) / np.linalg.norm(exact)
    assert 0.005 < rel < 0.08, rel  # it did quantize; random data lands near sqrt(2/3) u ~ 0.05
    # the op is exactly the product of the dequantized operands (float32 accumulation)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5,
                               atol=1e-5 * np.abs(exact).max())


def test_two_contracted_dims_match_the_einsum():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 4, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((4, 32, 64)) * 0.1, jnp.float32)
    y, ref = jax.jit(lambda x, w: (fp8.matmul(x, w, fp8.Fp8Recipe(), n_contract=2),
                                   jnp.einsum("bthv,hvd->btd", x, w)))(x, w)
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)) < 0.08


@pytest.mark.parametrize("grad_dtype", ["e5m2", "e4m3"])
def test_gradients_within_the_bound_in_the_documented_dtypes(grad_dtype):
    x, w, g = _operands(3)
    recipe = fp8.Fp8Recipe(grad_dtype=grad_dtype)
    y, vjp = jax.vjp(lambda x, w: fp8.matmul(x, w, recipe), x, w)
    dx, dw = vjp(g)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype  # bf16 acts, fp32 master weights
    k = x.shape[1]
    x32, w32, g32 = (np.asarray(a, np.float32).reshape(a.shape[0], -1) for a in (x, w, g))
    sg, sw, sx = _scale(g, grad_dtype), _scale(w, "e4m3"), _scale(x, "e4m3")
    dx_exact = g32 @ w32.T
    dx_bound = _bound(g32, w32.T, grad_dtype, "e4m3", sg, sw) + 2 ** -8 * np.abs(dx_exact)  # + bf16 output
    assert np.all(np.abs(np.asarray(dx, np.float32) - dx_exact) <= dx_bound * 1.0001 + 1e-5)
    dw_exact = x32.T @ g32
    dw_bound = _bound(x32.T, g32, "e4m3", grad_dtype, sx, sg)
    assert np.all(np.abs(np.asarray(dw).reshape(k, -1) - dw_exact) <= dw_bound * 1.0001 + 1e-5)
    # the backward GEMMs really take the quantized cotangent in grad_dtype
    jaxpr = str(jax.make_jaxpr(vjp)(g))
    assert f"f8_{grad_dtype}{'fn' if grad_dtype == 'e4m3' else ''}[96,192]" in jaxpr


def test_delayed_scaling_updates_the_history_and_uses_its_max():
    x, w, g = _operands(4, m=64, k=128, n=(64,), dtype=jnp.float32)
    recipe = fp8.Fp8Recipe(scaling="delayed", amax_history=4)
    f = lambda x, w, h: fp8.matmul(x, w, recipe, history=h)

    @jax.jit
    def run(h):  # (y, its current-scaling twin, the reference forward, (dx, dw, new history))
        y, vjp = jax.vjp(f, x, w, h)
        return y, fp8.matmul(x, w, fp8.Fp8Recipe()), fp8.reference_matmul(x, w, recipe, history=h), vjp(g)
    empty = jnp.zeros((3, 4), jnp.float32)
    y0, y0_current, _, (_, _, new) = run(empty)
    # an empty history falls back to current scaling
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y0_current))
    want = [float(fp8_lib.amax(x)), float(fp8_lib.amax(w)), float(fp8_lib.amax(g))]
    np.testing.assert_array_equal(np.asarray(new[:, 0]), np.asarray(want, np.float32))
    assert np.all(np.asarray(new[:, 1:]) == 0)
    # the next step rolls the history and scales from its max over the window
    hist = jnp.asarray([[8.0, 0, 0, 0], [0.5, 4.0, 0, 0], [1.0, 0, 0, 0]], jnp.float32)
    y1, _, y1_ref, (_, _, new1) = run(hist)
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y1_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new1[:, 1:]), np.asarray(hist[:, :3]))
    # a stale history smaller than the tensor saturates instead of producing NaN (e4m3fn has no inf)
    tiny = jnp.full((3, 4), 1e-3, jnp.float32)
    y2, _, _, grads2 = run(tiny)
    assert np.all(np.isfinite(np.asarray(y2))) and all(np.all(np.isfinite(np.asarray(t))) for t in grads2)


def test_a_stop_gradient_forward_adds_nothing_to_the_history_update():
    """Why a stage may run a frozen reference through the same fp8 sites (DPO): a forward whose output is
    stop-gradient'ed runs no backward, so the history's cotangent is the differentiated forward's alone."""
    x, w, g = _operands(5, m=32, k=64, n=(16,), dtype=jnp.float32)
    recipe = fp8.Fp8Recipe(scaling="delayed", amax_history=2)

    def loss(w, h):
        y = fp8.matmul(x, w, recipe, history=h)
        y_ref = fp8.matmul(x * 8.0, jax.lax.stop_gradient(w * 4.0), recipe, history=h)
        return jnp.sum(y * g * jax.lax.stop_gradient(y_ref))
    new = jax.jit(jax.grad(loss, argnums=1))(w, jnp.zeros((3, 2), jnp.float32))
    np.testing.assert_array_equal(np.asarray(new[:2, 0]), [float(jnp.max(jnp.abs(x))), float(jnp.max(jnp.abs(w)))])


def test_scales_are_powers_of_two_that_fit_amax():
    amax = jnp.asarray([1e-6, 0.3, 1.0, 448.0, 449.0, 5e4, 0.0, jnp.inf])
    for fmt in ("e4m3", "e5m2"):
        s = np.asarray(fp8_lib.scale_for(amax, fmt))
        m = fp8_lib.fp8_max(fmt)
        assert np.all(np.log2(s) == np.round(np.log2(s)))
        ok = np.asarray(amax)[:6]
        assert np.all(ok / s[:6] <= m) and np.all(ok / s[:6] > m / 2)
        assert s[6] == 1.0 and s[7] == 1.0


def test_recipe_rejects_bad_values():
    with pytest.raises(ValueError, match="e4m3"):
        fp8.Fp8Recipe(grad_dtype="e3m4")
    with pytest.raises(ValueError, match="current"):
        fp8.Fp8Recipe(scaling="sometimes")
