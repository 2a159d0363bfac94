"""Muon as optax transforms: momentum -> polar factor (Polar Express by default) -> shape-aware scaling.

`scale_by_muon` orthogonalizes every leaf it sees as a batch of matrices (batch axes = layer, expert
and, with per_head, head axes; see `partition.matrix_axes`). Leaves whose matrices share a
(short side, long side) pair are orthogonalized together in one batched einsum chain. With `mesh`,
each such group is stacked along its batch axis, padded to a multiple of the device count and
resharded over all mesh axes, so every device orthogonalizes whole matrices locally: the only
collectives are the reshards (all-to-all / all-gather), never an all-reduce of a Gram matrix.

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


def _orient(x3, tall):
    return jnp.swapaxes(x3, 1, 2) if tall else x3


def _orthogonalize_sharded(xs, mesh, **kw):
    """Stack a group along its batch axis, pad to the device count, reshard, orthogonalize locally, unstack."""
    talls = [x.shape[1] > x.shape[2] for x in xs]
    stacked = jnp.concatenate([_orient(x, t) for x, t in zip(xs, talls)], axis=0)
    n_dev = math.prod(mesh.shape.values())
    pad = (-stacked.shape[0]) % n_dev
    if pad:
        stacked = jnp.concatenate([stacked, jnp.zeros((pad,) + stacked.shape[1:], stacked.dtype)], axis=0)
    spec = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), None, None))
    stacked = jax.lax.with_sharding_constraint(stacked, spec)
    scales, dtypes = kw.pop("out_scales"), kw.pop("out_dtypes")
    # Each member's scale is applied after unstacking (one elementwise pass that also un-transposes).
    out, = orthogonalize.orthogonalize_group([stacked], out_scales=[1.0], out_dtypes=[stacked.dtype], **kw)
    out = jax.lax.with_sharding_constraint(out, spec)
    res, start = [], 0
    for x, t, s, od in zip(xs, talls, scales, dtypes):
        piece = out[start:start + x.shape[0]]
        start += x.shape[0]
        res.append((s * _orient(piece, t).astype(jnp.float32)).astype(od))
    return res


def context_mesh():
    """The mesh in context (`jax.set_mesh` or a legacy `with mesh:` block) if it spans >1 device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        import warnings
        from jax.interpreters import pxla
        with warnings.catch_warnings():      # the legacy `with mesh:` context is what the Trainer enters
            warnings.simplefilter("ignore", DeprecationWarning)
            mesh = pxla.thread_resources.env.physical_mesh
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def scale_by_muon(*, beta: float = 0.95, nesterov: bool = True, method: str = "polar_express",
                  coeffs=None, steps: int | None = None, scaling: str = "rms_match", rms: float = 0.2,
                  dtype=jnp.bfloat16, mu_dtype=None, algorithm: str = "auto", max_segment_gain: float = 16.0,
                  max_segment_steps: int = 2,
                  per_head: bool = False, group: bool | None = None, epilogue_dtype=None,
                  axes_fn: Callable[[str, int], MatrixAxes] | None = None,
                  mesh: jax.sharding.Mesh | str | None = None) -> optax.GradientTransformation:
    """Muon direction: EMA momentum (Nesterov optional), polar factor per matrix, times `update_scale`.

    axes_fn(path, ndim) -> MatrixAxes; default `partition.matrix_axes(path, ndim, per_head)`.
    mesh: a Mesh, None (let XLA partition), or "context" (the mesh in context when the update is traced).
    group: orthogonalize leaves with equal matrix sides in one stacked chain (default: only with a mesh,
    where it is needed to spread small leaves over devices; on one device per-leaf chains avoid the copies).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"muon scaling={scaling!r}; allowed: {SCALINGS}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"muon beta={beta} must lie in [0, 1)")
    axes_fn = axes_fn or (lambda path, ndim: partition.matrix_axes(path, ndim, per_head))
    orth_kw = dict(method=method, coeffs=coeffs, steps=steps, dtype=dtype, algorithm=algorithm,
                   max_segment_gain=max_segment_gain,
                   max_segment_steps=max_segment_steps, epilogue_dtype=epilogue_dtype)
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
        mats, restores, groups = [], [], {}
        for i, (path, leaf) in enumerate(flat):
            x3, restore = to_matrices(leaf, axes_fn(partition.path_str(path), leaf.ndim))
            mats.append(x3)
            restores.append(restore)
            key = (min(x3.shape[1:]), max(x3.shape[1:])) if stack else i
            groups.setdefault(key, []).append(i)
        results = [None] * len(flat)
        for members in groups.values():
            xs = [mats[i] for i in members]
            scales = [update_scale(x.shape[1], x.shape[2], scaling, rms) for x in xs]
            dts = [out_dtypes[i] for i in members]
            if mesh_ is not None:
                outs = _orthogonalize_sharded(xs, mesh_, out_scales=scales, out_dtypes=dts, **orth_kw)
            else:
                outs = orthogonalize.orthogonalize_group(xs, out_scales=scales, out_dtypes=dts, **orth_kw)
            for i, o in zip(members, outs):
                results[i] = restores[i](o)
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
