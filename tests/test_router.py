"""Router invariants, dispatch metadata, permute/combine round trip and gradients; a whole MoE layer on kernels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.model import moe as model_moe
from pallas_kernels.moe import GmmTilings, Tiling, combine, gmm, permute, reference, route

T, E, K = 64, 16, 4


def logits_and_bias(seed, scale=1.0):
    k0, k1 = jax.random.split(jax.random.PRNGKey(seed))
    return jax.random.normal(k0, (T, E)) * scale, jax.random.normal(k1, (E,)) * 0.3


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_topk_is_lax_top_k_on_biased_scores(score):
    logits, bias = logits_and_bias(0)
    r = route(logits, bias_E=bias, k=K, score=score, norm_topk_prob=False)
    scores = jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    np.testing.assert_array_equal(r.expert_ids_TxK, jax.lax.top_k(scores + bias, K)[1])
    np.testing.assert_allclose(r.weights_TxK, jnp.take_along_axis(scores, r.expert_ids_TxK, axis=-1), rtol=1e-6)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_group_limited_selection_only_from_top_groups(score):
    n_group, topk_group = 4, 2
    logits, bias = logits_and_bias(1, scale=3.0)
    r = route(logits, bias_E=bias, k=K, score=score, n_group=n_group, topk_group=topk_group)
    scores = np.asarray(jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1))
    choice = (scores + np.asarray(bias)).reshape(T, n_group, E // n_group)
    group_score = np.sort(choice, -1)[..., -2:].sum(-1) if score == "sigmoid" else choice.max(-1)
    top_groups = np.argsort(-group_score, axis=-1)[:, :topk_group]
    chosen_groups = np.asarray(r.expert_ids_TxK) // (E // n_group)
    for t in range(T):
        assert set(chosen_groups[t]) <= set(top_groups[t])
        eligible = np.concatenate([np.arange(g * (E // n_group), (g + 1) * (E // n_group)) for g in top_groups[t]])
        best = eligible[np.argsort(-choice.reshape(T, E)[t, eligible])[:K]]
        assert set(np.asarray(r.expert_ids_TxK[t])) == set(best)


def test_weights_normalized_and_scaled_as_configured():
    logits, bias = logits_and_bias(2)
    r = route(logits, bias_E=bias, k=K, score="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5)
    np.testing.assert_allclose(np.sum(r.weights_TxK, -1), 2.5, rtol=1e-5)
    raw = route(logits, bias_E=bias, k=K, score="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5)
    want = 2.5 * jnp.take_along_axis(jax.nn.sigmoid(logits), raw.expert_ids_TxK, axis=-1)
    np.testing.assert_allclose(raw.weights_TxK, want, rtol=1e-6)


def test_bias_changes_selection_not_weights():
    logits, _ = logits_and_bias(3)
    bias = jnp.zeros((E,)).at[5].set(10.0)
    r = route(logits, bias_E=bias, k=K, score="sigmoid", norm_topk_prob=False)
    assert np.all(np.any(np.asarray(r.expert_ids_TxK) == 5, axis=-1)), "a large bias must force expert 5 in"
    slot = np.argmax(np.asarray(r.expert_ids_TxK) == 5, axis=-1)
    w5 = np.asarray(r.weights_TxK)[np.arange(T), slot]
    np.testing.assert_allclose(w5, jax.nn.sigmoid(logits[:, 5]), rtol=1e-6)


@pytest.mark.parametrize("score,n_group,topk_group,norm", [("sigmoid", 4, 2, True), ("softmax", 1, 1, False),
                                                            ("softmax", 4, 1, True)])
def test_route_equals_the_model_router(score, n_group, topk_group, norm):
    logits, bias = logits_and_bias(4, scale=2.0)
    r = route(logits, bias_E=bias, k=K, score=score, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
              routed_scaling_factor=1.7)
    ids, w, scores = model_moe.route(logits, bias, top_k=K, score_func=score, n_group=n_group,
                                     topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=1.7)
    np.testing.assert_array_equal(r.expert_ids_TxK, ids)
    np.testing.assert_allclose(r.weights_TxK, w, rtol=1e-6)
    np.testing.assert_allclose(r.scores_TxE, scores, rtol=1e-6)


def test_gradients_reach_logits_through_weights():
    logits, bias = logits_and_bias(5)
    c = jax.random.normal(jax.random.PRNGKey(9), (T, K))
    ids = route(logits, bias_E=bias, k=K, score="softmax").expert_ids_TxK

    def direct(lg):
        w = jnp.take_along_axis(jax.nn.softmax(lg, axis=-1), ids, axis=-1)
        return jnp.sum(c * w / (jnp.sum(w, -1, keepdims=True) + 1e-20))

    got = jax.grad(lambda lg: jnp.sum(c * route(lg, bias_E=bias, k=K, score="softmax").weights_TxK))(logits)
    np.testing.assert_allclose(got, jax.grad(direct)(logits), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(got).max()) > 0


def test_x_with_router_weights_equals_logits_path():
    x = jax.random.normal(jax.random.PRNGKey(0), (T, 32), jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(1), (32, E))
    a = route(x, w, k=K, score="sigmoid")
    b = route(jnp.dot(x.astype(jnp.float32), w), k=K, score="sigmoid")
    np.testing.assert_array_equal(a.expert_ids_TxK, b.expert_ids_TxK)


def test_dispatch_metadata_sorts_copies_by_expert():
    logits, bias = logits_and_bias(6)
    r = route(logits, bias_E=bias, k=K, score="sigmoid")
    flat = np.asarray(r.expert_ids_TxK).reshape(-1)
    np.testing.assert_array_equal(r.group_sizes_E, np.bincount(flat, minlength=E))
    sorted_experts = flat[np.asarray(r.order_M)]
    assert np.all(np.diff(sorted_experts) >= 0)
    np.testing.assert_array_equal(np.asarray(r.token_M)[np.asarray(r.slot_TxK)], np.repeat(np.arange(T)[:, None], K, 1))


@pytest.mark.parametrize("impl", ["gather", "xla"])
def test_combine_of_permute_with_unit_weights_is_k_times_x(impl):
    logits, bias = logits_and_bias(7)
    r = route(logits, bias_E=bias, k=K, score="sigmoid")
    x = jax.random.normal(jax.random.PRNGKey(3), (T, 24), jnp.float32)
    out = combine(permute(x, r, impl=impl), r, jnp.ones((T, K)), impl=impl)
    np.testing.assert_allclose(out, K * x, rtol=1e-6)


def test_gather_and_xla_permute_combine_agree_with_gradients():
    logits, bias = logits_and_bias(8)
    x = jax.random.normal(jax.random.PRNGKey(4), (T, 24), jnp.float32)
    cot = jax.random.normal(jax.random.PRNGKey(5), (T, 24), jnp.float32)

    def f(impl):
        def g(x, lg):
            r = route(lg, bias_E=bias, k=K, score="sigmoid")
            xs = permute(x, r, impl=impl)
            return combine(jnp.tanh(xs) * xs, r, impl=impl)
        return g

    outs = [jax.vjp(f(impl), x, logits) for impl in ("gather", "xla")]
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outs[0][1](cot), outs[1][1](cot)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def moe_routed(params, x, gmm_fn):
    r = route(x, params["router"], params["bias"], k=2, score="sigmoid", n_group=2, topk_group=1,
              routed_scaling_factor=2.0)
    h = gmm_fn(permute(x, r), params["w_gate_up"], r.group_sizes_E)
    gate, up = jnp.split(h, 2, axis=-1)
    return combine(gmm_fn(jax.nn.silu(gate) * up, params["w_down"], r.group_sizes_E), r)


def test_moe_layer_on_tpu_kernels_equals_reference_layer():
    e, d, f, t = 4, 128, 128, 96
    ks = jax.random.split(jax.random.PRNGKey(11), 5)
    params = {"router": jax.random.normal(ks[0], (d, e)) * 0.1, "bias": jnp.zeros((e,)),
              "w_gate_up": jax.random.normal(ks[1], (e, d, 2 * f)) * d ** -0.5,
              "w_down": jax.random.normal(ks[2], (e, f, d)) * f ** -0.5}
    x = jax.random.normal(ks[3], (t, d))
    cot = jax.random.normal(ks[4], (t, d))
    tiles = GmmTilings(Tiling(64, 128, 128), Tiling(64, 128, 128), Tiling(128, 128, 128))
    kernel = lambda l, r, g: gmm(l, r, g, tiling=tiles, backend="tpu", interpret=True)
    out, vjp = jax.vjp(lambda p, x: moe_routed(p, x, kernel), params, x)
    out_ref, vjp_ref = jax.vjp(lambda p, x: moe_routed(p, x, reference.gmm_reference), params, x)
    np.testing.assert_allclose(out, out_ref, rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(vjp(cot)), jax.tree.leaves(vjp_ref(cot))):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_model_pallas_dispatch_equals_blocked_dispatch():
    n, d, f, e, k = 48, 32, 24, 6, 2
    ks = jax.random.split(jax.random.PRNGKey(12), 6)
    x = jax.random.normal(ks[0], (n, d))
    ids, w, _ = model_moe.route(jax.random.normal(ks[1], (n, e)), jnp.zeros((e,)), top_k=k, score_func="softmax",
                                n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0)
    weights = [jax.random.normal(kk, s) * 0.2 for kk, s in zip(ks[2:5], [(e, d, f), (e, d, f), (e, f, d)])]
    cot = jax.random.normal(ks[5], (n, d))
    blocked = lambda x, w, *p: model_moe.dispatch_experts(x, ids, w, *p, model_moe.grouped_matmul("blocked", 8))
    out_ref, vjp_ref = jax.vjp(blocked, x, w, *weights)
    for fused in (False, True):  # gate and up as two grouped matmuls, or one over the concatenated weight
        pallas = lambda x, w, *p: model_moe.dispatch_experts_pallas(x, ids, w, *p, fused_gate_up=fused)
        out, vjp = jax.vjp(pallas, x, w, *weights)
        np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(vjp(cot), vjp_ref(cot)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
