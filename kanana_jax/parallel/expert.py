"""Expert parallelism: routed experts split over a mesh axis; token copies travel to the devices that own their
experts in `shard_map`, run there through the grouped matmul, and travel back.

Active when the logical rules in context map 'experts' to a mesh axis of size G > 1 (the `fsdp_ep` and
`fsdp_tp_ep` presets) and `model.expert_parallel` is not 'off'. Each device holds E/G experts and the tokens of
its batch shard (the batch is split over the expert axis too). Two dispatch modes:
  dropless: every copy is sent (ragged all-to-all). The receive buffer has G*M rows for M local copies, the
            worst case of all G senders routing everything here; the grouped matmul skips the empty tail.
  capacity: at most C = ceil(capacity_factor * M / E) copies per (sender, expert); later copies (in token order)
            are dropped and contribute zero. Fixed-size all_to_all of [G, E/G, C, D] blocks, dense batched matmuls.
With 'expert_mlp' split over a second axis (tensor parallelism inside the experts), each device computes a slice
of the hidden width and the partial outputs are summed over that axis.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from kanana_jax.config import ModelConfig
from kanana_jax.parallel.exchange import exchange_for_platform, ragged_exchange


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """Where experts, tokens and the expert hidden width live on the mesh, and how copies are exchanged."""
    mesh: Any                       # jax.sharding.Mesh or AbstractMesh
    expert_axis: str
    batch_axes: tuple               # mesh axes splitting the token dimension (must include expert_axis)
    mlp_axis: Optional[str]         # mesh axis splitting the expert hidden width F, or None
    mode: str                       # 'dropless' | 'capacity'
    capacity_factor: float
    exchange: str                   # 'ragged' | 'dense' (see kanana_jax.parallel.exchange)

    @property
    def n_shards(self) -> int:
        return self.mesh.shape[self.expert_axis]

    @property
    def n_token_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)


def current_mesh():
    """The mesh in context (`sharding.context_mesh`: the Trainer's, or jax's abstract one), else None."""
    from kanana_jax.sharding import context_mesh
    return context_mesh()


def _axes(value) -> tuple:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _platform(mesh) -> str:
    """The platform of the mesh's devices (an AbstractMesh knows it from its abstract device)."""
    abstract_device = getattr(mesh, "abstract_device", None)
    if abstract_device is not None and getattr(abstract_device, "platform", None):
        return abstract_device.platform
    if isinstance(mesh, jax.sharding.Mesh) and mesh.devices.size:
        return mesh.devices.flat[0].platform
    return jax.default_backend()


def make_plan(cfg: ModelConfig, mesh, rules, *, exchange: str | None = None) -> ExpertPlan | None:
    """The expert-parallel plan for `mesh` and logical `rules`, or None when experts are not split (or it is off)."""
    if cfg.expert_parallel == "off" or mesh is None:
        return None
    table = dict(rules)
    expert_axes = [a for a in _axes(table.get("experts")) if mesh.shape[a] > 1]
    if not expert_axes:
        return None
    if len(expert_axes) > 1:
        raise ValueError(f"logical axis 'experts' maps to several mesh axes {expert_axes}; expert parallelism "
                         "needs one: map 'experts' to a single mesh axis in the rules preset")
    axis = expert_axes[0]
    G = mesh.shape[axis]
    if cfg.n_routed_experts % G:
        raise ValueError(f"model.n_routed_experts={cfg.n_routed_experts} is not divisible by the expert mesh axis "
                         f"'{axis}' of size {G}; pick mesh.expert dividing the number of experts")
    batch_axes = _axes(table.get("activation_batch"))
    if axis not in batch_axes:
        raise ValueError(f"expert parallelism over '{axis}' needs the batch split over it too; 'activation_batch' "
                         f"maps to {batch_axes}: add '{axis}' to it in the rules preset")
    mlp_axes = [a for a in _axes(table.get("expert_mlp")) if mesh.shape[a] > 1]
    if len(mlp_axes) > 1 or (mlp_axes and mlp_axes[0] in batch_axes):
        raise ValueError(f"'expert_mlp' maps to {mlp_axes}: expert parallelism allows at most one mesh axis for the "
                         "expert hidden width, and not one that splits the batch")
    return ExpertPlan(mesh=mesh, expert_axis=axis, batch_axes=batch_axes, mlp_axis=mlp_axes[0] if mlp_axes else None,
                      mode=cfg.expert_parallel, capacity_factor=cfg.expert_capacity_factor,
                      exchange=exchange or exchange_for_platform(_platform(mesh)))


def current_plan(cfg: ModelConfig) -> ExpertPlan | None:
    """`make_plan` for the mesh and flax logical-axis rules in context."""
    return make_plan(cfg, current_mesh(), nn.get_logical_axis_rules())


def capacity(n_copies: int, n_experts: int, factor: float) -> int:
    """Slots per (sender, expert) in capacity mode: ceil(factor * copies / experts), at least 1."""
    return max(1, math.ceil(factor * n_copies / n_experts))


def dispatch(plan: ExpertPlan, x_NxD, expert_ids_Nxk, weights_Nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, gmm):
    """Expert-parallel routed SwiGLU experts -> [N,D]; same result as `model.moe.dispatch_experts` when no copy
    is dropped. N must divide evenly over the batch axes."""
    N = x_NxD.shape[0]
    if N % plan.n_token_shards:
        raise ValueError(f"{N} tokens cannot be split over the batch mesh axes {plan.batch_axes} "
                         f"({plan.n_token_shards} shards) for expert parallelism; make data.global_batch_size a "
                         "multiple of that, or set model.expert_parallel='off'")
    token_spec = P(plan.batch_axes, None)
    in_w = P(plan.expert_axis, None, plan.mlp_axis)
    out_w = P(plan.expert_axis, plan.mlp_axis, None)
    w_specs = tuple(_weight_spec(w, spec) for w, spec in
                    zip((w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD), (in_w, in_w, out_w)))
    body = _dropless_body if plan.mode == "dropless" else _capacity_body
    fn = jax.shard_map(functools.partial(body, plan=plan, gmm=gmm), mesh=plan.mesh,
                       in_specs=(token_spec, token_spec, token_spec, *w_specs), out_specs=token_spec)
    return fn(x_NxD, expert_ids_Nxk, weights_Nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)


def _weight_spec(w, spec_ExAxB):
    """The shard_map spec of an expert weight [E,A,B]: `spec_ExAxB`, or for a QuantizedExperts (fp8 copies made
    ahead, pallas_kernels/moe/fp8.py) the same split of w and q, of q_t [E,B,A] transposed, of the scales [E]."""
    from pallas_kernels.moe.fp8 import QuantizedExperts
    if not isinstance(w, QuantizedExperts):
        return spec_ExAxB
    e, a, b = spec_ExAxB
    return QuantizedExperts(spec_ExAxB, spec_ExAxB, P(e, b, a), P(e))


def _sort_copies(expert_ids_nxk):
    """(order[m], token[m]) of the m = n*k token copies sorted by expert (stable: token-major within an expert)."""
    k = expert_ids_nxk.shape[1]
    order_m = jnp.argsort(expert_ids_nxk.reshape(-1), stable=True)
    return order_m, order_m // k


def _combine(y_mxD, order_m, token_m, weights_nxk, n: int, dtype, plan: ExpertPlan):
    """Weighted scatter-add of expert outputs back to tokens; sums partial widths over the mlp axis."""
    y_mxD = y_mxD * weights_nxk.reshape(-1)[order_m][:, None].astype(y_mxD.dtype)
    out_nxD = jnp.zeros((n, y_mxD.shape[1]), dtype).at[token_m].add(y_mxD.astype(dtype))
    return jax.lax.psum(out_nxD, plan.mlp_axis) if plan.mlp_axis else out_nxD


def _dropless_body(x_nxD, ids_nxk, weights_nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, plan, gmm):
    """Per device: sort copies by expert, ragged all-to-all to the owners, grouped matmuls, all-to-all back."""
    axis, G = plan.expert_axis, plan.n_shards
    El = w_gate_ExDxF.shape[0]
    E = El * G
    n, k = ids_nxk.shape
    m = n * k
    order_m, token_m = _sort_copies(ids_nxk)
    x_mxD = x_nxD[token_m]
    counts_E = jnp.bincount(ids_nxk.reshape(-1), length=E).astype(jnp.int32)
    send_G = counts_E.reshape(G, El).sum(axis=1)
    send_offsets_G = jnp.cumsum(send_G) - send_G
    counts_GxE = jax.lax.all_gather(counts_E, axis)                  # every sender's copies per expert
    flow_GxG = counts_GxE.reshape(G, G, El).sum(axis=-1)             # [sender, receiver] row counts
    me = jax.lax.axis_index(axis)
    land_offsets_G = (jnp.cumsum(flow_GxG, axis=0) - flow_GxG)[me]   # where my rows land on each receiver
    recv_G = flow_GxG[:, me]
    back_offsets_G = (jnp.cumsum(flow_GxG, axis=1) - flow_GxG)[:, me]  # = each sender's send offset to me
    rows = G * m
    exchange = functools.partial(ragged_exchange, axis_name=axis, exchange=plan.exchange, max_send=m)
    x_RxD = exchange(x_mxD, rows, send_offsets_G, send_G, land_offsets_G, recv_G)
    # received rows: sender blocks in order, each sorted by my local experts -> local expert of every row
    recv_GxEl = jax.lax.dynamic_slice_in_dim(counts_GxE, me * El, El, axis=1)
    segment_R = jnp.searchsorted(jnp.cumsum(recv_GxEl.reshape(-1)), jnp.arange(rows), side="right")
    local_R = jnp.where(segment_R < G * El, segment_R % El, El)
    perm_R = jnp.argsort(local_R, stable=True)
    groups_El = recv_GxEl.sum(axis=0).astype(jnp.int32)
    xs_RxD = x_RxD[perm_R]
    h_RxF = jax.nn.silu(gmm(xs_RxD, w_gate_ExDxF, groups_El)) * gmm(xs_RxD, w_up_ExDxF, groups_El)
    ys_RxD = gmm(h_RxF, w_down_ExFxD, groups_El)
    y_RxD = jnp.zeros_like(ys_RxD).at[perm_R].set(ys_RxD)
    recv_offsets_G = jnp.cumsum(recv_G) - recv_G
    y_mxD = exchange(y_RxD, m, recv_offsets_G, recv_G, back_offsets_G, send_G)
    return _combine(y_mxD, order_m, token_m, weights_nxk, n, x_nxD.dtype, plan)


def capacity_slots(expert_ids_nxk, n_experts: int, cap: int):
    """(order[m], token[m], slot[m]) for capacity dispatch on one device: slot = expert*cap + rank of the copy
    within its expert (token order), or n_experts*cap when the copy is dropped (rank >= cap)."""
    order_m, token_m = _sort_copies(expert_ids_nxk)
    sorted_ids_m = expert_ids_nxk.reshape(-1)[order_m]
    counts_E = jnp.bincount(sorted_ids_m, length=n_experts)
    starts_E = jnp.cumsum(counts_E) - counts_E
    rank_m = jnp.arange(sorted_ids_m.shape[0]) - starts_E[sorted_ids_m]
    slot_m = jnp.where(rank_m < cap, sorted_ids_m * cap + rank_m, n_experts * cap)
    return order_m, token_m, slot_m


def _capacity_body(x_nxD, ids_nxk, weights_nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, *, plan, gmm):
    """Per device: place copies in [E, C] slots, all_to_all to the owners, batched matmuls, all_to_all back."""
    del gmm  # equal-size groups: a batched einsum is the grouped matmul here
    axis, G = plan.expert_axis, plan.n_shards
    El, D, _ = w_gate_ExDxF.shape
    E = El * G
    n, k = ids_nxk.shape
    cap = capacity(n * k, E, plan.capacity_factor)
    order_m, token_m, slot_m = capacity_slots(ids_nxk, E, cap)
    slots = jnp.zeros((E * cap + 1, D), x_nxD.dtype).at[slot_m].set(x_nxD[token_m])[:-1]
    sent = jax.lax.all_to_all(slots.reshape(G, El, cap, D), axis, 0, 0)       # [G_src, El, C, D]
    x_ExSxD = sent.transpose(1, 0, 2, 3).reshape(El, G * cap, D)
    h = jax.nn.silu(jnp.einsum("esd,edf->esf", x_ExSxD, w_gate_ExDxF)) * jnp.einsum("esd,edf->esf", x_ExSxD,
                                                                                 w_up_ExDxF)
    y_ExSxD = jnp.einsum("esf,efd->esd", h, w_down_ExFxD)
    back = jax.lax.all_to_all(y_ExSxD.reshape(El, G, cap, D).transpose(1, 0, 2, 3), axis, 0, 0)
    back_slots = jnp.concatenate([back.reshape(E * cap, D), jnp.zeros((1, D), back.dtype)])
    return _combine(back_slots[slot_m], order_m, token_m, weights_nxk, n, x_nxD.dtype, plan)
