"""The stage protocol with a stage unlike pre-training: batches of pairs [B, 2, T] with a per-row field [B], and
a frozen reference model in `extra` (as DPO has).

Single device: the reference gets no gradient and no optimizer state and never changes; the KL to it is 0 at
step 0; 'ratios' and 'sums' metrics combine over microbatches; two microbatches equal one pass (pairs are never
split). 8 fake CPU devices (this file run as a script, its own process): the fields are sharded by rows and the
sharded step equals the single-device step.
"""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __name__ == "__main__":  # the 8-device checks: before anything imports kanana_jax from another path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kanana_jax.cli import build_config  # noqa: E402
from kanana_jax.parallel.fake_devices import main_for_checks, run_checks  # noqa: E402
from kanana_jax.train import step as step_lib  # noqa: E402
from kanana_jax.train.builder import build_trainer  # noqa: E402
from kanana_jax.train.stages import BatchField, Stage  # noqa: E402

B, T, BETA = 8, 16, 0.5


class PairStage:
    """Pairs of sequences, a per-pair weight, and a KL penalty to the frozen initial params."""

    @staticmethod
    def init_extra(cfg, params, rng):
        return {"reference": jax.tree.map(jnp.copy, params)}

    @staticmethod
    def _logits(model, params, tokens_Bx2xT):
        out, state = model.apply({"params": params}, tokens_Bx2xT.reshape(-1, T), mutable=["intermediates"])
        return out.reshape(tokens_Bx2xT.shape + (-1,)), state.get("intermediates", {})

    @classmethod
    def loss_fn(cls, model, params, extra, batch, cfg, rng):
        logits, inter = cls._logits(model, params, batch["tokens_Bx2xT"])
        ref_logits, _ = cls._logits(model, extra["reference"], batch["tokens_Bx2xT"])
        ce_Bx2xT = optax.softmax_cross_entropy_with_integer_labels(logits[:, :, :-1], batch["tokens_Bx2xT"][:, :, 1:])
        w_B = batch["weight_B"]
        pair_loss_B = jnp.mean(ce_Bx2xT, axis=(1, 2))
        logp, ref_logp = jax.nn.log_softmax(logits), jax.nn.log_softmax(jax.lax.stop_gradient(ref_logits))
        kl_B = jnp.mean(jnp.sum(jnp.exp(logp) * (logp - ref_logp), -1), axis=(1, 2))
        n = jnp.sum(w_B)
        loss = jnp.sum(w_B * (pair_loss_B + BETA * kl_B)) / n
        return loss, {"metrics": {"kl": jnp.sum(w_B * kl_B) / n}, "intermediates": inter, "weight": n,
                      "sums": {"pairs": jnp.float32(w_B.shape[0])},
                      "ratios": {"first_better": (jnp.sum(ce_Bx2xT[:, 0].mean(-1) < ce_Bx2xT[:, 1].mean(-1)),
                                                  jnp.float32(w_B.shape[0]))}}

    @classmethod
    def eval_fn(cls, model, params, extra, batch, cfg):
        loss, aux = cls.loss_fn(model, params, extra, batch, cfg, None)
        return {"eval_loss": loss, "eval_weight": aux["weight"]}

    @staticmethod
    def eval_metrics(cfg):
        return {"eval_loss": "eval_weight"}

    @staticmethod
    def batch_spec(cfg):
        return {"tokens_Bx2xT": BatchField((B, 2, T), np.int32), "weight_B": BatchField((B,), np.float32)}

    @staticmethod
    def make_source(cfg, split, seed, shard_index=0, shard_count=1):
        raise NotImplementedError("this test feeds batches itself")


STAGE = Stage.from_module("pairs", PairStage)


def _cfg(accum=1, extra=()):
    _, cfg = build_config("experiments/pretrain.py:size=tiny,steps=10,batch=8,seq_len=16",
                          ["model.n_layers=2", f"train.grad_accum_steps={accum}", "optimizer.warmup_steps=0",
                           "optimizer.schedule=constant", "optimizer.learning_rate=3e-3", "optimizer.eps=1e-3", *extra])
    return cfg


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"tokens_Bx2xT": rng.integers(0, 256, (B, 2, T)).astype(np.int32),
            "weight_B": rng.uniform(0.5, 2.0, (B,)).astype(np.float32)}


def _run(cfg, steps=2, devices=None):
    trainer = build_trainer(cfg, devices=devices, stage=STAGE)
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(0))
        reference0 = jax.device_get(state.extra["reference"])
        metrics = []
        for i in range(steps):
            placed = {k: jax.device_put(v, trainer.batch_sharding[k]) for k, v in _batch(i).items()}
            state, m = trainer.train_step(state, placed)
            metrics.append(jax.device_get(m))
        return trainer, jax.device_get(state), reference0, metrics


def test_frozen_extra_gets_no_gradient_or_optimizer_state_and_never_changes():
    cfg = _cfg()
    trainer, state, reference0, metrics = _run(cfg, steps=3)
    n_params = len(jax.tree.leaves(state.params))
    assert len(jax.tree.leaves(state.extra)) == n_params
    # the optimizer state is exactly the one of the params alone: nothing for the reference's leaves
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(jax.eval_shape(trainer.optimizer.init,
                                                                                    state.params))
    for a, b in zip(jax.tree.leaves(state.extra["reference"]), jax.tree.leaves(reference0)):
        np.testing.assert_array_equal(a, b)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference0))]
    assert sum(changed) > n_params // 2                      # the policy moved away from the reference
    assert abs(metrics[0]["kl"]) < 1e-6 < metrics[-1]["kl"]    # policy == reference at step 0 (round-off apart)
    assert metrics[0]["pairs"] == B and 0 <= metrics[0]["first_better"] <= 1


def test_fresh_params_alone_equal_the_fresh_states_params_bit_for_bit():
    # a resumed run rebuilds its frozen reference from trainer.init_params; a fresh run built it from init(rng)
    trainer = build_trainer(_cfg(), stage=STAGE)
    with trainer.context():
        state = jax.device_get(trainer.init(jax.random.PRNGKey(3)))
        params = jax.device_get(trainer.init_params(jax.random.PRNGKey(3)))
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_two_microbatches_of_pairs_equal_one_pass():
    _, one, _, m1 = _run(_cfg(1), steps=1)
    _, two, _, m2 = _run(_cfg(2), steps=1)
    np.testing.assert_allclose(m2[0]["loss"], m1[0]["loss"], rtol=2e-5)
    assert m2[0]["pairs"] == m1[0]["pairs"] == B               # sums add up over microbatches
    np.testing.assert_allclose(m2[0]["first_better"], m1[0]["first_better"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=2e-5)


def _check_sharded_equals_single():
    devices = jax.devices()
    assert len(devices) == 8
    cfg = _cfg(2, ["mesh.data=2", "mesh.fsdp=4"])
    trainer = build_trainer(cfg, stage=STAGE)
    specs = {k: tuple(s.spec) for k, s in trainer.batch_sharding.items()}
    _, sharded, _, ms = _run(cfg)
    _, single, _, m1 = _run(_cfg(2), devices=devices[:1])
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(sharded.params),
                                                             jax.tree.leaves(single.params)))
    return {"specs": {k: [list(a) if isinstance(a, tuple) else a for a in v] for k, v in specs.items()},
            "loss": [float(m["loss"]) for m in ms], "loss_single": [float(m["loss"]) for m in m1],
            "pairs": float(ms[0]["pairs"]), "worst_param_diff": worst}


CHECKS = {"sharded_equals_single": _check_sharded_equals_single}


def test_pair_and_row_fields_shard_by_rows_and_equal_one_device_on_8_fake_devices():
    out = run_checks(__file__, ["sharded_equals_single"])["sharded_equals_single"]
    assert out["specs"]["tokens_Bx2xT"] == [["data", "fsdp", "expert"], None, None]
    assert out["specs"]["weight_B"] == [["data", "fsdp", "expert"]]
    np.testing.assert_allclose(out["loss"], out["loss_single"], rtol=1e-5)
    assert out["pairs"] == B and out["worst_param_diff"] < 1e-5


if __name__ == "__main__":
    main_for_checks(CHECKS)
