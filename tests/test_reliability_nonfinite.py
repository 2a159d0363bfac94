"""Non-finite steps: poisoned batches (train.debug_poison_steps) under the 'skip' and 'stop' policies, and the
in-step guard on random trees with one non-finite gradient leaf."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kanana_jax.cli import build_config
from kanana_jax.train import loop, nonfinite
from kanana_jax.train.builder import build_trainer
from kanana_jax.train.checkpoint import leaves_by_path
from kanana_jax.train.step import TrainState

ARGS = "experiments/pretrain.py:size=tiny,steps=8,batch=4,seq_len=32"
SETS = ["model.n_layers=2", "train.eval_every=0", "train.progress_bar=false", "train.tensorboard=false",
        "train.peak_tflops_per_device=1", "train.async_checkpoint=false", "train.keep_checkpoints=10"]


def _cfg(*extra):
    return build_config(ARGS, SETS + list(extra))[1]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _saved(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step))
    with open(os.path.join(path, "meta", "metadata")) as f:
        meta = json.load(f)
    return ocp.StandardCheckpointer().restore(os.path.join(path, "state")), meta["loop"]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
    """A skip-policy run poisoned at steps 3, 5 and 6 with max_consecutive_skips=2: (workdir, error, log text)."""
    workdir = tmp_path_factory.mktemp("skip") / "run"
    cfg = _cfg("train.nonfinite_policy=skip", "train.max_consecutive_skips=2", "train.debug_poison_steps=[3,5,6]",
               "train.log_every=1", "train.checkpoint_every=1")
    capture, logger = _Capture(), logging.getLogger("kanana_jax.train")
    logger.addHandler(capture)
    try:
        with pytest.raises(nonfinite.NonFiniteError) as e:
            loop.run(cfg, str(workdir))
    finally:
        logger.removeHandler(capture)
    return workdir, str(e.value), "\n".join(capture.lines)


def test_skip_policy_drops_poisoned_updates_counts_them_and_stops_after_n_in_a_row(skip_run):
    workdir, error, log_text = skip_run
    assert "2 consecutive non-finite steps" in error and "at step 6 (batch index 5" in error
    assert "train.max_consecutive_skips=2" in error
    assert "at step 3 (batch index 2" in log_text and "update skipped (1 in a row, 1 in this run)" in log_text
    assert "update skipped (1 in a row, 2 in this run)" in log_text   # step 5: the streak reset at step 4

    rows = _rows(workdir)
    assert sorted(rows) == [1, 2, 3, 4, 5]
    for step in (3, 5):
        assert np.isnan(rows[step]["loss"]) and rows[step]["skipped_update"] == 1.0
    for step in (1, 2, 4):
        assert np.isfinite(rows[step]["loss"]) and rows[step]["skipped_update"] == 0.0
    assert [rows[s]["skipped_updates"] for s in (1, 2, 3, 4, 5)] == [0, 0, 1, 1, 2]

    before, _ = _saved(workdir, 2)
    skipped, counters = _saved(workdir, 3)
    after, counters_after = _saved(workdir, 4)
    assert int(skipped["step"]) == 3 and counters == {"skipped_updates": 1, "consecutive_skips": 1}
    assert counters_after == {"skipped_updates": 1, "consecutive_skips": 0}
    for path, leaf in leaves_by_path({"params": skipped["params"], "opt_state": skipped["opt_state"]}).items():
        np.testing.assert_array_equal(leaf, leaves_by_path(before)[path], err_msg=path)   # update not applied
    changed = [p for p, leaf in leaves_by_path(after["params"]).items()
               if not np.array_equal(leaf, leaves_by_path(skipped["params"])[p])]
    assert len(changed) == len(leaves_by_path(after["params"]))                          # step 4 trained again
    assert not os.path.exists(workdir / "checkpoints" / "6")


def test_stop_policy_names_step_batch_and_first_nonfinite_gradient(skip_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(skip_run[0], workdir)   # resumes at step 5 (saves the init compile of a fresh run)
    cfg = _cfg("train.nonfinite_policy=stop", "train.debug_poison_steps=[7]", "train.log_every=4",
               "train.checkpoint_every=4")
    first_param = next(iter(leaves_by_path(build_trainer(cfg).abstract_state().params)))
    with pytest.raises(nonfinite.NonFiniteError) as e:
        loop.run(cfg, str(workdir))    # step 7 is checked after step 8 is dispatched (one step late)
    text = str(e.value)
    assert "non-finite loss nan or gradient at step 7 (batch index 6" in text
    assert f"first non-finite gradient: {first_param})" in text and "train.nonfinite_policy=skip" in text
    assert sorted(_rows(workdir)) == [1, 2, 3, 4, 5]                   # nothing logged or saved after it
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3", "4", "5"]


def _tree(rng, scale=1.0):
    keys = jax.random.split(rng, 4)
    return {"a": {"w": scale * jax.random.normal(keys[0], (3, 4))}, "b": scale * jax.random.normal(keys[1], (5,)),
            "c": {"x": scale * jax.random.normal(keys[2], (2, 2)), "y": scale * jax.random.normal(keys[3], (6,))}}


def _adam_update(grads, optimizer):
    def update(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state), {"update_norm": optax.tree.norm(updates)})
    return update


@pytest.mark.parametrize("bad_leaf, bad_value", [(None, None), (2, np.inf), (1, np.nan), (3, -np.inf)])
def test_apply_if_finite_keeps_the_old_state_and_finds_the_first_bad_leaf(bad_leaf, bad_value):
    params, grads = _tree(jax.random.PRNGKey(1)), _tree(jax.random.PRNGKey(2), 0.1)
    optimizer = optax.adam(1e-2)
    old = TrainState(step=jnp.array(7, jnp.int32), params=params, opt_state=optimizer.init(params))
    leaves, treedef = jax.tree.flatten(grads)
    if bad_leaf is not None:
        leaves[bad_leaf] = leaves[bad_leaf].at[0].set(bad_value)
        leaves[-1] = leaves[-1].at[0].set(np.nan)   # a later bad leaf must not be the one reported
    grads = jax.tree.unflatten(treedef, leaves)
    expect_new, _ = _adam_update(grads, optimizer)(old)
    loss = jnp.sum(jnp.square(jax.random.normal(jax.random.PRNGKey(3), (4,))))
    state, metrics = jax.jit(lambda s, l, g: nonfinite.apply_if_finite(s, l, g, _adam_update(g, optimizer)))(
        old, loss, grads)
    assert int(state.step) == 8
    expect = expect_new if bad_leaf is None else old
    for got, want in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((expect.params,
                                                                                         expect.opt_state))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)
    assert float(metrics["skipped_update"]) == (0.0 if bad_leaf is None else 1.0)
    assert int(metrics["first_nonfinite_grad_leaf"]) == (-1 if bad_leaf is None else bad_leaf)
    if bad_leaf is None:   # a finite update really moves the parameters and reports its metrics
        assert not np.array_equal(np.asarray(state.params["b"]), np.asarray(params["b"]))
        assert float(metrics["update_norm"]) > 0
    else:                  # a skipped one reports zeros in the update's metrics
        assert float(metrics["update_norm"]) == 0.0


def test_nan_loss_with_finite_gradients_is_skipped_too():
    params, grads = _tree(jax.random.PRNGKey(4)), _tree(jax.random.PRNGKey(5), 0.1)
    old = TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=())

    def update(state):
        return state.replace(step=state.step + 1, params=jax.tree.map(lambda p, g: p - g, state.params, grads)), {}
    state, metrics = nonfinite.apply_if_finite(old, jnp.float32(np.nan), grads, update)
    assert float(metrics["skipped_update"]) == 1.0 and int(metrics["first_nonfinite_grad_leaf"]) == -1
    np.testing.assert_array_equal(np.asarray(state.params["a"]["w"]), np.asarray(params["a"]["w"]))
    assert int(state.step) == 1


def test_poison_batch_sets_float_fields_to_nan_only():
    rng = np.random.default_rng(0)
    batch = {"inputs_BxT": rng.integers(1, 50, (2, 5)).astype(np.int32), "loss_mask_BxT": rng.random((2, 5))}
    poisoned = nonfinite.poison_batch(batch)
    np.testing.assert_array_equal(poisoned["inputs_BxT"], batch["inputs_BxT"])
    assert np.isnan(poisoned["loss_mask_BxT"]).all() and not np.isnan(batch["loss_mask_BxT"]).any()
    with pytest.raises(Exception, match="train.debug_poison_steps"):
        nonfinite.poison_batch({"inputs_BxT": batch["inputs_BxT"]})
