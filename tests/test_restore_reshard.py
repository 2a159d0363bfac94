"""A checkpoint saved on one mesh restores onto a different mesh shape and preset (orbax restores into the target
shardings): same parameters and optimizer state, laid out as the new trainer wants, and the new mesh's compiled
eval step gives the loss the original mesh gave. Runs this file as a script on 8 fake CPU devices."""
import sys
import tempfile

import numpy as np
import pytest

from kanana_jax.parallel.fake_devices import REPO_ROOT, main_for_checks, run_checks

BASE = ["data.global_batch_size=8", "data.seq_len=32", "model.n_layers=1", "model.first_k_dense=0",
        "train.async_checkpoint=false"]
SAVE_MESH = ["mesh.rules=fsdp", "mesh.data=1", "mesh.fsdp=8"]
RESTORE_MESH = ["mesh.rules=fsdp_tp_ep", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"]


def restore_onto_other_mesh():
    import jax
    from kanana_jax import sharding
    from kanana_jax.cli import build_config
    from kanana_jax.data import pipeline
    from kanana_jax.train.builder import build_trainer
    from kanana_jax.train.checkpoint import Checkpointer

    def trainer_for(mesh):
        return build_trainer(build_config("experiments/pretrain.py:size=tiny", BASE + mesh)[1])

    a, b = trainer_for(SAVE_MESH), trainer_for(RESTORE_MESH)
    batch = next(pipeline.make_iterator(a.cfg.data, split="train", seed=0))
    with tempfile.TemporaryDirectory() as workdir:
        ckpt = Checkpointer(workdir, keep=1, async_save=False)
        with a.context():
            state = a.init(jax.random.PRNGKey(3))
            saved = jax.device_get(state)
            ckpt.save(1, state, {"position": 7})
            ckpt.wait()
            loss_a = a.eval_step(state.params, state.extra, sharding.put_batch(batch, a.batch_sharding))["eval_loss"]
        with b.context():
            out = ckpt.restore(1, b.abstract_state())
            restored, data_state = (out.state, out.data_state) if hasattr(out, "state") else out
            layouts_match = all(
                r.sharding.is_equivalent_to(s, r.ndim) for r, s in
                zip(jax.tree.leaves(restored), jax.tree.leaves(b.state_sharding,
                                                               is_leaf=lambda x: hasattr(x, "spec"))))
            host = jax.device_get(restored)
            loss_b = b.eval_step(restored.params, restored.extra, sharding.put_batch(batch, b.batch_sharding))["eval_loss"]
        ckpt.close()
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(host))]
    return {"max_diff": max(diffs), "n_leaves": len(diffs), "layouts_match": bool(layouts_match),
            "data_state": data_state, "step": int(host.step),
            "save_mesh": dict(a.mesh.shape), "restore_mesh": dict(b.mesh.shape),
            "eval_loss": [float(loss_a), float(loss_b)]}


@pytest.fixture(scope="module")
def result():
    return run_checks(__file__, ["restore_onto_other_mesh"])["restore_onto_other_mesh"]


def test_restored_state_equals_saved_state_on_the_new_mesh(result):
    assert result["save_mesh"] != result["restore_mesh"]
    assert result["n_leaves"] > 20 and result["max_diff"] == 0.0
    assert result["layouts_match"] and result["step"] == 0 and result["data_state"] == {"position": 7}


def test_restored_model_computes_the_same_loss_on_the_new_mesh(result):
    loss_a, loss_b = result["eval_loss"]
    assert abs(loss_a - loss_b) < 1e-5 * abs(loss_a)


if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    main_for_checks({"restore_onto_other_mesh": restore_onto_other_mesh})
