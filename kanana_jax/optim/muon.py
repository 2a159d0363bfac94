"""Muon as optax transforms: momentum -> polar factor (Polar Express by default) -> shape-aware scaling.

`scale_by_muon` orthogonalizes every leaf it sees as a batch of matrices (batch axes = layer, expert
and, with per_head, head axes; see `partition.matrix_axes`). Leaves whose matrices share a
(short side, long side) pair are orthogonalized together in one batched einsum chain. With `mesh`,
each leaf is resharded on its own so that its matrix axes are whole on every device and its batch
axes are split over all mesh axes (padded only where the device count does not divide them), and a
`shard_map` runs the same chains on each device's local matrices: the only collectives are those
reshards (all-to-all), never an all-reduce of a Gram matrix, and no device holds more than its share.

`muon(...)` is the full optimizer: Muon for hidden matrices, AdamW for the rest, zero updates for
'frozen' parameters, chosen per parameter path by `partition` rules.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from kanana_jax.optim import orthogonalize, partition
from kanana_jax.optim.partition import MatrixAxes

SCALINGS = ("rms_match", "spectral", "none")


class MuonState(NamedTuple):
    count: jax.Array
    mu: optax.Updates


def update_scale(fan_in: int, fan_out: int, scaling: str, rms: float = 0.2) -> float:
    """Multiplier of the orthogonalized update: rms_match (AdamW-like RMS), spectral, or none."""
    if scaling == "rms_match":
        return rms * math.sqrt(max(fan_in, fan_out))
    if scaling == "spectral":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if scaling == "none":
        return 1.0
    raise ValueError(f"muon scaling={scaling!r}; allowed: {SCALINGS}")


def to_matrices(x, axes: MatrixAxes):
    """(x as [B, fan_in, fan_out], inverse function) for the given fan-in/fan-out axes."""
    nd = x.ndim
    fin = tuple(a % nd for a in axes.fan_in)
    fout = tuple(a % nd for a in axes.fan_out)
    if set(fin) & set(fout) or len(set(fin + fout)) != len(fin + fout):
        raise ValueError(f"matrix axes {axes} overlap for shape {x.shape}")
    batch = tuple(a for a in range(nd) if a not in fin + fout)
    perm = batch + fin + fout
    shape3 = (math.prod(x.shape[a] for a in batch), math.prod(x.shape[a] for a in fin),
              math.prod(x.shape[a] for a in fout))
    permuted_shape = tuple(x.shape[a] for a in perm)
    inv = tuple(perm.index(a) for a in range(nd))
    identity = perm == tuple(range(nd))
    x3 = (x if identity else jnp.transpose(x, perm)).reshape(shape3)

    def restore(y3):
        y = y3.reshape(permuted_shape)
        return y if identity else jnp.transpose(y, inv)
    return x3, restore


# Mesh axes that the sharding rules put on a batch axis of parameters (the experts axis of expert weights). They
# are placed first, and stay outermost on a batch axis they divide, so a reshard keeps them where they are and
# moves each other axis with one all-to-all (an axis order unlike the source's costs an extra permute).
MAJOR_AXES = ("expert",)


def shard_plan(batch_sizes: Sequence[int], axis_sizes: Sequence[tuple[str, int]], major: Sequence[str] = MAJOR_AXES):
    """(mesh axes per batch axis, padded batch sizes) that spread a leaf's matrices over the mesh.

    axis_sizes: (name, size) in mesh order. Axes in `major` are placed first, then the rest in mesh order, each on
    the batch axis where it costs the least padding (ties: a batch axis holding fewer mesh axes, then the
    innermost). A leaf holding a single matrix is not split (every device orthogonalizes it). On each batch axis
    the mesh axes are listed in mesh order, except that `major` axes that divide it evenly come first.
    """
    order = [a for a in axis_sizes if a[0] in major] + [a for a in axis_sizes if a[0] not in major]
    placed = [[] for _ in batch_sizes]
    ways = [1] * len(batch_sizes)
    leading = set()
    if math.prod(batch_sizes) > 1:
        for name, size in order:
            if size == 1:
                continue
            costs = []
            for i, b in enumerate(batch_sizes):
                per = -(-b // ways[i])
                costs.append(((-(-per // size) * size) / per, len(placed[i]), -i, per % size == 0))
            *key, even = min(costs)
            i = -key[2]
            if name in major and even and not placed[i]:
                leading.add(name)
            placed[i].append(name)
            ways[i] *= size
    rank = {name: k for k, (name, _) in enumerate(axis_sizes)}
    axes = [tuple(sorted(p, key=lambda n: (n not in leading, rank[n]))) for p in placed]
    return axes, [-(-b // w) * w for b, w in zip(batch_sizes, ways)]


def _leaf_spec(shape, axes: MatrixAxes, mesh):
    """(PartitionSpec with the matrix axes whole and the batch axes over the mesh, padded shape) of one leaf."""
    nd = len(shape)
    matrix = {a % nd for a in axes.fan_in + axes.fan_out}
    batch = [a for a in range(nd) if a not in matrix]
    placed, padded = shard_plan([shape[a] for a in batch], [(n, mesh.shape[n]) for n in mesh.axis_names])
    spec, full = [None] * nd, list(shape)
    for a, p, size in zip(batch, placed, padded):
        spec[a] = p[0] if len(p) == 1 else (p or None)
        full[a] = size
    return PartitionSpec(*spec), tuple(full)


def _orthogonalize_on_mesh(leaves, axes_list, out_dtypes, mesh, *, scaling, rms, group, method, dtype, **kw):
    """Polar factors of every leaf, each device orthogonalizing whole matrices of its share of the batch axes.

    Each leaf is resharded (padded along a batch axis where the device count needs it) so that its matrix axes
    are whole on every device and its batch axes are split over the mesh (`_leaf_spec`); inside one `shard_map`
    every device runs the same chains as one device would on its local matrices. The only collectives are those
    reshards: no partial Gram matrix is ever all-reduced and nothing is gathered beyond one leaf's share.
    """
    specs, pads, xs = [], [], []
    for leaf, axes in zip(leaves, axes_list):
        spec, full = _leaf_spec(leaf.shape, axes, mesh)
        # orthogonalize_group casts to `dtype` first for the iterative methods: casting before the reshard moves
        # half the bytes and gives the same numbers (svd reads its input at full precision).
        x = leaf.astype(dtype) if method != "svd" else leaf
        if full != leaf.shape:
            x = jnp.pad(x, [(0, f - s) for s, f in zip(leaf.shape, full)])
        specs.append(spec)
        pads.append(full != leaf.shape)
        xs.append(jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)))

    def local(*blocks):
        return tuple(_orthogonalize_local(blocks, axes_list, out_dtypes, group, scaling, rms,
                                          dict(kw, method=method, dtype=dtype)))

    # Leaves that no mesh axis splits are computed identically on every device, hence check_vma=False.
    outs = jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=tuple(specs), check_vma=False)(*xs)
    return [o[tuple(slice(0, s) for s in leaf.shape)] if p else o for o, leaf, p in zip(outs, leaves, pads)]


def _orthogonalize_local(leaves, axes_list, out_dtypes, group, scaling, rms, orth_kw):
    """Polar factors of every leaf on one device (or left to XLA's partitioner), same-side leaves chained if group."""
    mats, restores, groups = [], [], {}
    for i, (leaf, axes) in enumerate(zip(leaves, axes_list)):
        x3, restore = to_matrices(leaf, axes)
        mats.append(x3)
        restores.append(restore)
        groups.setdefault((min(x3.shape[1:]), max(x3.shape[1:])) if group else i, []).append(i)
    results = [None] * len(leaves)
    for members in groups.values():
        xs = [mats[i] for i in members]
        scales = [update_scale(x.shape[1], x.shape[2], scaling, rms) for x in xs]
        outs = orthogonalize.orthogonalize_group(xs, out_scales=scales, out_dtypes=[out_dtypes[i] for i in members],
                                                 **orth_kw)
        for i, o in zip(members, outs):
            results[i] = restores[i](o)
    return results


def context_mesh():
    """The mesh in context (`sharding.context_mesh`: the Trainer's, or jax's) if it spans >1 device, else None."""
    from kanana_jax.sharding import context_mesh as _context_mesh
    mesh = _context_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def scale_by_muon(*, beta: float = 0.95, nesterov: bool = True, method: str = "polar_express",
                  coeffs=None, steps: int | None = None, scaling: str = "rms_match", rms: float = 0.2,
                  dtype=jnp.bfloat16, mu_dtype=None, algorithm: str = "auto", max_segment_gain: float = 16.0,
                  max_segment_steps: int = 2,
                  per_head: bool = False, group: bool | None = None, epilogue_dtype=None,
                  kernel_backend: str | None = None,
                  axes_fn: Callable[[str, int], MatrixAxes] | None = None,
                  mesh: jax.sharding.Mesh | str | None = None) -> optax.GradientTransformation:
    """Muon direction: EMA momentum (Nesterov optional), polar factor per matrix, times `update_scale`.

    axes_fn(path, ndim) -> MatrixAxes; default `partition.matrix_axes(path, ndim, per_head)`.
    mesh: a Mesh, None (let XLA partition), or "context" (the mesh in context when the update is traced).
    group: orthogonalize leaves with equal matrix sides in one chain (their Gram matrices stacked; default:
    only with a mesh, on each device's local matrices; on one device per-leaf chains avoid the copies).
    kernel_backend: kernel of the Gram matrices and step polynomials (`pallas_kernels.polar`; None: the symmetric
    Mosaic GPU kernel on a GPU, XLA elsewhere; 'reference': XLA everywhere).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"muon scaling={scaling!r}; allowed: {SCALINGS}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"muon beta={beta} must lie in [0, 1)")
    axes_fn = axes_fn or (lambda path, ndim: partition.matrix_axes(path, ndim, per_head))
    orth_kw = dict(method=method, coeffs=coeffs, steps=steps, dtype=dtype, algorithm=algorithm,
                   max_segment_gain=max_segment_gain,
                   max_segment_steps=max_segment_steps, epilogue_dtype=epilogue_dtype,
                   kernel_backend=kernel_backend)
    if isinstance(mesh, str) and mesh != "context":
        raise ValueError(f"muon mesh={mesh!r}; pass a Mesh, None or 'context'")

    def init_fn(params):
        return MuonState(count=jnp.zeros([], jnp.int32),
                         mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params))

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (beta * m.astype(jnp.float32) + (1 - beta) * g.astype(jnp.float32)),
                          updates, state.mu)
        if nesterov:
            direction = jax.tree.map(lambda g, m: beta * m + (1 - beta) * g.astype(jnp.float32), updates, mu)
        else:
            direction = mu
        mesh_ = context_mesh() if mesh == "context" else mesh
        stack = (mesh_ is not None) if group is None else group
        flat, treedef = jax.tree_util.tree_flatten_with_path(direction)
        out_dtypes = [leaf.dtype for leaf in jax.tree.leaves(updates)]
        axes_list = [axes_fn(partition.path_str(path), leaf.ndim) for path, leaf in flat]
        if mesh_ is not None:
            results = _orthogonalize_on_mesh([leaf for _, leaf in flat], axes_list, out_dtypes, mesh_,
                                             scaling=scaling, rms=rms, group=stack, **orth_kw)
        else:
            results = _orthogonalize_local([leaf for _, leaf in flat], axes_list, out_dtypes, stack, scaling, rms,
                                           orth_kw)
        new_updates = jax.tree_util.tree_unflatten(treedef, results)
        mu = jax.tree.map(lambda m, old: m.astype(old.dtype), mu, state.mu)
        return new_updates, MuonState(count=optax.safe_increment(state.count), mu=mu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.0,
         rules: Sequence[tuple[str, str]] = partition.DEFAULT_RULES,
         adamw_learning_rate: optax.ScalarOrSchedule | None = None, b1: float = 0.9, b2: float = 0.95,
         eps: float = 1e-8, adamw_weight_decay: float = 0.0, adamw_decay_mask=None,
         **muon_kwargs) -> optax.GradientTransformation:
    """Muon on 'muon'-labelled parameters, AdamW on 'adamw', zero on 'frozen' (labels from `rules`).

    Weight decay is decoupled (p <- p - lr * wd * p) on both sides. muon_kwargs go to `scale_by_muon`.
    """
    rules = partition.validate_rules(rules)
    muon_tx = optax.chain(scale_by_muon(**muon_kwargs), optax.add_decayed_weights(weight_decay),
                          optax.scale_by_learning_rate(learning_rate))
    adamw_tx = optax.adamw(learning_rate if adamw_learning_rate is None else adamw_learning_rate, b1=b1, b2=b2,
                           eps=eps, weight_decay=adamw_weight_decay, mask=adamw_decay_mask)
    return optax.multi_transform({"muon": muon_tx, "adamw": adamw_tx, "frozen": optax.set_to_zero()},
                                 lambda tree: partition.labels(tree, rules))
