"""MuonClip: every clipped head's logits scale by exactly tau/S; a recomputed forward stays below tau."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import pretrain
from kanana_jax import config as config_lib
from kanana_jax.config import ModelConfig
from kanana_jax.model import Transformer
from kanana_jax.optim import muon_clip

L, D, H, R, DN, DR, DV, T = 2, 16, 4, 8, 6, 4, 5, 7


def _mla_params(key, q_lora):
    ks = jax.random.split(key, 5)
    attn = {"wkv_a": jax.random.normal(ks[0], (L, D, R + DR)), "kv_norm": {"scale": jnp.ones((L, R))},
            "wkv_b": jax.random.normal(ks[1], (L, R, H, DN + DV)), "wo": jax.random.normal(ks[2], (L, H, DV, D))}
    if q_lora:
        attn.update(wq_a=jax.random.normal(ks[3], (L, D, 5)), q_norm={"scale": jnp.ones((L, 5))},
                    wq_b=jax.random.normal(ks[4], (L, 5, H, DN + DR)))
    else:
        attn["wq"] = jax.random.normal(ks[3], (L, D, H, DN + DR))
    return {"moe_layers": {"attn": attn}}


def _mla_logits(attn, x_TxD):
    """Per layer/head logits [L, H, T, T] computed by hand (no norms, no rope: both are linear in the weights)."""
    q = (jnp.einsum("td,ldr->ltr", x_TxD, attn["wq_a"]) if "wq_b" in attn else None)
    q = (jnp.einsum("ltr,lrhk->lthk", q, attn["wq_b"]) if q is not None
         else jnp.einsum("td,ldhk->lthk", x_TxD, attn["wq"]))
    kv_a = jnp.einsum("td,ldr->ltr", x_TxD, attn["wkv_a"])
    k_nope = jnp.einsum("ltr,lrhe->lthe", kv_a[..., :R], attn["wkv_b"])[..., :DN]
    k_rope = kv_a[..., R:]
    return (jnp.einsum("lshk,lthk->lhst", q[..., :DN], k_nope) + jnp.einsum("lshk,ltk->lhst", q[..., DN:], k_rope))


@pytest.mark.parametrize("q_lora", [False, True])
def test_mla_clip_scales_each_head_logits_by_tau_over_s(q_lora):
    params = _mla_params(jax.random.PRNGKey(0), q_lora)
    x = jax.random.normal(jax.random.PRNGKey(1), (T, D))
    attn = params["moe_layers"]["attn"]
    before = _mla_logits(attn, x)
    s = before.max(axis=(2, 3))                                      # [L, H]
    tau = float(np.median(np.asarray(s)))
    new, metrics = muon_clip.apply({"params": params}, {"intermediates": {"moe_layers": {"attn": {"max_logits": (s,)}}}},
                                   tau)
    attn2 = new["params"]["moe_layers"]["attn"]
    after = _mla_logits(attn2, x)
    eta = np.where(np.asarray(s) > tau, tau / np.asarray(s), 1.0)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before) * eta[:, :, None, None], rtol=2e-5, atol=2e-5)
    assert float(after.max(axis=(2, 3)).max()) <= tau * (1 + 1e-3)
    # value columns, the shared rope key, the output projection and norms are untouched
    np.testing.assert_array_equal(np.asarray(attn2["wkv_b"][..., DN:]), np.asarray(attn["wkv_b"][..., DN:]))
    for name in ("wkv_a", "wo"):
        np.testing.assert_array_equal(np.asarray(attn2[name]), np.asarray(attn[name]))
    assert int(metrics["muon_clip/heads_clipped"]) == int((np.asarray(s) > tau).sum())
    for layer in range(L):
        assert float(metrics[f"muon_clip/max_logit/moe_layers/{layer}"]) == pytest.approx(float(s[layer].max()))


def test_gqa_clip_preserves_unclipped_heads_in_a_shared_key_group():
    kvh, g, dh = 2, 3, 5
    ks = jax.random.split(jax.random.PRNGKey(2), 3)
    attn = {"wq": jax.random.normal(ks[0], (L, D, kvh * g, dh)), "wk": jax.random.normal(ks[1], (L, D, kvh, dh)),
            "wv": jax.random.normal(ks[2], (L, D, kvh, dh))}
    x = jax.random.normal(jax.random.PRNGKey(3), (T, D))

    def logits(a):
        q = jnp.einsum("td,ldhk->lthk", x, a["wq"])
        k = jnp.repeat(jnp.einsum("td,ldhk->lthk", x, a["wk"]), g, axis=2)
        return jnp.einsum("lshk,lthk->lhst", q, k)

    before = logits(attn)
    s = before.max(axis=(2, 3))
    tau = float(np.quantile(np.asarray(s), 0.7))
    new, metrics = muon_clip.apply({"dense_layers": {"attn": attn}},
                                   {"dense_layers": {"attn": {"max_logits": (s,)}}}, tau)
    after = logits(new["dense_layers"]["attn"])
    eta = np.where(np.asarray(s) > tau, tau / np.asarray(s), 1.0)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before) * eta[:, :, None, None], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(new["dense_layers"]["attn"]["wv"]), np.asarray(attn["wv"]))
    assert int(metrics["muon_clip/heads_clipped"]) == int((np.asarray(s) > tau).sum()) > 0


@pytest.mark.parametrize("overrides", [{"q_lora_rank": 16, "logit_soft_cap": 30.0}, {"attention_type": "gqa"}])
def test_recomputed_forward_of_tiny_model_stays_below_tau(overrides):
    # One layer: with more, clipping layer l changes the inputs of layer l+1, whose logits may then move either way.
    base = config_lib.load(pretrain.get_config("size=tiny")).model
    cfg = ModelConfig(**{**base.__dict__, **overrides, "n_layers": 1, "first_k_dense": 1, "init_std": 0.3})
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    params = flax.linen.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    fwd = jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=["intermediates"])[1]["intermediates"])
    inter = fwd(params)
    s_all = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(
        jax.tree.map(lambda x: x, {k: v["attn"]["max_logits"] for k, v in inter.items() if "attn" in v}))])
    tau = float(np.quantile(s_all, 0.5))
    assert s_all.max() > tau * 1.1                                    # something to clip
    new_params, metrics = jax.jit(lambda p, i: muon_clip.apply(p, i, tau))(params, inter)
    s_new = np.concatenate([np.asarray(v).ravel() for v in jax.tree.leaves(
        {k: v["attn"]["max_logits"] for k, v in fwd(new_params).items() if "attn" in v})])
    assert s_new.max() <= tau * (1 + 1e-3), (s_new.max(), tau)
    assert int(metrics["muon_clip/heads_clipped"]) == int((s_all > tau).sum())
    assert float(metrics["muon_clip/max_logit"]) == pytest.approx(float(s_all.max()))
