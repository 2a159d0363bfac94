"""The model with fp8 matmuls: projections, MLPs, experts and (optionally) the LM head honour the recipe, gradients
reach every weight, delayed scaling keeps its amax histories in the 'fp8_meta' collection, and fp8 where it cannot
work raises a message naming the key."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sizes
from kanana_jax.config import ModelConfig
from kanana_jax.model import Transformer, fp8


def _cfg(**kw):
    base = dict(sizes.model_overrides("tiny"), n_layers=2, dtype="bfloat16")
    base.update(kw)
    return ModelConfig(**base)


def _tokens():
    return jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 320)


def _loss(model, variables, tokens):
    logits, _ = model.apply(variables, tokens, mutable=["intermediates", "aux_loss"])
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])


def test_fp8_model_tracks_bf16_and_every_weight_gets_a_gradient():
    cfg = _cfg(n_layers=2, first_k_dense=1)
    recipe = fp8.Fp8Recipe(lm_head=True)
    tokens = _tokens()
    params = jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), tokens)["params"]
    y16 = jax.jit(Transformer(cfg).apply)({"params": params}, tokens)
    y8 = jax.jit(Transformer(cfg, recipe).apply)({"params": params}, tokens)
    assert y8.dtype == jnp.float32
    rel = float(jnp.linalg.norm(y8 - y16) / jnp.linalg.norm(y16))
    assert 1e-4 < rel < 0.1, rel  # quantized (differs), within a few fp8 roundings of bf16
    grads = jax.jit(jax.grad(lambda p: _loss(Transformer(cfg, recipe), {"params": p}, tokens)))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    for path, g in flat:
        name = jax.tree_util.keystr(path)
        assert np.all(np.isfinite(np.asarray(g, np.float32))), name
        if "bias" not in name:  # the router bias is updated outside the gradient
            assert float(jnp.max(jnp.abs(g))) > 0, name
    # the projections, experts and LM head run fp8 products (e4m3 forward, e5m2 output gradients)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: _loss(Transformer(cfg, recipe), {"params": p}, tokens)))(params))
    assert jaxpr.count("f8_e4m3fn") > 10 and "f8_e5m2" in jaxpr


def test_delayed_scaling_histories_live_in_fp8_meta_and_come_back_updated():
    cfg = _cfg()
    recipe = fp8.Fp8Recipe(scaling="delayed", amax_history=4)
    model, tokens = Transformer(cfg, recipe), _tokens()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    meta = variables[fp8.COLLECTION]
    leaves = jax.tree_util.tree_flatten_with_path(meta)[0]
    names = {jax.tree_util.keystr(p) for p, _ in leaves}
    assert any("moe_layers" in n and "wkv_a" in n for n in names) and any("shared" in n for n in names)
    for path, h in leaves:  # scanned stacks carry a leading layer axis
        assert h.shape[-2:] == (3, 4) and np.all(np.asarray(h) == 0), jax.tree_util.keystr(path)
    loss = lambda p, m: _loss(model, {"params": p, fp8.COLLECTION: m}, tokens)
    _, new_meta = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], meta)
    for (path, old), new in zip(leaves, jax.tree.leaves(new_meta)):
        newest, rest = np.asarray(new)[..., 0], np.asarray(new)[..., 1:]
        assert np.all(newest > 0), jax.tree_util.keystr(path)  # amax of x, w and g recorded for every site
        np.testing.assert_array_equal(rest, np.asarray(old)[..., :3])
    summary = fp8.summarize(new_meta)
    assert summary and all(float(v) > 0 for v in summary.values())


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
    @dataclasses.dataclass
    class Precision:
        matmul: str = "fp8"
        fp8_grad_dtype: str = "e4m3"
        fp8_lm_head: bool = True
        fp8_scaling: str = "delayed"
        fp8_amax_history: int = 8
    r = fp8.recipe_from(Precision())
    assert (r.grad_dtype, r.lm_head, r.scaling, r.amax_history) == ("e4m3", True, "delayed", 8)
    assert fp8.recipe_from(Precision(matmul="bf16")) is None
