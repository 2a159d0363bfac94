"""The weights' fp8 copies made once per optimizer step (model/fp8_weights.py, precision.fp8_prequantize): the
grouped and dense fp8 ops given the copies equal the ops quantizing in the call, bit for bit, in value and
gradients (dW still reaches the weight); through the train step's microbatch loop the loss, gradients and updated
amax histories equal the per-call path's (current and delayed scaling, scanned and unscanned stacks, fp8 LM
head); the model does read the copies, and a forward of other params (DPO's reference) does not."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.cli import build_config
from kanana_jax.model import fp8, fp8_weights
from kanana_jax.train import step as step_lib
from kanana_jax.train.builder import build_trainer
from pallas_kernels.moe.fp8 import QuantizedExperts, gmm_fp8

# a narrow tiny model: a dense and an MoE layer (each its own stack), MLA with q_lora, untied LM head
NARROW = ["model.n_layers=2", "model.first_k_dense=1", "model.d_model=64", "model.n_heads=2", "model.d_ff=128",
          "model.moe_d_ff=64", "model.n_routed_experts=4", "model.kv_lora_rank=32", "model.q_lora_rank=48",
          "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
          "model.dtype=bfloat16", "model.n_shared_experts=1"]


def _assert_trees_equal(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                      err_msg=jax.tree_util.keystr(path))


def test_gmm_with_copies_made_ahead_equals_quantizing_in_the_call():
    rng = np.random.default_rng(0)
    M, K, N, E = 40, 32, 24, 4
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((E, K, N)) * np.asarray([0.1, 1.0, 3.0, 0.02])[:, None, None], jnp.bfloat16)
    sizes = jnp.asarray([10, 0, 17, 9], jnp.int32)  # an empty group, 4 rows past the groups
    g = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)

    def loss(x, w, pre):
        rhs = w if pre is None else QuantizedExperts(w, *pre)
        return jnp.sum(gmm_fp8(x, rhs, sizes, backend="reference").astype(jnp.float32) * g)

    pre = QuantizedExperts.of(w)
    assert pre.q.dtype == jnp.float8_e4m3fn and pre.q_t.shape == (E, N, K) and pre.s.shape == (E,)
    per_call = jax.jit(jax.value_and_grad(lambda x, w: loss(x, w, None), argnums=(0, 1)))(x, w)
    ahead = jax.jit(jax.value_and_grad(lambda x, w, q, qt, s: loss(x, w, (q, qt, s)), argnums=(0, 1)))(
        x, w, pre.q, pre.q_t, pre.s)
    _assert_trees_equal(per_call, ahead)
    assert float(jnp.max(jnp.abs(ahead[1][1]))) > 0  # dW reaches the weight
    # copies that do not fit the weight are refused, naming the shapes
    with pytest.raises(ValueError, match="do not fit the weight"):
        gmm_fp8(x, QuantizedExperts(w, pre.q, pre.q, pre.s), sizes, backend="reference")


@pytest.mark.parametrize("scaling", ["current", "delayed"])
def test_dense_matmul_with_copies_made_ahead_equals_quantizing_in_the_call(scaling):
    rng = np.random.default_rng(1)
    recipe = fp8.Fp8Recipe(scaling=scaling, amax_history=3)
    x = jnp.asarray(rng.standard_normal((6, 5, 4, 8)), jnp.bfloat16)   # [B, T, H, Dv]
    w = jnp.asarray(rng.standard_normal((4, 8, 16)) * 0.3, jnp.bfloat16)  # [H, Dv, D]: two contracted dims
    history = jnp.asarray([[2.0, 1, 0], [90.0, 0, 0], [0.5, 3, 1]], jnp.float32)  # w row: scale far from now
    g = jnp.asarray(rng.standard_normal((6, 5, 16)), jnp.float32)

    def loss(x, w, h, pre):
        y = fp8.matmul(x, w, recipe, n_contract=2, history=h, pre=pre)
        return jnp.sum(y.astype(jnp.float32) * g)

    pre = fp8.quantize_weight(w.reshape(32, 16), history[1], recipe.delayed)
    per_call = jax.jit(jax.value_and_grad(lambda x, w, h: loss(x, w, h, None), argnums=(0, 1, 2)))(x, w, history)
    ahead = jax.jit(jax.value_and_grad(lambda x, w, h, pre: loss(x, w, h, pre), argnums=(0, 1, 2)))(
        x, w, history, pre)
    _assert_trees_equal(per_call, ahead)
    # the updated history (the op's cotangent of `history`) records the weight's current amax either way
    assert float(ahead[1][2][1, 0]) == float(pre["amax"]) == float(jnp.max(jnp.abs(w.astype(jnp.float32))))
    if scaling == "delayed":  # the weight was scaled from its history (90), not from its amax now (~1)
        assert float(pre["s"]) == float(fp8.fp8_lib.scale_for(90.0, fp8.fp8_lib.E4M3))
    with pytest.raises(ValueError, match="does not fit w"):
        fp8.matmul(x, w, recipe, n_contract=2, pre=fp8.quantize_weight(w.reshape(4, 128)))


def _setup(extra):
    _, cfg = build_config("experiments/pretrain.py:size=tiny,steps=2,batch=8,seq_len=32",
                          ["train.grad_accum_steps=2", "precision.matmul=fp8", *NARROW, *extra])
    trainer = build_trainer(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (8, 33)).astype(np.int32)
    batch = {"inputs_BxT": tokens[:, :-1], "targets_BxT": tokens[:, 1:],
             "segment_ids_BxT": np.ones((8, 32), np.int32),
             "positions_BxT": np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)).copy(),
             "loss_mask_BxT": (rng.random((8, 32)) > 0.2).astype(np.float32)}
    return cfg, trainer, batch


def _grads(trainer, cfg, state, batch, prequantize: bool):
    def fn(params, model_state, batch):
        params_c = step_lib.compute_dtype_copy(params, cfg)
        copies = step_lib.fp8_weights_of(params_c, model_state, cfg) if prequantize else {}
        grad_fn = step_lib.loss_and_grad_fn(trainer.stage, trainer.model, {}, cfg, model_state, copies)
        loss, aux, grads = step_lib.accumulate_gradients(grad_fn, params, batch, cfg, jax.random.PRNGKey(1),
                                                         params_c=params_c)
        return loss, grads, aux.get("model_state", {}), copies
    return jax.jit(fn)(state.params, state.model_state, batch)


@pytest.mark.parametrize("extra", [
    ["precision.fp8_lm_head=true"],                                               # scanned stacks, current
    ["precision.fp8_scaling=delayed", "precision.fp8_amax_history=2", "model.scan_layers=false"],
], ids=["current_scanned_lm_head", "delayed_unscanned"])
def test_step_with_copies_made_once_equals_quantizing_per_microbatch(extra):
    cfg, trainer, batch = _setup(extra)
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(0))
        if state.model_state:  # histories far from the amaxes now: the weights' scales come from them
            state = state.replace(model_state=jax.tree.map(
                lambda h: jnp.full(h.shape, 7.0, h.dtype).at[..., 1].set(0.0), state.model_state))
        loss_a, grads_a, ms_a, copies = _grads(trainer, cfg, state, batch, prequantize=True)
        loss_b, grads_b, ms_b, none = _grads(trainer, cfg, state, batch, prequantize=False)
    assert none == {} and np.isfinite(float(loss_a))
    sites = {jax.tree_util.keystr(p[:-1]) for p, _ in jax.tree_util.tree_flatten_with_path(copies)[0]}
    stack = "['moe_layers']" if cfg.model.scan_layers else "['moe_layers_0']"
    assert {f"{stack}['moe']['experts']['w_gate']", f"{stack}['attn']['wo']",
            f"{stack}['moe']['shared']['w_up']"} <= sites, sites
    assert any("lm_head" in s for s in sites) == cfg.precision.fp8_lm_head
    if cfg.model.scan_layers:  # one scale per layer (and expert) of a stack
        assert copies["moe_layers"]["moe"]["experts"]["w_down"]["s"].shape == (1, cfg.model.n_routed_experts)
        assert copies["dense_layers"]["attn"]["wo"]["q_t"].shape == (1, 64, 2 * 16)
    assert float(loss_a) == float(loss_b)
    _assert_trees_equal(grads_a, grads_b)
    _assert_trees_equal(ms_a, ms_b)


def test_the_model_reads_the_copies_and_other_params_do_not():
    cfg, trainer, batch = _setup(["model.scan_layers=false"])
    with trainer.context():
        params = step_lib.compute_dtype_copy(trainer.init(jax.random.PRNGKey(0)).params, cfg)
        args = (batch["inputs_BxT"], batch["positions_BxT"], batch["segment_ids_BxT"])
        copies = fp8_weights.prequantize(params, fp8.recipe_from(cfg.precision), cfg.model)
        wrong = {fp8.WEIGHTS: jax.tree.map(lambda a: a * 2 if a.dtype == jnp.float32 else a, copies)}  # scales x2
        other = jax.tree.map(lambda a: a * 0.5, params)

        @jax.jit
        def logits(params, other):
            plain = trainer.model.apply({"params": params}, *args)
            model = step_lib.ModelWithState(trainer.model, {}, wrong, params)
            return plain, model.apply({"params": params}, *args), model.apply({"params": other}, *args), \
                trainer.model.apply({"params": other}, *args)
        plain, with_wrong, other_with, other_plain = logits(params, other)
    assert not np.array_equal(np.asarray(plain), np.asarray(with_wrong))  # the copies are what the sites read
    np.testing.assert_array_equal(np.asarray(other_with), np.asarray(other_plain))  # not for other params
