"""Mesh shapes (ICI x DCN), rule presets mapping every logical name, and: a train step under each preset on 8 fake
CPU devices equals the single-device step (loss, grad norm and every updated parameter).

The 8-device checks run this file as a script in its own process (XLA fixes the device count at start-up).
"""
import functools
import os
import re
import sys

import numpy as np
import pytest

from kanana_jax import sharding
from kanana_jax.config import ConfigError, MeshConfig
from kanana_jax.parallel.fake_devices import REPO_ROOT, main_for_checks, run_checks

BASE = ["data.global_batch_size=8", "data.seq_len=32", "model.n_layers=1", "model.first_k_dense=0",  # one MoE layer
        "optimizer.learning_rate=1e-3", "optimizer.eps=1e-3", "optimizer.warmup_steps=0", "optimizer.schedule=constant"]
PRESET_MESHES = {  # preset -> mesh overrides on 8 devices; fsdp_ep also spans two (virtual) DCN slices
    "fsdp": ["mesh.data=2", "mesh.fsdp=4"],
    "fsdp_ep": ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.dcn_data=2"],
    "fsdp_tp_ep": ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
    # 16 rows as 2 microbatches of 8 (train.grad_accum_steps) against the one-device step over all 16 rows
    "fsdp_ep+accum": ["mesh.rules=fsdp_ep", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=4",
                      "data.global_batch_size=16", "train.grad_accum_steps=2"],
}


def test_axis_sizes_resolve_minus_one_per_slice():
    ici, dcn = sharding.mesh_axis_sizes(MeshConfig(data=-1, fsdp=4, expert=2, dcn_data=2), 64, n_slices=2)
    assert ici == {"data": 4, "fsdp": 4, "expert": 2, "tensor": 1}
    assert dcn == {"data": 2, "fsdp": 1, "expert": 1, "tensor": 1}
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=4, expert=2, dcn_data=2), 64, 2)["data"] == 8
    assert sharding.mesh_shape(MeshConfig(data=1, fsdp=-1), 16) == {"data": 1, "fsdp": 16, "expert": 1, "tensor": 1}


def test_bad_mesh_sizes_name_the_problem():
    with pytest.raises(ValueError, match="not a multiple"):
        sharding.mesh_axis_sizes(MeshConfig(data=-1, fsdp=3), 8)
    with pytest.raises(ValueError, match="set one axis to -1"):
        sharding.mesh_axis_sizes(MeshConfig(data=2, fsdp=2), 8)
    with pytest.raises(ValueError, match="dcn_"):
        sharding.mesh_axis_sizes(MeshConfig(data=-1, dcn_fsdp=2), 8, n_slices=4)
    with pytest.raises(ConfigError, match="mesh.fsdp"):
        MeshConfig(fsdp=0)
    with pytest.raises(ConfigError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)


def test_batch_must_split_over_the_batch_axes():
    mesh = type("M", (), {"shape": {"data": 2, "fsdp": 4, "expert": 2, "tensor": 2}})()
    sharding.check_batch_divides(32, mesh, sharding.RULES["fsdp_tp_ep"])
    with pytest.raises(ValueError, match=r"global_batch_size=24 .*data 2 x fsdp 4 x expert 2 = 16 shards"):
        sharding.check_batch_divides(24, mesh, sharding.RULES["fsdp_tp_ep"])
    sharding.check_batch_divides(64, mesh, sharding.RULES["fsdp_tp_ep"], grad_accum_steps=4)
    with pytest.raises(ValueError, match=r"64 / train.grad_accum_steps=8 = 8 rows .* multiple of 128"):
        sharding.check_batch_divides(64, mesh, sharding.RULES["fsdp_tp_ep"], grad_accum_steps=8)


def test_hybrid_mesh_by_device_order_keeps_slices_contiguous():
    devices = list(range(16))  # stand-ins: slice s holds devices 8s..8s+7
    grid = sharding._hybrid_by_order(devices, {"data": 1, "fsdp": 4, "expert": 2, "tensor": 1},
                                     {"data": 2, "fsdp": 1, "expert": 1, "tensor": 1})
    assert grid.shape == (2, 4, 2, 1)
    assert set(grid[0].ravel()) == set(range(8)) and set(grid[1].ravel()) == set(range(8, 16))


def test_check_rules_rejects_unmapped_names_and_unknown_axes():
    with pytest.raises(ValueError, match=r"\['new_axis'\]"):
        sharding.check_rules(sharding.RULES["fsdp"], {"embed", "new_axis"}, "fsdp")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sharding.check_rules([("embed", "model")], {"embed"})
    with pytest.raises(ValueError, match="allowed values"):
        sharding.logical_rules("zero3")


@functools.lru_cache(maxsize=None)
def _model_names(size_overrides: tuple):
    import jax
    from kanana_jax.cli import build_config
    from kanana_jax.model import Transformer
    from kanana_jax.train import step as step_lib
    _, cfg = build_config("experiments/pretrain.py:size=tiny", list(size_overrides))
    boxed = jax.eval_shape(lambda r: step_lib.init_params(Transformer(cfg.model), r, cfg, boxed=True),
                           jax.random.PRNGKey(0))
    return sharding.param_logical_names(boxed)


@pytest.mark.parametrize("preset", list(sharding.RULES))
def test_every_preset_maps_every_logical_name_of_the_model(preset):
    names = _model_names(()) | _model_names(("model.attention_type=gqa", "model.q_lora_rank=16"))
    assert {"embed", "experts", "expert_mlp", "heads", "vocab", "layers"} <= names
    sharding.check_rules(sharding.logical_rules(preset), names | set(sharding.ACTIVATION_NAMES), preset)


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_ep"])
def test_every_weight_matrix_is_split_over_all_parameter_axes(preset):
    """No matrix is replicated: each is split fsdp x expert ways (ZeRO-3), expert weights expert x fsdp."""
    import flax.linen as nn
    import jax
    from kanana_jax.cli import build_config
    from kanana_jax.model import Transformer
    from kanana_jax.train import step as step_lib
    mesh = {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    for extra in ((), ("model.q_lora_rank=16",)):
        _, cfg = build_config("experiments/pretrain.py:size=tiny", list(extra))
        boxed = jax.eval_shape(lambda r: step_lib.init_params(Transformer(cfg.model), r, cfg, boxed=True),
                               jax.random.PRNGKey(0))
        specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, sharding.P))
        for spec, leaf in zip(specs, jax.tree.leaves(nn.unbox(boxed))):
            if leaf.ndim - ("layers" in spec) < 2:
                continue  # norms, router bias: tiny vectors stay whole
            mesh_axes = nn.logical_to_mesh_axes(tuple(spec), sharding.logical_rules(preset))
            used = [a for t in mesh_axes if t for a in ((t,) if isinstance(t, str) else t)]
            assert sorted(used) == ["expert", "fsdp"], (spec, mesh_axes)
            assert np.prod([mesh[a] for a in used]) == 8


def test_activation_names_in_the_model_sources_are_all_declared():
    found = set()
    model_dir = os.path.join(REPO_ROOT, "kanana_jax", "model")
    for name in os.listdir(model_dir):
        if name.endswith(".py"):
            with open(os.path.join(model_dir, name)) as f:
                found |= set(re.findall(r"[\"'](activation_[a-z_]+)[\"']", f.read()))
    assert found and found <= set(sharding.ACTIVATION_NAMES), found - set(sharding.ACTIVATION_NAMES)


# ----- 8 fake devices (script side) -----

def _trainer_and_step(overrides, devices, batch_np):
    import jax
    from kanana_jax.cli import build_config
    from kanana_jax.train.builder import build_trainer
    _, cfg = build_config("experiments/pretrain.py:size=tiny", BASE + overrides)
    trainer = build_trainer(cfg, devices=devices)
    with trainer.context():
        state = trainer.init(jax.random.PRNGKey(0))
        params0 = jax.device_get(state.params)
        state, metrics = trainer.train_step(state, sharding.put_batch(batch_np, trainer.batch_sharding))
        return trainer, params0, jax.device_get(state.params), jax.device_get(metrics)


def presets_equal_single_device():
    import jax
    from kanana_jax.cli import build_config
    from kanana_jax.data import pipeline
    refs = {}
    for rows in (8, 16):
        _, cfg = build_config("experiments/pretrain.py:size=tiny", BASE + [f"data.global_batch_size={rows}"])
        batch = next(pipeline.make_iterator(cfg.data, split="train", seed=0))
        refs[rows] = (batch, *_trainer_and_step(["mesh.data=1", f"data.global_batch_size={rows}"],
                                                jax.devices()[:1], batch)[1:])
    out = {}
    for preset, mesh in PRESET_MESHES.items():
        rows = 16 if "data.global_batch_size=16" in mesh else 8
        batch, p0_ref, p1_ref, m_ref = refs[rows]
        rules = [] if any(o.startswith("mesh.rules=") for o in mesh) else [f"mesh.rules={preset}"]
        trainer, p0, p1, m = _trainer_and_step([*rules, *mesh], jax.devices(), batch)
        diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        out[preset] = {"mesh": dict(trainer.mesh.shape), "loss": float(m["loss"]), "ref_loss": float(m_ref["loss"]),
                       "grad_norm": float(m["grad_norm"]), "ref_grad_norm": float(m_ref["grad_norm"]),
                       "init_diff": diff(p0, p0_ref), "update_diff": diff(p1, p1_ref),
                       "update_size": diff(p1_ref, p0_ref)}
    return out


@pytest.fixture(scope="module")
def presets():
    return run_checks(__file__, ["presets_equal_single_device"])["presets_equal_single_device"]


@pytest.mark.parametrize("preset", list(PRESET_MESHES))
def test_train_step_under_preset_equals_single_device(presets, preset):
    r = presets[preset]
    assert np.prod(list(r["mesh"].values())) == 8
    assert r["init_diff"] == 0.0                      # same initial parameters on any mesh
    assert abs(r["loss"] - r["ref_loss"]) < 1e-5 * abs(r["ref_loss"]), r
    assert abs(r["grad_norm"] - r["ref_grad_norm"]) < 1e-4 * r["ref_grad_norm"], r
    assert r["update_size"] > 1e-4                    # the step moved the parameters ...
    assert r["update_diff"] < 1e-6, r                 # ... identically (lr 1e-3; differences are float rounding)


if __name__ == "__main__":
    sys.path.insert(0, REPO_ROOT)
    main_for_checks({"presets_equal_single_device": presets_equal_single_device})
