"""Shared helpers for the attention kernel tests: random inputs and a kernel-vs-reference comparison."""
from __future__ import annotations

import os

# Mosaic GPU interpret mode runs each warpgroup as a separate XLA CPU computation whose barrier waits block an XLA
# worker thread; with XLA's pool sized to 2 cores the memory warpgroup can starve and the kernel deadlocks. TSL sizes
# the pool from NPROC, which must be set before the CPU client exists (tests/conftest.py is the right place).
os.environ.setdefault("NPROC", "8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.attention import BlockSizes, flash_attention

TOL = {jnp.bfloat16: 2e-2, jnp.float32: 1e-4}   # relative Frobenius error, by input dtype


def rel_err(a, b):
    """||a - b|| / ||b|| over entries where b is finite (and a must be finite there)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    assert np.all(np.isfinite(a[fin])), "kernel produced a non-finite value where the reference is finite"
    assert np.array_equal(np.isneginf(a), np.isneginf(b)), "rows with no visible key differ"
    return float(np.linalg.norm(a[fin] - b[fin]) / max(np.linalg.norm(b[fin]), 1e-30))


def make_inputs(seed, B, T, S, H, KVH, Dqk, Dv, dtype, seg):
    """Random q, k, v, output cotangent and segment ids: None, random sorted (seg=True) or the given ids."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))
    q, k, v, d_out = normal(B, T, H, Dqk), normal(B, S, KVH, Dqk), normal(B, S, KVH, Dv), normal(B, T, H, Dv)
    if isinstance(seg, tuple):      # explicit (q_ids[B,T], kv_ids[B,S])
        segs = tuple(jnp.asarray(x, jnp.int32) for x in seg)
    elif isinstance(seg, np.ndarray):   # explicit ids [B,T] for self-attention
        segs = jnp.asarray(seg, jnp.int32)
    else:
        segs = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1).astype(np.int32)) if seg else None
    return q, k, v, d_out, segs


def packed_ids(*doc_lengths_per_row):
    """Segment ids [B,T] of packed documents: row b holds documents of the given lengths, ids 0, 1, 2, ..."""
    rows = [np.repeat(np.arange(len(lens)), lens) for lens in doc_lengths_per_row]
    assert len({len(r) for r in rows}) == 1, "every row must pack to the same length T"
    return np.stack(rows).astype(np.int32)


def compare_with_reference(backend, *, seed, B, T, S, H, KVH, Dqk, Dv, dtype, causal, cap, seg,
                           block_sizes: BlockSizes | None = None, scale=None):
    """Assert the kernel's out, max_logits, dq, dk, dv match the float32 reference (interpret mode)."""
    q, k, v, d_out, segs = make_inputs(seed, B, T, S, H, KVH, Dqk, Dv, dtype, seg)

    def run(name, *args):
        def fn(q, k, v):
            return flash_attention(q, k, v, causal=causal, sm_scale=scale, logit_soft_cap=cap, segment_ids=segs,
                                   return_max_logits=True, backend=name, block_sizes=block_sizes,
                                   interpret=name != "reference")
        (out, ml), vjp = jax.vjp(fn, *args)
        return (out, ml) + vjp((d_out.astype(out.dtype), jnp.zeros_like(ml)))

    got = jax.jit(lambda q, k, v: run(backend, q, k, v))(q, k, v)
    f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))
    want = jax.jit(lambda q, k, v: run("reference", q, k, v))(f32(q), f32(k), f32(v))
    assert got[0].dtype == dtype and got[0].shape == (B, T, H, Dv)
    assert got[1].dtype == jnp.float32 and got[1].shape == (B, H, T)
    for g, x in zip(got[2:], (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    tol = TOL[dtype]
    errs = {name: rel_err(a, b) for name, a, b in zip(("out", "max_logits", "dq", "dk", "dv"), got, want)}
    bad = {n: e for n, e in errs.items() if not e < (1e-5 if n == "max_logits" else tol)}
    assert not bad, f"{backend} kernel differs from the reference: {bad} (all: {errs})"
