"""The model with fp8 matmuls: projections, MLPs, experts and (optionally) the LM head honour the recipe, gradients
reach every weight, and fp8 where it cannot work raises a message naming the key. (Delayed scaling's 'fp8_meta'
histories in a training run: tests/test_fp8_train.py.)"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sizes
from kanana_jax.config import ModelConfig, PrecisionConfig
from kanana_jax.model import Transformer, fp8


def _cfg(**kw):  # tiny, narrower: one dense and one MoE layer, unscanned (compile time is the test's cost)
    base = dict(sizes.model_overrides("tiny"), n_layers=2, dtype="bfloat16", d_model=64, n_heads=2, d_ff=128,
                scan_layers=False,
                moe_d_ff=64, n_routed_experts=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16)
    base.update(kw)
    return ModelConfig(**base)


def _tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 320)


def test_fp8_model_tracks_bf16_and_every_weight_gets_a_gradient():
    cfg = _cfg(n_layers=2, first_k_dense=1)
    recipe = fp8.Fp8Recipe(lm_head=True)
    tokens = _tokens()
    # params like the init's (norm scales 1, router bias 0, matrices N(0, 0.02)) without compiling the init
    shapes = flax.linen.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), tokens)["params"])
    rng = np.random.default_rng(0)
    fill = lambda path, s: jnp.asarray(
        np.ones(s.shape) if path[-1].key == "scale" else np.zeros(s.shape) if path[-1].key == "bias"
        else rng.standard_normal(s.shape) * cfg.init_std, s.dtype)
    params = jax.tree_util.tree_map_with_path(fill, shapes)

    def both(p):  # one program: bf16 logits, fp8 logits and fp8 gradients
        fp8_loss = lambda p: (lambda y: (-jnp.mean(jax.nn.log_softmax(y)[..., 0]), y))(
            Transformer(cfg, recipe).apply({"params": p}, tokens))
        (_, y8), grads = jax.value_and_grad(fp8_loss, has_aux=True)(p)
        return Transformer(cfg).apply({"params": p}, tokens), y8, grads
    lowered = jax.jit(both).lower(params)
    # the projections, experts and LM head run fp8 products (e4m3 forward, e5m2 output gradients)
    text = lowered.as_text()
    assert text.count("f8E4M3FN") > 10 and "f8E5M2" in text
    # without LLVM optimization (half the compile time; the checks are tolerances, not bits)
    y16, y8, grads = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})(params)
    assert y8.dtype == jnp.float32
    rel = float(jnp.linalg.norm(y8 - y16) / jnp.linalg.norm(y16))
    assert 1e-4 < rel < 0.1, rel  # quantized (differs), within a few fp8 roundings of bf16
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for path, g in flat:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        if "bias" not in name:  # the router bias is updated outside the gradient
            assert float(jnp.max(jnp.abs(g))) > 0, name


def test_fp8_where_it_cannot_work_raises_naming_the_key():
    tokens = _tokens()
    with pytest.raises(ValueError, match="moe_impl"):
        jax.eval_shape(Transformer(_cfg(moe_impl="ragged_dot"), fp8.Fp8Recipe()).init, jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match="fp8_lm_head"):
        jax.eval_shape(Transformer(_cfg(tie_embeddings=True), fp8.Fp8Recipe(lm_head=True)).init,
                       jax.random.PRNGKey(0), tokens)
    with pytest.raises(ValueError, match="cannot be measured on 'cpu'"):
        fp8.check_supported(fp8.Fp8Recipe(), for_timing=True)
    fp8.check_supported(fp8.Fp8Recipe())  # training on CPU runs the exact emulation: allowed
    fp8.check_supported(None, for_timing=True)


def test_recipe_from_a_precision_section():
    r = fp8.recipe_from(PrecisionConfig(matmul="fp8", fp8_grad_dtype="e4m3", fp8_lm_head=True, fp8_scaling="delayed",
                                        fp8_amax_history=8))
    assert (r.grad_dtype, r.lm_head, r.scaling, r.amax_history) == ("e4m3", True, "delayed", 8)
    assert fp8.recipe_from(PrecisionConfig()) is None


def test_fp8_expert_weight_gradient_changes_only_the_experts_gradients():
    """precision.fp8_expert_wgrad: the routed experts' dW from the fp8 tgmm, close to the bf16 one; every other
    gradient (dx paths are unchanged) and the loss equal bit for bit."""
    cfg = _cfg(n_layers=1, first_k_dense=0)
    tokens = _tokens()
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)["params"]

    def grads(p):
        loss = lambda p, r: -jnp.mean(jax.nn.log_softmax(Transformer(cfg, r).apply({"params": p}, tokens))[..., 0])
        return [jax.value_and_grad(loss)(p, fp8.Fp8Recipe(expert_wgrad=w)) for w in (False, True)]
    (l16, g16), (l8, g8) = jax.jit(grads).lower(params).compile(
        compiler_options={"xla_backend_optimization_level": 0})(params)
    assert float(l16) == float(l8)
    experts = 0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g16)[0], jax.tree.leaves(g8)):
        name = jax.tree_util.keystr(path)
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if "experts" in name and "shared" not in name and "w_" in name:
            experts += 1
            rel = np.linalg.norm(b32 - a32) / np.linalg.norm(a32)
            assert 1e-4 < rel < 0.15, (name, rel)  # requantized operands: differs, within fp8 rounding
        else:
            np.testing.assert_array_equal(a32, b32, err_msg=name)
    assert experts == 3
    assert fp8.recipe_from(PrecisionConfig(matmul="fp8", fp8_expert_wgrad=True)).expert_wgrad
