"""Device mesh from the config, logical-axis rule presets, and shardings of the train state and batches.

Every parameter and activation of the model carries logical axis names; one rules table per preset maps them
to the mesh axes (data, fsdp, expert, tensor). Axes of size 1 make a rule a no-op, so the presets are safe on
any mesh shape.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kanana_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

_COMMON = [
    ("activation_batch", BATCH_AXES), ("activation_length", None), ("activation_embed", None),
    ("activation_kv", None), ("layers", None), ("norm", None), ("qk_dim", None), ("qkv_dim", None),
    ("v_dim", None), ("q_lora", None), ("kv_lora", None), ("kv_heads", None), ("experts_router", None),
]
RULES = {
    # parameters sharded over fsdp on their model dimension; experts replicated over the expert axis
    "fsdp": _COMMON + [
        ("embed", "fsdp"), ("vocab", None), ("heads", None), ("mlp", None), ("experts", None),
        ("expert_mlp", None), ("activation_heads", None), ("activation_mlp", None), ("activation_vocab", None),
    ],
    # + experts split over the expert axis (expert parallelism)
    "fsdp_ep": _COMMON + [
        ("embed", "fsdp"), ("vocab", None), ("heads", None), ("mlp", None), ("experts", "expert"),
        ("expert_mlp", None), ("activation_heads", None), ("activation_mlp", None), ("activation_vocab", None),
    ],
    # + heads, MLP widths and vocabulary split over the tensor axis
    "fsdp_tp_ep": _COMMON + [
        ("embed", "fsdp"), ("vocab", "tensor"), ("heads", "tensor"), ("mlp", "tensor"), ("experts", "expert"),
        ("expert_mlp", "tensor"), ("activation_heads", "tensor"), ("activation_mlp", "tensor"),
        ("activation_vocab", "tensor"),
    ],
}


def logical_rules(preset: str):
    if preset not in RULES:
        raise ValueError(f"mesh.rules={preset!r}; allowed values: {', '.join(RULES)}")
    return RULES[preset]


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict:
    """Axis sizes with the one -1 resolved so that their product is `n_devices`."""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [a for a, v in sizes.items() if v == -1]
    if free:
        if n_devices % fixed:
            raise ValueError(f"mesh axes {sizes} cannot fill {n_devices} devices: {n_devices} is not a multiple "
                             f"of the fixed axes' product {fixed}")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are available; "
                         "set one axis to -1 or make the product match")
    return sizes


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes (data, fsdp, expert, tensor)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def param_shardings(boxed_params, mesh: Mesh, rules):
    """NamedShardings for a tree of flax LogicallyPartitioned (boxed) parameters or their abstract shapes."""
    specs = nn.get_partition_spec(boxed_params)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _dict_path(path) -> str:
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state, abstract_params, params_sharding, mesh: Mesh):
    """Shardings of an optimizer state: a leaf whose dict path ends with a parameter's path and whose shape equals
    that parameter's follows its sharding (Adam moments, Muon momentum); everything else is replicated."""
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                jax.tree.leaves(params_sharding, is_leaf=lambda x: isinstance(x, NamedSharding))):
        by_path[_dict_path(path)] = (leaf.shape, sh)

    def pick(path, leaf):
        key = _dict_path(path)
        for start in range(key.count("/") + 1):
            suffix = key.split("/", start)[-1] if start else key
            if suffix in by_path and by_path[suffix][0] == getattr(leaf, "shape", None):
                return by_path[suffix][1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Batches [B, T] are split over the mesh axes that `activation_batch` maps to."""
    axes = dict(rules)["activation_batch"]
    return NamedSharding(mesh, P(axes, None))


def put_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Assembles this host's rows of a batch into global arrays laid out by `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
