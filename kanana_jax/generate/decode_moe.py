"""The MoE layer of one decode step, with routed-expert paths built for few rows per expert.

The model's MoE (`kanana_jax.model.moe.MoE`) is built for training batches: it sorts token copies by expert and
runs grouped matmuls sized for thousands of rows. A decode step has B*top_k copies (6 at batch 1, 1,536 at 256),
and what it costs is reading the expert weights. Paths (`DecodeOptions.moe`):

- 'model': the model's MoE module on the layer's sliced parameters (the first decode path; a reference).
- 'gather': each copy multiplies its own expert's gathered weights (reads B*k expert matrices: best at batch 1).
- 'capacity': copies placed in C slots per expert ([E,C,D], C >= 16), one batched einsum per projection over all
  experts (reads every expert once); copies beyond C run in further rounds (dropless).
- 'kernel': the capacity layout through `expert_kernel` (Pallas Triton): reads each routed-to expert once,
  straight from the layer stack, and skips experts with no copy. GPU only (interpret mode elsewhere).
- 'auto': 'gather' when B*k <= E/4, else 'model': what measured fastest on the H200 (BENCHMARKS.md "Sampler
  decode speed"). 'capacity' and 'kernel' were slower there at batch 64/256 (2.1x and 1.2x the step time);
  likely causes, not yet profiled: the data-dependent round loop is a while loop whose condition the GPU
  runtime reads on the host once per layer, the batched einsum's operand is a materialized slice of the stack,
  and the kernel's blocks are untuned.

Routing and the shared experts are the model's (`model.moe.route`, `layers.MLP`), so every path computes the
same function; they differ in the order of float additions only.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from kanana_jax.config import ModelConfig
from kanana_jax.generate import expert_kernel
from kanana_jax.model.layers import DTYPES, MLP
from kanana_jax.model.moe import route

MOE_PATHS = ("auto", "model", "gather", "capacity", "kernel")
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def capacity(n_copies: int, n_experts: int) -> int:
    """Slots per expert and round: a power of two >= 16 and >= 2 x the mean load + 8 (one round when the
    router spreads copies about evenly; a hot expert takes more rounds, nothing is dropped)."""
    want = max(16, -(-2 * n_copies // n_experts) + 8)
    return 1 << (want - 1).bit_length()


def resolve_path(path: str, n_copies: int, n_experts: int) -> str:
    """The concrete path for `path` ('auto' picks by the number of token copies B*k)."""
    if path not in MOE_PATHS:
        raise ValueError(f"DecodeOptions.moe={path!r}; allowed values: {', '.join(MOE_PATHS)}")
    if path != "auto":
        return path
    return "gather" if 4 * n_copies <= n_experts else "model"


def _ranks(expert_M, n_experts: int):
    """(rank of each copy among the copies of its expert [M], copies per expert [E])."""
    onehot_MxE = (expert_M[:, None] == jnp.arange(n_experts, dtype=expert_M.dtype)[None, :]).astype(jnp.int32)
    rank_M = jnp.take_along_axis(jnp.cumsum(onehot_MxE, axis=0), expert_M[:, None], axis=1)[:, 0] - 1
    return rank_M, jnp.sum(onehot_MxE, axis=0)


def _fit(bs: expert_kernel.BlockSizes, K: int, N: int) -> expert_kernel.BlockSizes:
    """Block sizes no larger than the matrix (small test models)."""
    import dataclasses
    return dataclasses.replace(bs, bn=min(bs.bn, N), bk=min(bs.bk, K))


def gather_experts(x_MxD, expert_M, layer, stacks, dt):
    """Routed SwiGLU per copy with its expert's weights gathered from the layer stack -> [M,D] float32."""
    f32 = jnp.float32
    w = {name: stacks[name][layer, expert_M].astype(dt) for name in EXPERT_WEIGHTS}
    g = jnp.einsum("md,mdf->mf", x_MxD, w["w_gate"], preferred_element_type=f32)
    u = jnp.einsum("md,mdf->mf", x_MxD, w["w_up"], preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(dt)
    return jnp.einsum("mf,mfd->md", h, w["w_down"], preferred_element_type=f32)


def capacity_experts(x_MxD, expert_M, layer, stacks, dt, *, n_slots: int, kernel: bool,
                     blocks: expert_kernel.BlockSizes = expert_kernel.BlockSizes(), interpret: bool = False):
    """Routed SwiGLU over [E, n_slots, D] slots, in as many rounds as the busiest expert needs -> [M,D] float32."""
    M, D = x_MxD.shape
    E, _, F = stacks["w_gate"].shape[1:]
    C = n_slots
    rank_M, counts_E = _ranks(expert_M, E)
    if kernel:
        up_bs, down_bs = _fit(blocks, D, F), _fit(blocks, F, D)
        gate_up = lambda rows, x: expert_kernel.gate_up(  # noqa: E731
            layer, rows, x, stacks["w_gate"], stacks["w_up"], bs=up_bs, interpret=interpret)
        down = lambda rows, h: expert_kernel.down(layer, rows, h, stacks["w_down"], bs=down_bs,  # noqa: E731
                                                  interpret=interpret)
    else:
        def gate_up(rows, x):
            return expert_kernel.reference_gate_up(layer, rows, x, stacks["w_gate"].astype(dt),
                                                   stacks["w_up"].astype(dt))

        def down(rows, h):
            return expert_kernel.reference_down(layer, rows, h, stacks["w_down"].astype(dt))

    def one_round(r, y_MxD):
        slot_M = rank_M - r * C
        inside_M = (slot_M >= 0) & (slot_M < C)
        dest_M = jnp.where(inside_M, expert_M * C + slot_M, E * C)   # E*C: a dump row, dropped
        x_ExCxD = jnp.zeros((E * C + 1, D), dt).at[dest_M].set(x_MxD)[:-1].reshape(E, C, D)
        rows_E = jnp.clip(counts_E - r * C, 0, C)
        y_ExCxD = down(rows_E, gate_up(rows_E, x_ExCxD))
        y_flat = jnp.concatenate([y_ExCxD.reshape(E * C, D), jnp.zeros((1, D), y_ExCxD.dtype)])
        return y_MxD + jnp.where(inside_M[:, None], y_flat[dest_M].astype(jnp.float32), 0.0)

    rounds = (jnp.max(counts_E) + C - 1) // C
    return lax.fori_loop(0, rounds, one_round, jnp.zeros((M, D), jnp.float32))


def decode_moe(cfg: ModelConfig, params, x_Bx1xD, layer, stacks, *, path: str,
               blocks: expert_kernel.BlockSizes = expert_kernel.BlockSizes()):
    """The model's MoE output [B,1,D] for one token per row. `params`: this layer's 'moe' tree without the routed
    expert weights; `stacks`: {'w_gate','w_up','w_down'} of the whole layer stack [L,E,...]; `layer`: index."""
    B, T, D = x_Bx1xD.shape
    dt = DTYPES[cfg.dtype]
    x_NxD = x_Bx1xD.reshape(B * T, D)
    logits_NxE = jnp.einsum("nd,de->ne", x_NxD.astype(jnp.float32), params["router"]["kernel"].astype(jnp.float32))
    ids_Nxk, weights_Nxk, _ = route(
        logits_NxE, params["router"]["bias"], top_k=cfg.top_k, score_func=cfg.score_func, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor)
    N, k = ids_Nxk.shape
    E = stacks["w_gate"].shape[1]
    expert_M = ids_Nxk.reshape(-1)
    x_MxD = jnp.repeat(x_NxD.astype(dt), k, axis=0)
    path = resolve_path(path, N * k, E)
    if path == "gather":
        y_MxD = gather_experts(x_MxD, expert_M, layer, stacks, dt)
    elif path in ("capacity", "kernel"):
        y_MxD = capacity_experts(x_MxD, expert_M, layer, stacks, dt, n_slots=capacity(N * k, E),
                                 kernel=path == "kernel", blocks=blocks,
                                 interpret=path == "kernel" and jax.default_backend() != "gpu")
    else:
        raise ValueError(f"decode_moe has no path {path!r} (the 'model' path runs the model's MoE module)")
    routed_NxD = jnp.sum(y_MxD.reshape(N, k, D) * weights_Nxk[..., None], axis=1).astype(dt)
    y_BxTxD = routed_NxD.reshape(B, T, D)
    if cfg.n_shared_experts:
        shared = MLP(cfg.n_shared_experts * cfg.moe_d_ff, cfg.init_std, dt, DTYPES[cfg.param_dtype])
        y_BxTxD = y_BxTxD + shared.apply({"params": params["shared"]}, x_Bx1xD)
    return y_BxTxD
