"""Model behaviour: shapes/dtypes, causality, segment isolation, routing invariants, dispatch, parameter counts."""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain
from kanana_jax import config as config_lib
from kanana_jax.config import ModelConfig
from kanana_jax.model import Transformer
from kanana_jax.model.flops import count_params
from kanana_jax.model.moe import blocked_gmm, dispatch_experts, route

TINY = config_lib.load(pretrain.get_config("size=tiny")).model


@functools.lru_cache(maxsize=None)
def _init(cfg, B=2, T=16, seed=0):
    """The model, random params of the init's shapes and dtypes (norm scales and biases as the init sets them, the
    rest normal with cfg.init_std, drawn with NumPy: compiling the init's per-leaf RNG would cost ~10 s per config
    on a 2-core CPU, and these tests need any params, not the init's values) and tokens."""
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(seed + 1), (B, T), 0, cfg.vocab_size)
    shapes = flax.linen.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(seed), tokens)["params"])
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path[-1:])
        if "scale" in name:
            value = np.full(leaf.shape, 1.0 if cfg.norm_param == "scale" else 0.0)
        elif "bias" in name:
            value = np.zeros(leaf.shape)
        else:
            value = rng.normal(0.0, cfg.init_std, leaf.shape)
        return jnp.asarray(value, leaf.dtype)
    return model, jax.tree_util.tree_map_with_path(fill, shapes), tokens


@pytest.mark.parametrize("overrides", [
    {}, {"attention_type": "gqa"}, {"q_lora_rank": 16, "tie_embeddings": True, "norm_param": "one_plus"},
    {"dtype": "bfloat16", "score_func": "softmax", "n_group": 1}, {"scan_layers": False, "remat_policy": "full"},
    {"rope_scaling": "yarn", "yarn_factor": 4.0, "yarn_original_max_position": 8, "logit_soft_cap": 30.0},
])
def test_forward_shapes_dtypes_and_sown_stats(overrides):
    cfg = ModelConfig(**{**TINY.__dict__, **overrides})
    model, params, tokens = _init(cfg)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates", "aux_loss"]))
    logits, state = apply(params, tokens)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    if cfg.scan_layers:
        max_logits = state["intermediates"]["moe_layers"]["attn"]["max_logits"][0]
        assert max_logits.shape == (cfg.n_moe_layers, cfg.n_heads)
        load = state["intermediates"]["moe_layers"]["moe"]["expert_load"][0]
        assert load.shape == (cfg.n_moe_layers, cfg.n_routed_experts)
        np.testing.assert_allclose(np.asarray(load).sum(-1), 2 * 16 * cfg.top_k)  # every token copy routed


def test_causality_gradient_to_later_positions_is_exactly_zero():
    model, params, tokens = _init(TINY, B=1, T=12)
    emb = jax.random.normal(jax.random.PRNGKey(3), (1, 12, TINY.d_model))
    t = 5

    def out_at_t(e):
        return model.apply({"params": params}, tokens, input_embeddings_BxTxD=e)[0, t].sum()

    g = np.asarray(jax.jit(jax.grad(out_at_t))(emb))
    assert np.all(g[0, t + 1:] == 0.0)
    assert np.abs(g[0, : t + 1]).sum(-1).min() > 0  # and earlier positions do matter


def test_segments_do_not_attend_across_documents():
    model, params, tokens = _init(TINY, B=1, T=12)
    seg = jnp.array([[1] * 6 + [2] * 6])
    pos = jnp.array([list(range(6)) * 2])
    apply = jax.jit(lambda t, p, s: model.apply({"params": params}, t, p, s))
    full = apply(tokens, pos, seg)
    alone = apply(tokens[:, 6:], pos[:, 6:], seg[:, 6:])
    np.testing.assert_allclose(full[:, 6:], alone, atol=2e-5)


def _route(logits, bias, **kw):
    args = dict(top_k=2, score_func="sigmoid", n_group=1, topk_group=1, norm_topk_prob=True,
                routed_scaling_factor=1.0)
    args.update(kw)
    return route(logits, bias, **args)


def test_routing_invariants():
    key = jax.random.PRNGKey(0)
    logits = jax.random.normal(key, (64, 8))
    bias = jnp.zeros(8)
    ids, w, scores = _route(logits, bias, top_k=3, routed_scaling_factor=2.5)
    assert ids.shape == (64, 3)
    assert all(len(set(row)) == 3 for row in np.asarray(ids).tolist())  # k distinct experts per token
    np.testing.assert_allclose(np.asarray(w).sum(-1), 2.5, rtol=1e-5)   # normalized, then scaled
    np.testing.assert_array_equal(np.sort(ids, -1), np.sort(jax.lax.top_k(jax.nn.sigmoid(logits), 3)[1], -1))
    # bias changes selection but weights stay the unbiased scores of the chosen experts
    bias = jnp.zeros(8).at[7].set(10.0)
    ids_b, w_b, _ = _route(logits, bias, top_k=3, norm_topk_prob=False)
    assert np.all(np.any(np.asarray(ids_b) == 7, axis=-1))
    np.testing.assert_allclose(w_b, jnp.take_along_axis(jax.nn.sigmoid(logits), ids_b, -1), rtol=1e-6)
    # softmax scoring without normalization: weights are the softmax probabilities
    ids_s, w_s, _ = _route(logits, jnp.zeros(8), score_func="softmax", norm_topk_prob=False)
    np.testing.assert_allclose(w_s, jnp.take_along_axis(jax.nn.softmax(logits), ids_s, -1), rtol=1e-6)


def test_group_limited_routing_picks_only_from_top_groups():
    logits = jax.random.normal(jax.random.PRNGKey(1), (128, 16))
    ids, _, scores = _route(logits, jnp.zeros(16), top_k=4, n_group=4, topk_group=2)
    groups = np.asarray(scores).reshape(128, 4, 4)
    group_score = np.sort(groups, -1)[..., -2:].sum(-1)
    top_groups = np.argsort(-group_score, -1)[:, :2]
    chosen_groups = np.asarray(ids) // 4
    for row in range(128):
        assert set(chosen_groups[row]) <= set(top_groups[row])


def _dense_experts(x, ids, w, wg, wu, wd):
    out = jnp.zeros_like(x)
    for j in range(ids.shape[1]):
        e = ids[:, j]
        h = jax.nn.silu(jnp.einsum("nd,ndf->nf", x, wg[e])) * jnp.einsum("nd,ndf->nf", x, wu[e])
        out += w[:, j:j + 1] * jnp.einsum("nf,nfd->nd", h, wd[e])
    return out


@pytest.mark.parametrize("gmm_name", ["blocked", "ragged_dot"])
def test_dispatch_processes_every_token_and_matches_dense(gmm_name):
    ks = jax.random.split(jax.random.PRNGKey(2), 6)
    N, D, F, E, k = 40, 16, 24, 6, 2
    x = jax.random.normal(ks[0], (N, D))
    ids, w, _ = _route(jax.random.normal(ks[1], (N, E)), jnp.zeros(E), top_k=k)
    wg, wu = (jax.random.normal(kk, (E, D, F)) * 0.3 for kk in ks[2:4])
    wd = jax.random.normal(ks[4], (E, F, D)) * 0.3
    gmm = (lambda a, b, g: blocked_gmm(a, b, g, block=8)) if gmm_name == "blocked" else jax.lax.ragged_dot
    f = lambda *a: dispatch_experts(x, ids, w, *a, gmm=gmm)
    np.testing.assert_allclose(f(wg, wu, wd), _dense_experts(x, ids, w, wg, wu, wd), atol=1e-4, rtol=1e-4)
    g = jax.grad(lambda a, b, c: f(a, b, c).sum(), argnums=(0, 1, 2))(wg, wu, wd)
    g_ref = jax.grad(lambda a, b, c: _dense_experts(x, ids, w, a, b, c).sum(), argnums=(0, 1, 2))(wg, wu, wd)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_blocked_gmm_handles_empty_groups_and_trailing_rows():
    x = jax.random.normal(jax.random.PRNGKey(5), (13, 4))
    w = jax.random.normal(jax.random.PRNGKey(6), (4, 4, 3))
    sizes = jnp.array([0, 7, 0, 4])  # 11 of 13 rows belong to groups; the last 2 must give zeros
    out = blocked_gmm(x, w, sizes, block=8)
    np.testing.assert_allclose(out[:7], x[:7] @ w[1], atol=1e-5)
    np.testing.assert_allclose(out[7:11], x[7:11] @ w[3], atol=1e-5)
    np.testing.assert_array_equal(out[11:], 0.0)


def test_kanana2_30b_a3b_parameter_counts():
    counts = count_params(config_lib.load(pretrain.get_config("size=kanana2_30b_a3b")).model)
    assert 30e9 <= counts["total"]["all"] <= 32e9
    assert 2.8e9 <= counts["active"]["all"] <= 3.3e9


def test_kanana2_155b_a17b_reconstruction_counts():
    counts = count_params(config_lib.load(pretrain.get_config("size=kanana2_155b_a17b")).model)
    assert 150e9 <= counts["total"]["all"] <= 160e9
    assert 16e9 <= counts["active"]["all"] <= 18e9


def test_logits_matmul_gradients_equal_plain_einsum():
    from kanana_jax.model.layers import logits_matmul
    h = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 8))
    w = jax.random.normal(jax.random.PRNGKey(8), (8, 11))
    g = jax.random.normal(jax.random.PRNGKey(9), (2, 3, 11))
    plain = lambda h, w: jnp.einsum("btd,dv->btv", h, w)
    out, vjp = jax.vjp(logits_matmul, h, w)
    ref, vjp_ref = jax.vjp(plain, h, w)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    for a, b in zip(vjp(g), vjp_ref(g)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_routing_metrics_for_scanned_and_unscanned_stacks():
    from kanana_jax.train.hooks import routing_metrics
    for overrides in ({}, {"scan_layers": False}):
        cfg = ModelConfig(**{**TINY.__dict__, **overrides})
        model, params, tokens = _init(cfg)
        _, state = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=["intermediates"]))(params, tokens)
        metrics = routing_metrics(state["intermediates"])
        assert metrics["expert_load_max_over_mean"] >= 1.0
        assert np.isfinite(metrics["max_attention_logit"])
