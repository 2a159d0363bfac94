"""Sampling filters: the sort-free threshold-search masks ('search', the default) equal the full-sort reference
masks exactly on random logits (ties, per-row k / p, filters off, k >= V, -inf entries), and sampled token
frequencies follow the filtered distribution computed here in numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.generate import sampling

B, V = 48, 300


def _logits(kind: str):
    rng = np.random.default_rng({"normal": 0, "ties": 1}[kind])
    x = rng.normal(size=(B, V)).astype(np.float32) * 2.5
    if kind == "ties":            # coarse values: the k-th / nucleus boundary is tied and must be cut by id
        x = np.round(x)
        x[0] = 0.0                 # a row of equal logits
        x[1, :] = -1.0
        x[1, 7] = 3.0              # one clear maximum, the rest tied
        x[2, V // 2:] = -np.inf    # ids masked out (a padded vocabulary), fewer finite logits than some k
        x[3] = -0.0                # -0.0 and 0.0 are equal
        x[3, ::2] = 0.0
    return x


def _per_row(rng):
    k = rng.integers(-3, V + 4, B)
    k[:8] = [0, -1, 1, 2, V - 1, V, V + 5, 50]
    p = rng.uniform(0.0, 1.0, B).astype(np.float32)
    p[:6] = [1.0, 1.5, 1e-6, 0.999, 0.5, 0.0]
    return k, p


def _assert_masks_equal(new, ref, what):
    new, ref = np.asarray(new), np.asarray(ref)
    bad = np.argwhere(new != ref)
    assert bad.size == 0, f"{what}: {len(bad)} entries differ, first at [row, id] {bad[:3].tolist()}"


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_search_masks_equal_the_sort_reference(bits, kind):
    x = _logits(kind)
    k_B, p_B = _per_row(np.random.default_rng(2))
    t_B = np.random.default_rng(3).choice([0.0, 0.5, 1.0, 1.7], B).astype(np.float32)
    kw = dict(method="search", search_bits=bits)
    for k in (k_B, 1, 50, V - 1):
        _assert_masks_equal(sampling.top_k_mask(x, k, **kw), sampling.top_k_mask(x, k, method="sort"), f"top_k={k}")
    for p in (p_B, 0.9, 0.3):
        _assert_masks_equal(sampling.top_p_mask(x, p, **kw), sampling.top_p_mask(x, p, method="sort"), f"top_p={p}")
    for k, p in ((k_B, p_B), (20, 0.8), (0, p_B), (k_B, 1.0)):
        new = sampling.filter_logits(x, temperature=t_B, top_k=k, top_p=p, **kw)
        ref = sampling.filter_logits(x, temperature=t_B, top_k=k, top_p=p, method="sort")
        _assert_masks_equal(np.isfinite(new), np.isfinite(ref), f"filter_logits top_k={k} top_p={p}")
        np.testing.assert_array_equal(new, ref)     # the kept logits are the same scaled values


def test_search_keeps_the_documented_semantics_on_crafted_rows():
    x = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0],    # three-way tie at the top
                   [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(sampling.top_k_mask(x, 2), [[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(sampling.top_k_mask(x, jnp.array([4, 6])), [[0, 1, 1, 1, 0, 1], [1] * 6])
    # equal tokens each hold 1/6 of row 1: p = 0.4 needs three of them (2/6 < 0.4 before the third)
    np.testing.assert_array_equal(sampling.top_p_mask(x, jnp.array([1e-3, 0.4])),
                                  [[0, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]])


def _filtered_probs(logits, temperature, k, p):
    """numpy: the distribution sampling draws from, by the module docstring's definition (no ties here)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[:k] if k > 0 else order] = True
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[(before < p) | (np.arange(len(z)) == 0)]
    out = np.zeros(len(z))
    out[nucleus] = probs[nucleus]
    return out / out.sum()


def test_sampled_frequencies_follow_the_filtered_distribution_with_per_row_filters():
    row = np.log(np.array([0.05, 0.3, 0.02, 0.2, 0.13, 0.1, 0.17, 0.03], np.float32))
    settings = [(1.0, 0, 0.75), (0.7, 4, 1.0), (1.3, 5, 0.8), (1.0, 0, 1.0)]   # (temperature, top_k, top_p)
    n = 4000
    logits = jnp.tile(jnp.asarray(row)[None, :], (n * len(settings), 1))
    t, k, p = (jnp.repeat(jnp.array([s[i] for s in settings]), n) for i in range(3))
    tokens, _, sample_lp = sampling.sample(logits, jax.random.PRNGKey(11), temperature=t, top_k=k.astype(jnp.int32),
                                           top_p=p)
    tokens = np.asarray(tokens).reshape(len(settings), n)
    for i, (temperature, top_k, top_p) in enumerate(settings):
        want = _filtered_probs(row, temperature, top_k, top_p)
        got = np.bincount(tokens[i], minlength=len(row)) / n
        np.testing.assert_allclose(got, want, atol=0.03, err_msg=f"setting {settings[i]}")
        assert (got[want == 0] == 0).all(), f"setting {settings[i]}: a filtered-out token was drawn"
        # the sampling log-prob is the log of the filtered probability of the drawn token
        np.testing.assert_allclose(np.asarray(sample_lp).reshape(len(settings), n)[i],
                                   np.log(want[tokens[i]]), atol=1e-5)
