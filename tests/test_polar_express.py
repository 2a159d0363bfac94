"""Polar Express: derived coefficients match the published sets; the iteration approximates the polar factor."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kanana_jax.optim import orthogonalize as ot
from kanana_jax.optim import polar_express as pe


def test_derivation_reproduces_published_five_step_set():
    derived = pe.optimal_composition(1e-3, 5, safety=1.02, cushion=0.02)
    np.testing.assert_allclose(np.array(derived), np.array(pe.MODDED_NANOGPT_5), atol=1e-6, rtol=0)


def test_derivation_reproduces_paper_eight_step_set_with_safety_1_01():
    raw = pe.optimal_composition(1e-3, 8, safety=1.0, cushion=pe.PAPER_CUSHION)
    np.testing.assert_allclose(np.array(raw), np.array(pe.PAPER_8_RAW), atol=1e-6, rtol=0)
    safe = pe.optimal_composition(1e-3, 8, safety=1.01, cushion=pe.PAPER_CUSHION, safety_in_recurrence=False)
    np.testing.assert_allclose(np.array(safe), np.array(pe.PRESETS["polar_express_8"][0]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(safe[-1], raw[-1], rtol=1e-15)   # the last polynomial is never safety-scaled


@pytest.mark.parametrize("lower,upper", [(1e-3, 1.0), (0.05, 1.0), (0.3, 1.2), (0.9, 1.1)])
def test_optimal_quintic_equioscillates(lower, upper):
    coeffs = pe.optimal_quintic(lower, upper)
    x = np.linspace(lower, upper, 200001)
    err = 1 - pe.quintic(coeffs, x)
    e_max = np.abs(err).max()
    # Chebyshev alternation: the error reaches +E at l, -E at u and at two interior extrema of alternating sign.
    assert err[0] == pytest.approx(e_max, rel=1e-6) and err[-1] == pytest.approx(-e_max, rel=1e-6)
    interior = err[1:-1]
    assert interior.min() == pytest.approx(-e_max, rel=1e-4) and interior.max() == pytest.approx(e_max, rel=1e-4)
    # and no other odd quintic does better: perturbing the coefficients raises the max error
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = tuple(c * (1 + 1e-3 * rng.standard_normal()) for c in coeffs)
        assert np.abs(1 - pe.quintic(other, x)).max() >= e_max * (1 - 1e-9)


def test_composition_bound_shrinks_and_presets_resolve():
    lo, hi = pe.composite_range(pe.MODDED_NANOGPT_5, 1e-3 / 1.02, 1 / 1.02)
    assert 0.84 < lo < 1 < hi < 1.15
    lo8, hi8 = pe.composite_range(pe.PRESETS["polar_express_8"][0], 1e-3 / 1.01, 1 / 1.01)
    assert 1 - lo8 < 1e-6 and hi8 - 1 < 1e-6
    sched, safety = pe.resolve("polar_express_5", steps=7)
    assert len(sched) == 7 and sched[5] == pe.FIXED_POINT_QUINTIC and safety == 1.02
    with pytest.raises(ValueError, match="unknown coefficient preset"):
        pe.resolve("polar_express_6")


def _matrices(cond, shape=(3, 40, 112), seed=0, kind="log"):
    """Random [B, m, n] with singular values in [1/cond, 1]: log-spaced, three spikes over a flat floor, or two
    levels (the adversarial spectra of the restart test)."""
    rng = np.random.default_rng(seed)
    b, m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((b, m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((b, n, m)))
    s = {"log": np.logspace(0, -np.log10(cond), m),
         "spike": np.concatenate([[1.0, 0.5, 0.3], np.full(m - 3, 1 / cond)]),
         "two": np.where(np.arange(m) < m // 2, 1.0, 1 / cond)}[kind]
    return (u * s[None, None, :]) @ np.swapaxes(v, 1, 2)


def _sv_dev(o):
    s = np.linalg.svd(np.asarray(o, np.float64), compute_uv=False)
    return np.abs(s - 1).max()


@pytest.mark.parametrize("cond", [1.0, 1e1, 1e2, 1e3])
@pytest.mark.parametrize("algorithm", ["gram", "direct"])
def test_polar_express_beats_newton_schulz_and_stays_within_derived_band(cond, algorithm):
    x = _matrices(cond)
    # A composition derived for the smallest normalised singular value of these matrices.
    lower = float((np.linalg.svd(x, compute_uv=False).min(-1) / np.linalg.norm(x, axis=(1, 2))).min()) / 1.02
    coeffs = pe.optimal_composition(lower, 5)
    lo, hi = pe.composite_range(coeffs, lower, 1 / 1.02)
    band = max(1 - lo, hi - 1)
    xj = jnp.asarray(x, jnp.float32)
    for tall in (False, True):
        xin = jnp.swapaxes(xj, 1, 2) if tall else xj
        o = ot.polar(xin, coeffs, safety=1.02, algorithm=algorithm, out_dtype=jnp.float32)
        ns = ot.newton_schulz(xin, 5, out_dtype=jnp.float32)
        assert o.shape == xin.shape
        dev, dev_ns = _sv_dev(o), _sv_dev(ns)
        assert dev < dev_ns, (dev, dev_ns)
        assert dev <= band + 0.03, (dev, band)          # 0.03: bf16 round-off of the singular values
        # In fp32 the whole factor (singular vectors too) is within the band of the exact polar factor;
        # in bf16 the vectors of small singular values move by ~2^-8 * cond (input round-off alone).
        o32 = ot.polar(xin, coeffs, safety=1.02, algorithm=algorithm, dtype=jnp.float32)
        exact = np.asarray(ot.svd_polar(xin))
        assert np.linalg.norm(np.asarray(o32) - exact, ord=2, axis=(1, 2)).max() <= band + 2e-3


@pytest.mark.parametrize("cond", [1e2, 1e3])
def test_published_five_step_set_beats_newton_schulz_on_ill_conditioned_inputs(cond):
    x = jnp.asarray(_matrices(cond, seed=1), jnp.float32)
    for algorithm in ("gram", "direct"):
        o = ot.polar(x, "polar_express_5", algorithm=algorithm)
        assert _sv_dev(o) < _sv_dev(ot.newton_schulz(x, 5))


def test_gram_and_direct_schedules_agree_in_fp32_and_batch_over_leading_axes():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 24, 56)), jnp.float32)
    g = ot.polar(x, "polar_express_8", algorithm="gram", dtype=jnp.float32)
    d = ot.polar(x, "polar_express_8", algorithm="direct", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(g), np.asarray(d), atol=2e-5)
    np.testing.assert_allclose(np.asarray(g), np.asarray(ot.svd_polar(x)), atol=1e-4)
    single = ot.polar(x[1, 2], "polar_express_8", algorithm="gram", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(g[1, 2]), np.asarray(single), atol=1e-6)


def test_newton_schulz_matches_optax_reference():
    x = jnp.asarray(np.random.default_rng(3).standard_normal((32, 80)), jnp.float32)
    ours = ot.newton_schulz(x, 5, dtype=jnp.float32)
    ref = optax.contrib._muon.orthogonalize_via_newton_schulz(
        x, jnp.asarray(pe.NEWTON_SCHULZ_QUINTIC), 5, eps=1e-30)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=2e-4)


def test_zero_matrix_maps_to_zero_and_flop_model_prefers_gram_for_wide_matrices():
    z = ot.polar(jnp.zeros((2, 16, 40)))
    assert np.all(np.isfinite(np.asarray(z))) and np.all(np.asarray(z) == 0)
    assert ot.choose_algorithm(768, 2048, 5) == "gram"
    assert ot.choose_algorithm(512, 512, 5) == "direct"
    restarts = ot.restart_steps(pe.MODDED_NANOGPT_5)
    assert restarts == {1, 3}
    assert ot.flops(768, 2048, 5, "gram", restarts) < 0.86 * ot.flops(768, 2048, 5, "direct")


@pytest.mark.parametrize("kind", ["log", "spike", "two"])
@pytest.mark.parametrize("cond", [1e2, 1e3])
def test_gram_schedule_with_default_restarts_tracks_the_direct_schedule_in_bf16(kind, cond):
    """bf16 round-off in the stored Gram matrix is amplified by a segment's gain; with the default restarts (steps 1
    and 3) no singular value leaves (0, 2) and the gram schedule stays within 0.12 of the X-space schedule's
    |sigma - 1| (worst over seeds 0-5 of these cases: 0.11), while without restarts it blows up."""
    x = jnp.asarray(_matrices(cond, shape=(4, 48, 128), seed=3, kind=kind), jnp.float32)
    direct = _sv_dev(ot.polar(x, algorithm="direct"))
    gram = _sv_dev(ot.polar(x, algorithm="gram"))
    assert gram < 1.0 and gram <= direct + 0.12, (gram, direct)
    no_restart = _sv_dev(ot.polar(x, algorithm="gram", max_segment_gain=float("inf"), max_segment_steps=99))
    assert no_restart > max(1.0, gram), no_restart
