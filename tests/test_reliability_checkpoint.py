"""Checkpoint integrity: damaged latest checkpoints are detected at restore (naming step and path) and the
run falls back to the newest readable one; half-written step dirs are ignored and removed; restoring into
a config of other shapes lists the mismatched parameters."""
import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kanana_jax.cli import build_config
from kanana_jax.train import loop
from kanana_jax.train.builder import build_trainer
from kanana_jax.train.checkpoint import (CheckpointError, CheckpointMismatchError, Checkpointer, device_state_checksums,
                                        leaves_by_path, state_checksums)
from kanana_jax.train.metrics import without_timing

ARGS = "experiments/pretrain.py:size=tiny,steps=6,batch=4,seq_len=32"
SETS = ["model.n_layers=2", "train.checkpoint_every=2", "train.keep_checkpoints=3", "train.async_checkpoint=false",
        "train.log_every=1", "train.eval_every=0", "train.progress_bar=false", "train.tensorboard=false",
        "train.peak_tflops_per_device=1"]


def _cfg(*extra):
    return build_config(ARGS, SETS + list(extra))[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir stopped after step 4 (checkpoints 2 and 4) and the abstract train state of its config."""
    workdir = str(tmp_path_factory.mktemp("ckpt") / "run")
    loop.run(_cfg(), workdir, stop_after=4)
    return workdir, build_trainer(_cfg()).abstract_state()


def _copy(trained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    return workdir, os.path.join(workdir, "checkpoints")


def _truncate_largest(step_dir):
    target = max(glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True), key=os.path.getsize)
    os.truncate(target, os.path.getsize(target) // 2)


def _flip_bytes(step_dir):
    target = max(glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True), key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        chunk = f.read(8)
        f.seek(os.path.getsize(target) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _drop_a_leaf(step_dir):
    """Rewrites the state item with the same tree minus one parameter (a wrong tree structure)."""
    state_dir = os.path.join(step_dir, "state")
    state = ocp.StandardCheckpointer().restore(state_dir)
    del state["params"]["embed"]
    shutil.rmtree(state_dir)
    with ocp.StandardCheckpointer() as c:
        c.save(state_dir, state)


CORRUPTIONS = {
    "truncated_array_file": (_truncate_largest, "unreadable data"),
    "flipped_bytes": (_flip_bytes, "differ from their checksum"),
    "missing_item": (lambda d: shutil.rmtree(os.path.join(d, "data")), "item 'data' is missing"),
    "garbage_metadata": (lambda d: open(os.path.join(d, "state", "_METADATA"), "w").write("{not json"),
                         "unreadable metadata of item 'state'"),
    "wrong_tree_structure": (_drop_a_leaf, "params/embed/embedding: missing in the checkpoint"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_damaged_latest_is_named_and_the_previous_one_restored(trained, tmp_path, kind, caplog):
    corrupt, message = CORRUPTIONS[kind]
    _, directory = _copy(trained, tmp_path)
    corrupt(os.path.join(directory, "4"))
    abstract = trained[1]
    with pytest.raises(CheckpointError) as e:
        Checkpointer(directory, keep=3, async_save=False).restore_latest(abstract, fallback=False)
    assert f"checkpoint step 4 at {os.path.join(directory, '4')}" in str(e.value) and message in str(e.value)
    assert "train.checkpoint_fallback=false" in str(e.value)

    with caplog.at_level(logging.WARNING, logger="kanana_jax.train"):
        checkpointer = Checkpointer(directory, keep=3, async_save=False)
        restored = checkpointer.restore_latest(abstract, fallback=True)
    assert restored.step == 2 and int(restored.state.step) == 2
    assert "checkpoint step 4 is not usable" in caplog.text and "fell back to checkpoint step 2" in caplog.text
    assert checkpointer.all_steps() == [2] and len(os.listdir(directory + ".corrupt")) == 1
    reference = ocp.StandardCheckpointer().restore(os.path.join(trained[0], "checkpoints", "2", "state"))
    expected, got = leaves_by_path(reference), leaves_by_path(restored.state)
    assert sorted(expected) == sorted(got)
    for path, leaf in got.items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected[path]), err_msg=path)


def test_every_checkpoint_damaged_raises_the_newest_error(trained, tmp_path):
    _, directory = _copy(trained, tmp_path)
    _truncate_largest(os.path.join(directory, "4"))
    shutil.rmtree(os.path.join(directory, "2", "meta"))
    with pytest.raises(CheckpointError, match="checkpoint step 4 at .*unreadable data"):
        Checkpointer(directory, keep=3, async_save=False).restore_latest(trained[1], fallback=True)


def test_uncommitted_step_dir_is_ignored_and_removed(trained, tmp_path):
    _, directory = _copy(trained, tmp_path)
    half_written = os.path.join(directory, "6.orbax-checkpoint-tmp-1234")
    shutil.copytree(os.path.join(directory, "4"), half_written)
    os.remove(os.path.join(half_written, "commit_success.txt"))
    checkpointer = Checkpointer(directory, keep=3, async_save=False)
    assert checkpointer.latest_step() == 4
    checkpointer.wait()
    assert checkpointer.restore_latest(trained[1], fallback=True).step == 4
    checkpointer.close()
    assert not os.path.exists(half_written)


def test_other_shapes_give_a_per_parameter_diff_and_no_fallback(trained, tmp_path):
    _, directory = _copy(trained, tmp_path)
    abstract = build_trainer(_cfg("model.d_ff=96", "model.moe_d_ff=64")).abstract_state()
    with pytest.raises(CheckpointMismatchError) as e:
        Checkpointer(directory, keep=3, async_save=False).restore_latest(abstract, fallback=True)
    text = str(e.value)
    assert f"checkpoint step 4 at {os.path.join(directory, '4')}" in text
    saved = ocp.StandardCheckpointer().metadata(os.path.join(directory, "4", "state")).item_metadata.tree
    gate_saved = saved["params"]["dense_layers"]["mlp"]["w_gate"].shape
    gate_line = [line for line in text.splitlines() if "params/dense_layers/mlp/w_gate:" in line]
    expected = tuple(gate_saved[:-1]) + (96,)
    assert gate_line and f"saved {tuple(gate_saved)} float32, expected {expected} float32" in gate_line[0]
    assert any("moe" in line and ", expected" in line for line in text.splitlines())
    assert sorted(os.listdir(directory)) == ["2", "4"] and not os.path.exists(directory + ".corrupt")


def test_run_falls_back_and_recomputes_the_same_curve(trained, tmp_path, caplog):
    workdir, directory = _copy(trained, tmp_path)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        before = [json.loads(line) for line in f]
    _truncate_largest(os.path.join(directory, "4"))
    with caplog.at_level(logging.INFO, logger="kanana_jax.train"):   # the resume line is INFO, the fallback a warning
        loop.run(_cfg(), workdir)
    assert "fell back to checkpoint step 2" in caplog.text and "resumed from" in caplog.text
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        after = [json.loads(line) for line in f]
    assert [r["step"] for r in after] == [1, 2, 3, 4, 5, 6]
    assert without_timing(after[:4]) == without_timing(before)        # steps 3 and 4 recomputed bit-exactly
    assert Checkpointer(directory, keep=3, async_save=False).all_steps() == [2, 4, 6]


def test_host_checksums_equal_the_device_reduction():
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(7, 33)).astype(np.float32), "b": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
            "step": jnp.int32(-12345), "ids": rng.integers(0, 2 ** 31, (64,)).astype(np.int32),
            "mask": rng.integers(0, 255, (9, 3)).astype(np.uint8), "empty": np.zeros((0, 4), np.float32),
            "big": jnp.asarray(rng.normal(size=(4096, 64)) * 1e30, jnp.float32)}   # bit sums wrap mod 2**32
    host = state_checksums(tree)
    assert host.dtype == np.uint32 and host.shape == (len(jax.tree.leaves(tree)),)
    np.testing.assert_array_equal(host, np.asarray(device_state_checksums(tree)))
