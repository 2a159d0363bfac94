"""The attention reference (CPU path and test oracle) against a per-row numpy loop, and the public API's checks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import BlockSizes, flash_attention


def brute_force(q, k, v, *, causal, scale, cap, q_seg, kv_seg):
    """Row-by-row float64 attention: (out[B,T,H,Dv], max_logits[B,H,T])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, _ = q.shape
    S, KVH = k.shape[1], k.shape[2]
    out = np.zeros((B, T, H, v.shape[-1]))
    ml = np.full((B, H, T), -np.inf)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                vis = np.ones(S, bool)
                if causal:
                    vis &= np.arange(S) <= t + S - T
                if q_seg is not None:
                    vis &= np.asarray(kv_seg)[b] == np.asarray(q_seg)[b, t]
                if not vis.any():
                    continue
                s = k[b, vis, h // (H // KVH)] @ q[b, t, h] * scale
                ml[b, h, t] = s.max()
                logit = s if cap is None else cap * np.tanh(s / cap)
                p = np.exp(logit - logit.max())
                out[b, t, h] = (p / p.sum()) @ v[b, vis, h // (H // KVH)]
    return out, ml


@pytest.mark.parametrize("causal,cap,seg,T,S,H,KVH", [
    (True, 50.0, False, 12, 12, 4, 2), (False, None, True, 9, 9, 2, 1), (True, 2.0, True, 5, 11, 4, 4),
    (True, None, False, 11, 5, 2, 1)])   # T > S: the first rows see no key (output 0, max logit -inf)
def test_reference_matches_row_loop(causal, cap, seg, T, S, H, KVH):
    rng = np.random.default_rng(T * S + H)
    q = rng.standard_normal((2, T, H, 16), np.float32)
    k = rng.standard_normal((2, S, KVH, 16), np.float32)
    v = rng.standard_normal((2, S, KVH, 8), np.float32)
    q_seg = np.sort(rng.integers(0, 3, (2, T)), axis=1).astype(np.int32) if seg else None
    kv_seg = np.sort(rng.integers(0, 3, (2, S)), axis=1).astype(np.int32) if seg else None
    segs = (q_seg, kv_seg) if seg else None
    attn = jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=causal, sm_scale=0.3, logit_soft_cap=cap,
                                                   segment_ids=segs, return_max_logits=True, backend="reference"))
    out, ml = attn(q, k, v)
    want_out, want_ml = brute_force(q, k, v, causal=causal, scale=0.3, cap=cap, q_seg=q_seg, kv_seg=kv_seg)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ml, want_ml, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v)[0].sum(), argnums=(0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_cpu_default_backend_is_reference_and_max_logits_carry_no_gradient():
    q = np.random.default_rng(0).standard_normal((1, 8, 2, 16), np.float32)
    out, ml = jax.jit(lambda q: flash_attention(q, q, q, return_max_logits=True))(q)
    ref, ref_ml = jax.jit(lambda q: flash_attention(q, q, q, return_max_logits=True, backend="reference"))(q)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(ml, ref_ml)
    g = jax.jit(jax.grad(lambda q: flash_attention(q, q, q, return_max_logits=True)[1].sum()))(q)
    np.testing.assert_array_equal(g, 0.0)


def test_argument_errors_name_the_fix():
    q = jnp.ones((1, 8, 3, 16))
    kv = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, kv, kv)
    with pytest.raises(ValueError, match="T == S"):
        flash_attention(q[:, :4], q, q, segment_ids=jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="logit_soft_cap must be > 0"):
        flash_attention(q, q, q, logit_soft_cap=0.0)
    with pytest.raises(ValueError, match="backend="):
        flash_attention(q, q, q, backend="cuda")
    with pytest.raises(ValueError, match="must be \\[B,T\\]"):
        flash_attention(q, q, q, segment_ids=(jnp.zeros((1, 8)), jnp.zeros((1, 7))))


def test_block_sizes_are_frozen_and_validated():
    bs = BlockSizes()
    with pytest.raises(Exception):
        bs.block_q = 256
    with pytest.raises(ValueError, match="block_kv must be a multiple of 8"):
        BlockSizes(block_kv=100)
    with pytest.raises(ValueError, match="num_stages must be >= 2"):
        BlockSizes(num_stages=1)
    with pytest.raises(ValueError, match="positive int"):
        BlockSizes(block_q=0)
