"""Gradient accumulation: train.grad_accum_steps microbatches give the full batch's loss, gradients and sown
values, and the whole train step (Muon + MuonClip) matches the one-shot step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kanana_jax.cli import build_config
from kanana_jax.config import ConfigError
from kanana_jax.train import step as step_lib
from kanana_jax.train.builder import build_trainer


def _cfg(accum, extra=()):
    _, cfg = build_config("experiments/pretrain.py:size=tiny,steps=10,batch=8,seq_len=32",
                          ["model.dtype=float32", f"train.grad_accum_steps={accum}", *extra])
    return cfg


def _batch(cfg, seed=0):
    """Random tokens, 2-3 packed documents per row and a loss mask with holes (uneven tokens per microbatch)."""
    rng = np.random.default_rng(seed)
    B, T, V = cfg.data.global_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    seg = np.sort(rng.integers(1, 4, (B, T)), axis=1).astype(np.int32)
    pos = np.zeros((B, T), np.int32)
    for b in range(B):
        for t in range(1, T):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
    return {"inputs_BxT": tokens[:, :-1], "targets_BxT": tokens[:, 1:], "segment_ids_BxT": seg,
            "positions_BxT": pos, "loss_mask_BxT": mask}


def test_microbatches_are_strided_rows():
    x = jnp.arange(12).reshape(6, 2)
    mb = step_lib.microbatches({"x": x}, 3)["x"]
    assert mb.shape == (3, 2, 2)
    np.testing.assert_array_equal(mb[1], x[1::3])


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_loss_grads_and_sown_values_equal_the_full_batch(accum):
    cfg1, cfgn = _cfg(1), _cfg(accum)
    trainer = build_trainer(cfg1)
    batch = _batch(cfg1)
    with trainer.context():
        params = trainer.init(jax.random.PRNGKey(0)).params
        grad_fn = step_lib.loss_and_grad_fn(trainer.stage, trainer.model, {}, cfg1)
        rng = jax.random.PRNGKey(1)
        (loss1, aux1), grads1 = jax.jit(lambda p, b: grad_fn(p, b, rng))(params, batch)
        lossn, auxn, gradsn = jax.jit(lambda p, b: step_lib.accumulate_gradients(grad_fn, p, b, cfgn, rng))(params,
                                                                                                             batch)
    np.testing.assert_allclose(float(lossn), float(loss1), rtol=2e-5)
    assert float(auxn["metrics"]["tokens"]) == float(aux1["metrics"]["tokens"]) == batch["loss_mask_BxT"].sum()
    for g1, gn in zip(jax.tree.leaves(grads1), jax.tree.leaves(gradsn)):
        np.testing.assert_allclose(np.asarray(gn), np.asarray(g1), rtol=2e-4, atol=1e-6 * float(jnp.max(jnp.abs(g1))))
    paths1 = jax.tree_util.tree_leaves_with_path(aux1["intermediates"])
    for (path, v1), vn in zip(paths1, jax.tree.leaves(auxn["intermediates"])):
        # max logits: max over microbatches == max over the batch; expert loads: counts add up
        np.testing.assert_allclose(np.asarray(vn), np.asarray(v1), rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_train_step_with_accumulation_matches_one_shot_step():
    extra = ["optimizer.name=muon", "optimizer.muon_clip_tau=0.01"]
    states, metrics = [], []
    for accum in (1, 4):
        cfg = _cfg(accum, extra)
        trainer = build_trainer(cfg)
        with trainer.context():
            state = trainer.init(jax.random.PRNGKey(0))
            state, m = trainer.train_step(state, _batch(cfg))
        states.append(state)
        metrics.append(m)
    assert float(metrics[1]["muon_clip/heads_clipped"]) == float(metrics[0]["muon_clip/heads_clipped"]) > 0
    np.testing.assert_allclose(float(metrics[1]["loss"]), float(metrics[0]["loss"]), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-3, atol=2e-5)


def test_accum_steps_must_divide_the_batch():
    with pytest.raises(ConfigError, match="train.grad_accum_steps.*divisor of 8"):
        _cfg(3)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_bf16_copy_of_compute_weights_gives_the_same_gradients(attention):
    """With bf16 compute, differentiating through the once-per-step bf16 copy (what accumulation does) gives
    exactly the gradients of the float32 parameters: the model only reads those weights through a cast."""
    _, cfg = build_config("experiments/pretrain.py:size=tiny,steps=10,batch=4,seq_len=32",
                          ["model.dtype=bfloat16", f"model.attention_type={attention}"])
    trainer = build_trainer(cfg)
    batch = _batch(cfg, seed=1)
    with trainer.context():
        params = trainer.init(jax.random.PRNGKey(0)).params
        grad_fn = jax.grad(lambda p, b: trainer.stage.loss_fn(trainer.model, p, {}, b, cfg, None)[0])
        g32 = jax.jit(grad_fn)(params, batch)
        g16 = jax.jit(lambda p, b: grad_fn(step_lib.compute_dtype_copy(p, cfg), b))(params, batch)
    cast = 0
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g16)):
        cast += b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b.astype(jnp.float32)), np.asarray(a),
                                      err_msg=jax.tree_util.keystr(path))
    assert cast >= 8    # attention projections, dense MLP, shared and routed experts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_first_microbatch_outside_the_loop_gives_the_same_sums(dtype):
    """train.grad_accum_first_outside (microbatch 0's gradients initialize the accumulator instead of zeros + add)
    gives the loop's loss, metrics, gradients and sown values exactly: adding into zeros changes no value."""
    _, cfg = build_config("experiments/pretrain.py:size=tiny,steps=10,batch=8,seq_len=32",
                          [f"model.dtype={dtype}", "train.grad_accum_steps=4"])
    cfg_out = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_first_outside=True))
    trainer = build_trainer(cfg)
    batch = _batch(cfg, seed=2)
    with trainer.context():
        params = trainer.init(jax.random.PRNGKey(0)).params
        grad_fn = step_lib.loss_and_grad_fn(trainer.stage, trainer.model, {}, cfg)
        rng = jax.random.PRNGKey(3)
        runs = [jax.jit(lambda p, b, c=c: step_lib.accumulate_gradients(grad_fn, p, b, c, rng))(params, batch)
                for c in (cfg, cfg_out)]
    (loss_a, aux_a, grads_a), (loss_b, aux_b, grads_b) = runs
    assert float(loss_b) == float(loss_a)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path((aux_a, grads_a)), jax.tree.leaves((aux_b, grads_b))):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=jax.tree_util.keystr(path))
