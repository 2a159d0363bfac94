"""Device mesh from the config, logical-axis rule presets, and shardings of the train state and batches.

Every parameter and activation of the model carries logical axis names; one rules table per preset maps them
to the mesh axes (data, fsdp, expert, tensor). Axes of size 1 make a rule a no-op, so the presets are safe on
any mesh shape.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kanana_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

_COMMON = [
    ("activation_batch", BATCH_AXES), ("activation_length", None), ("activation_embed", None),
    ("activation_kv", None), ("layers", None), ("norm", None), ("head_out", None), ("qk_dim", None), ("qkv_dim", None),
    ("v_dim", None), ("kv_heads", None), ("experts_router", None),
]
# Parameters: ZeRO-3 style, every weight split over fsdp x expert on its model dimension ('embed'); expert weights
# take the expert axis for their 'experts' dimension, so their 'embed' falls back to fsdp alone. flax applies rules
# in order and skips one whose mesh axes are taken, hence 'experts' comes before the two 'embed' rules.
# MLA's up-projections wq_b [q_lora, H, Dq] and wkv_b [kv_lora, H, Dk+Dv] have no 'embed' dimension: their
# low-rank dimension takes fsdp x expert instead (on wq_a / wkv_a, whose 'embed' already took those axes, it stays
# whole).
_EMBED = [("embed", ("fsdp", "expert")), ("embed", "fsdp"), ("q_lora", ("fsdp", "expert")),
          ("kv_lora", ("fsdp", "expert"))]
RULES = {
    # experts replicated over the expert axis (which then only splits the batch and the weights)
    "fsdp": _COMMON + [("experts", None)] + _EMBED + [
        ("vocab", None), ("heads", None), ("mlp", None), ("expert_mlp", None), ("activation_heads", None),
        ("activation_mlp", None), ("activation_vocab", None),
    ],
    # + experts split over the expert axis (expert parallelism: all-to-all dispatch)
    "fsdp_ep": _COMMON + [("experts", "expert")] + _EMBED + [
        ("vocab", None), ("heads", None), ("mlp", None), ("expert_mlp", None), ("activation_heads", None),
        ("activation_mlp", None), ("activation_vocab", None),
    ],
    # + heads, MLP widths and vocabulary split over the tensor axis
    "fsdp_tp_ep": _COMMON + [("experts", "expert")] + _EMBED + [
        ("vocab", "tensor"), ("heads", "tensor"), ("mlp", "tensor"), ("expert_mlp", "tensor"),
        ("activation_heads", "tensor"), ("activation_mlp", "tensor"), ("activation_vocab", "tensor"),
    ],
}


ACTIVATION_NAMES = ("activation_batch", "activation_length", "activation_embed", "activation_kv",
                    "activation_heads", "activation_mlp", "activation_vocab")


def check_rules(rules, names, preset: str = "") -> None:
    """Raises unless every logical axis name in `names` has a rule and every rule targets known mesh axes."""
    where = f"rules preset {preset!r}" if preset else "the logical-axis rules"
    mapped = {name for name, _ in rules}
    missing = sorted(set(names) - mapped)
    if missing:
        raise ValueError(f"logical axis names {missing} used by the model have no entry in {where}; add "
                         "(name, mesh axis or None) to kanana_jax.sharding.RULES so their sharding is explicit")
    for name, target in rules:
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ValueError(f"{where}: '{name}' maps to unknown mesh axes {bad}; mesh axes are {MESH_AXES}")


def logical_rules(preset: str):
    """The rules table of a preset, checked to map every activation name the model uses."""
    if preset not in RULES:
        raise ValueError(f"mesh.rules={preset!r}; allowed values: {', '.join(RULES)}")
    check_rules(RULES[preset], ACTIVATION_NAMES, preset)
    return RULES[preset]


def param_logical_names(boxed_params) -> set:
    """Every logical axis name on a tree of flax LogicallyPartitioned parameters (or their abstract shapes)."""
    specs = nn.get_partition_spec(boxed_params)
    names = set()
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
        names.update(n for n in spec if isinstance(n, str))
    return names


_CONTEXT_MESH = contextvars.ContextVar("kanana_jax_context_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Makes `mesh` what `context_mesh()` returns inside the block (this thread): the mesh that mesh-aware code
    (expert parallelism, Muon's sharded orthogonalization) lays its shard_maps out on. It is not jax's context
    mesh (`jax.set_mesh`), so flax's logical activation constraints stay off, as they were under the
    deprecated `with mesh:` block this replaces."""
    token = _CONTEXT_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _CONTEXT_MESH.reset(token)


def context_mesh():
    """The mesh in context: `use_mesh`'s (the Trainer enters it), else jax's (`jax.set_mesh`,
    `jax.sharding.use_abstract_mesh`; an AbstractMesh), else None."""
    mesh = _CONTEXT_MESH.get()
    if mesh is not None:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract is None or abstract.empty else abstract


def _device_slices(devices) -> int:
    """Number of distinct TPU slices among `devices` (1 where devices carry no slice index)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_axis_sizes(cfg: MeshConfig, n_devices: int, n_slices: int = 1) -> tuple[dict, dict]:
    """(per-slice ICI sizes, DCN sizes) per mesh axis; the one -1 absorbs the devices left in a slice."""
    dcn = {"data": cfg.dcn_data, "fsdp": cfg.dcn_fsdp, "expert": cfg.dcn_expert, "tensor": 1}
    if math.prod(dcn.values()) != n_slices:
        raise ConfigError(f"mesh.dcn_data*dcn_fsdp*dcn_expert = {math.prod(dcn.values())} but the devices form "
                         f"{n_slices} slice(s); make the product of the dcn_* sizes equal the number of slices")
    if n_devices % n_slices:
        raise ConfigError(f"{n_devices} devices cannot be split into {n_slices} equal slices")
    per_slice = n_devices // n_slices
    ici = {a: getattr(cfg, a) for a in MESH_AXES}
    fixed = math.prod(v for v in ici.values() if v != -1)
    free = [a for a, v in ici.items() if v == -1]
    if free:
        if per_slice % fixed:
            raise ConfigError(f"mesh axes {ici} cannot fill {per_slice} devices per slice: {per_slice} is not a "
                             f"multiple of the fixed axes' product {fixed}")
        ici[free[0]] = per_slice // fixed
    if math.prod(ici.values()) != per_slice:
        raise ConfigError(f"mesh {ici} has {math.prod(ici.values())} devices but {per_slice} are available per "
                         "slice; set one axis to -1 or make the product match")
    return ici, dcn


def mesh_shape(cfg: MeshConfig, n_devices: int, n_slices: int = 1) -> dict:
    """Total axis sizes (ICI x DCN) with the one -1 resolved so that their product is `n_devices`."""
    ici, dcn = mesh_axis_sizes(cfg, n_devices, n_slices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _hybrid_by_order(devices, ici: dict, dcn: dict) -> np.ndarray:
    """Device grid for slices given by device order (consecutive equal groups): axis index = dcn_i * ici + ici_i."""
    shape = [dcn[a] for a in MESH_AXES] + [ici[a] for a in MESH_AXES]
    grid = np.asarray(devices, dtype=object).reshape(shape)
    n = len(MESH_AXES)
    grid = grid.transpose([j for i in range(n) for j in (i, n + i)])
    return grid.reshape([dcn[a] * ici[a] for a in MESH_AXES])


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes (data, fsdp, expert, tensor). Devices from several TPU
    slices (multi-slice) get a hybrid mesh: the dcn_* factor of an axis spans slices, the rest stays on ICI.
    Devices without slice indices (CPU, GPU) with dcn_* > 1 are split into slices in device order."""
    devices = list(jax.devices() if devices is None else devices)
    real_slices = _device_slices(devices)
    dcn_product = cfg.dcn_data * cfg.dcn_fsdp * cfg.dcn_expert
    n_slices = real_slices if real_slices > 1 else dcn_product
    ici, dcn = mesh_axis_sizes(cfg, len(devices), n_slices)
    ici_shape, dcn_shape = tuple(ici[a] for a in MESH_AXES), tuple(dcn[a] for a in MESH_AXES)
    from jax.experimental import mesh_utils
    if real_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
    elif n_slices > 1:
        grid = _hybrid_by_order(devices, ici, dcn)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici_shape, devices=devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            grid = np.asarray(devices).reshape(ici_shape)
    return Mesh(grid, MESH_AXES)


def param_shardings(boxed_params, mesh: Mesh, rules):
    """NamedShardings for a tree of flax LogicallyPartitioned (boxed) parameters or their abstract shapes."""
    check_rules(rules, param_logical_names(boxed_params))
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


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
    """A batch field of rank `ndim` ([B, T], [B], [B, 2, T], ...): rows split over the mesh axes that
    `activation_batch` maps to, every other axis whole."""
    axes = dict(rules)["activation_batch"]
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def batch_shardings(spec: dict, mesh: Mesh, rules) -> dict:
    """{field: NamedSharding} for a stage's batch_spec ({field: BatchField})."""
    return {k: batch_sharding(mesh, rules, len(f.shape)) for k, f in spec.items()}


def check_batch_divides(global_batch_size: int, mesh: Mesh, rules, grad_accum_steps: int = 1) -> None:
    """Raises unless each microbatch (global batch / grad_accum_steps rows) splits evenly over the mesh axes that
    `activation_batch` maps to."""
    axes = dict(rules)["activation_batch"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = math.prod(mesh.shape[a] for a in axes)
    rows = global_batch_size // grad_accum_steps
    if rows % shards:
        sizes = " x ".join(f"{a} {mesh.shape[a]}" for a in axes)
        if grad_accum_steps == 1:
            raise ConfigError(f"data.global_batch_size={global_batch_size} cannot be split over the batch mesh axes "
                             f"({sizes} = {shards} shards); use a multiple of {shards} or a mesh with fewer batch "
                             "shards")
        raise ConfigError(f"a microbatch of data.global_batch_size={global_batch_size} / train.grad_accum_steps="
                         f"{grad_accum_steps} = {rows} rows cannot be split over the batch mesh axes ({sizes} = "
                         f"{shards} shards); use fewer accumulation steps or a global batch that is a multiple of "
                         f"{shards * grad_accum_steps}")


def put_batch(batch: dict, shardings) -> dict:
    """Assembles this host's rows of a batch into global arrays laid out by `shardings` (one NamedSharding for
    every field, or {field: NamedSharding}); a field the shardings do not know is an error naming it."""
    if not isinstance(shardings, dict):
        shardings = {k: shardings for k in batch}
    unknown = sorted(set(batch) - set(shardings))
    if unknown:
        raise ValueError(f"batch fields {unknown} are not in the stage's batch_spec (fields: {sorted(shardings)})")
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v)) for k, v in batch.items()}
