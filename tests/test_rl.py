"""The RL stage end to end on the tiny model: groups are never split by microbatching (two microbatches equal one
pass), the KL to the frozen reference is 0 at step 0 and the reference never changes, a run killed inside a
rollout's epochs resumes with the same rollouts, metrics and params, rollouts are logged, and merging runs
averages their params."""
import json
import os

import jax
import numpy as np
import pytest

from kanana_jax.cli import build_config
from kanana_jax.convert.orbax_hf import restore_params
from kanana_jax.train import loop, step as step_lib
from kanana_jax.train.builder import build_trainer
from kanana_jax.train.merge import merge_workdirs
from kanana_jax.train.metrics import without_timing

SETS = ["model.n_layers=2", "train.progress_bar=false", "train.tensorboard=false", "train.eval_every=0",
        "train.async_checkpoint=false", "optimizer.eps=1e-3", "rl.eval_prompts=2"]


def _cfg(arg="", extra=()):
    return build_config(f"experiments/rl.py:size=tiny,prompts=4,group=2,seq_len=64,max_new_tokens=8,{arg}",
                        SETS + list(extra))[1]


def _synthetic_batch(trainer, seed=0):
    """A rollout-shaped batch with random tokens, masks, log-probs and advantages (no sampling)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, f in trainer.batch_spec.items():
        if k.startswith(("inputs", "targets")):
            out[k] = rng.integers(0, 256, f.shape).astype(f.dtype)
        elif k.startswith("positions"):
            out[k] = np.broadcast_to(np.arange(f.shape[-1], dtype=np.int32), f.shape).copy()
        elif k.startswith(("segment_ids", "sample_mask")):
            out[k] = np.ones(f.shape, f.dtype)
        elif k.startswith("loss_mask"):
            out[k] = (rng.random(f.shape) > 0.5).astype(f.dtype)
        elif k.startswith("track_ids"):
            out[k] = np.zeros(f.shape, f.dtype)
        elif k.startswith("kl_coef"):
            out[k] = np.full(f.shape, 0.05, f.dtype)
        else:   # old_logp, ref_logp, advantages, returns, old_values
            scale = 0.3 if "logp" in k else 1.0
            out[k] = ((-2.0 if "logp" in k else 0.0) + scale * rng.standard_normal(f.shape)).astype(f.dtype)
    return out


@pytest.mark.parametrize("algorithm,aggregation", [("grpo", "seq_mean"), ("ppo", "token_mean")])
def test_two_microbatches_of_whole_groups_equal_one_pass(algorithm, aggregation):
    results = []
    for accum in (1, 2):
        cfg = _cfg(f"algorithm={algorithm}", [f"train.grad_accum_steps={accum}", f"rl.loss_aggregation={aggregation}"])
        trainer = build_trainer(cfg)
        batch = _synthetic_batch(trainer)
        mb = step_lib.microbatches(batch, accum)
        assert mb["inputs_PxGxT"].shape == (accum, 4 // accum, 2, 64)   # a group's 2 samples stay together
        with trainer.context():
            state = trainer.init(jax.random.PRNGKey(0))
            state, m = trainer.train_step(state, {k: jax.device_put(v, trainer.batch_sharding[k])
                                                  for k, v in batch.items()})
        results.append((jax.device_get(m), jax.device_get(state.params)))
    (m1, p1), (m2, p2) = results
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-4)
    np.testing.assert_allclose(m2["kl"], m1["kl"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=2e-5)


def test_kl_is_zero_at_step_0_and_the_reference_never_changes():
    cfg = _cfg()
    trainer = build_trainer(cfg)
    source = trainer.stage.make_source(cfg, "train", 0)
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(0))
        reference0 = jax.device_get(state.extra["reference"])
        source.bind(trainer, "/tmp/kj_rl_kl")
        metrics = []
        for _ in range(3):
            source.observe(state)
            batch = next(source)
            state, m = trainer.train_step(state, {k: jax.device_put(v, trainer.batch_sharding[k])
                                                  for k, v in batch.items()})
            metrics.append(jax.device_get(m))
    assert abs(metrics[0]["kl"]) < 1e-6
    for a, b in zip(jax.tree.leaves(jax.device_get(state.extra["reference"])), jax.tree.leaves(reference0)):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                         jax.tree.leaves(reference0)))


def _rows(workdir, name):
    with open(os.path.join(workdir, name)) as f:
        return [json.loads(line) for line in f]


def test_a_run_stopped_inside_a_rollout_resumes_with_the_same_results(tmp_path):
    cfg = _cfg("epochs=2,steps=6", ["train.checkpoint_every=1", "train.log_every=1"])
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    loop.run(cfg, whole)
    loop.run(cfg, parts, stop_after=3)      # rollout 1 used for one of its two epochs
    loop.run(cfg, parts)
    assert without_timing(_rows(whole, "metrics.jsonl")) == without_timing(_rows(parts, "metrics.jsonl"))
    assert _rows(whole, "rollouts.jsonl") == _rows(parts, "rollouts.jsonl")
    assert {r["rollout"] for r in _rows(whole, "rollouts.jsonl")} == {0, 1, 2}   # 6 steps / 2 epochs
    row = _rows(whole, "rollouts.jsonl")[0]
    assert {"prompt_id", "track", "completion", "reward", "passed", "params_step"} <= set(row)
    a, b = restore_params(whole), restore_params(parts)
    for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(b[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # merging two runs averages their params (the tracks-trained-apart ablation)
    out = str(tmp_path / "merged")
    provenance = merge_workdirs([whole, parts], [0.25, 0.75], out)
    assert provenance["kind"] == "merge" and len(provenance["sources"]) == 2
    _, merged = restore_params(out)
    for m, x in zip(jax.tree.leaves(merged), jax.tree.leaves(a[1])):
        np.testing.assert_allclose(np.asarray(m), np.asarray(x), rtol=1e-6)   # equal runs: the average is the run
