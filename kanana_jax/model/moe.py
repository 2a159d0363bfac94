"""DeepSeek-V3 mixture of experts: shared experts + routed experts, top-k routing, dropless dispatch.

Router: scores = softmax|sigmoid(x W_r); selection on scores + bias (aux-loss-free balancing, selection only),
optionally limited to the best `topk_group` of `n_group` expert groups; weights = the unbiased scores of the
chosen experts, optionally normalized, times `routed_scaling_factor`.
Dispatch: token copies sorted by expert, three grouped matmuls (gate, up, down), weighted scatter-add back.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from kanana_jax.config import ModelConfig
from kanana_jax.model.layers import DTYPES, MLP, constrain, param_with_axes
from kanana_jax.parallel import expert as expert_parallel


def route(logits_NxE, bias_E, *, top_k, score_func, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    """Top-k routing -> (expert_ids[N,k] int32, weights[N,k] f32, scores[N,E] f32). Bias affects selection only."""
    logits_NxE = logits_NxE.astype(jnp.float32)
    if score_func == "sigmoid":
        scores_NxE = jax.nn.sigmoid(logits_NxE)
    else:
        scores_NxE = jax.nn.softmax(logits_NxE, axis=-1)
    choice_NxE = jax.lax.stop_gradient(scores_NxE) + bias_E.astype(jnp.float32)
    N, E = choice_NxE.shape
    if n_group > 1:
        grouped_NxGxM = choice_NxE.reshape(N, n_group, E // n_group)
        if score_func == "sigmoid" and E // n_group >= 2:
            group_score_NxG = jnp.sum(jax.lax.top_k(grouped_NxGxM, 2)[0], axis=-1)
        else:
            group_score_NxG = jnp.max(grouped_NxGxM, axis=-1)
        _, top_groups_Nxg = jax.lax.top_k(group_score_NxG, topk_group)
        group_mask_NxG = jnp.sum(jax.nn.one_hot(top_groups_Nxg, n_group, dtype=jnp.int32), axis=1) > 0
        expert_mask_NxE = jnp.repeat(group_mask_NxG, E // n_group, axis=1)
        choice_NxE = jnp.where(expert_mask_NxE, choice_NxE, -jnp.inf)
    _, expert_ids_Nxk = jax.lax.top_k(choice_NxE, top_k)
    weights_Nxk = jnp.take_along_axis(scores_NxE, expert_ids_Nxk, axis=-1)
    if norm_topk_prob:
        weights_Nxk = weights_Nxk / (jnp.sum(weights_Nxk, axis=-1, keepdims=True) + 1e-20)
    return expert_ids_Nxk.astype(jnp.int32), weights_Nxk * routed_scaling_factor, scores_NxE


def blocked_gmm(x_MxK, w_ExKxN, group_sizes_E, block: int):
    """Grouped matmul for rows sorted by group: each group padded to `block` rows, one batched einsum over
    at most ceil(M/block)+E blocks. Dropless; cheap on CPU. Rows beyond sum(group_sizes) give zeros."""
    M, K = x_MxK.shape
    E, _, N = w_ExKxN.shape
    n_blocks = -(-M // block) + E
    ends_E = jnp.cumsum(group_sizes_E)
    padded_E = -(-group_sizes_E // block) * block
    padded_ends_E = jnp.cumsum(padded_E)
    rows_M = jnp.arange(M)
    group_M = jnp.searchsorted(ends_E, rows_M, side="right")
    valid_M = group_M < E
    group_M = jnp.minimum(group_M, E - 1)
    rank_M = rows_M - (ends_E - group_sizes_E)[group_M]
    dest_M = jnp.where(valid_M, (padded_ends_E - padded_E)[group_M] + rank_M, n_blocks * block)
    x_pad = jnp.zeros((n_blocks * block + 1, K), x_MxK.dtype).at[dest_M].set(x_MxK)[:-1]
    block_group = jnp.minimum(jnp.searchsorted(padded_ends_E, jnp.arange(n_blocks) * block, side="right"), E - 1)
    y_blocks = jnp.einsum("nbk,nkm->nbm", x_pad.reshape(n_blocks, block, K), w_ExKxN[block_group])
    y_pad = jnp.concatenate([y_blocks.reshape(n_blocks * block, N), jnp.zeros((1, N), y_blocks.dtype)])
    return y_pad[dest_M]


def grouped_matmul(impl: str, block: int, fp8=None):
    """gmm(lhs[M,K], rhs[E,K,N], group_sizes[E]) -> [M,N] for the configured implementation; with an fp8 recipe
    the fp8 grouped matmul (pallas_kernels/moe/fp8.py: the platform's kernel, or its reference on CPU)."""
    if fp8 is not None:
        from pallas_kernels.moe import Tiling
        from pallas_kernels.moe.fp8 import gmm_fp8
        if impl == "ragged_dot":
            raise ValueError("precision.matmul='fp8' needs model.moe_impl='pallas' or 'blocked': "
                             "jax.lax.ragged_dot takes no fp8 operands with scales")
        wgrad = "fp8" if fp8.expert_wgrad else "bf16"
        if impl == "blocked":
            return functools.partial(gmm_fp8, grad_dtype=fp8.grad_dtype, wgrad=wgrad, backend="reference",
                                     tiling=(Tiling(tm=block),) * 3)
        return functools.partial(gmm_fp8, grad_dtype=fp8.grad_dtype, wgrad=wgrad)
    if impl == "blocked":
        return functools.partial(blocked_gmm, block=block)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot
    if impl == "pallas":
        from pallas_kernels.moe import gmm
        return gmm
    raise ValueError(f"model.moe_impl={impl!r}; allowed values: 'blocked', 'ragged_dot', 'pallas'")


def dispatch_experts(x_NxD, expert_ids_Nxk, weights_Nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, gmm):
    """Dropless routed SwiGLU experts: sort token copies by expert, 3 grouped matmuls, weighted combine -> [N,D]."""
    N, k = expert_ids_Nxk.shape
    E = w_gate_ExDxF.shape[0]
    flat_ids = expert_ids_Nxk.reshape(-1)
    order_M = jnp.argsort(flat_ids, stable=True)
    token_M = order_M // k
    group_sizes_E = jnp.bincount(flat_ids, length=E).astype(jnp.int32)
    x_MxD = x_NxD[token_M]
    h_MxF = jax.nn.silu(gmm(x_MxD, w_gate_ExDxF, group_sizes_E)) * gmm(x_MxD, w_up_ExDxF, group_sizes_E)
    y_MxD = gmm(h_MxF, w_down_ExFxD, group_sizes_E)
    y_MxD = y_MxD * weights_Nxk.reshape(-1)[order_M][:, None].astype(y_MxD.dtype)
    return jnp.zeros_like(x_NxD).at[token_M].add(y_MxD.astype(x_NxD.dtype))


def dispatch_experts_pallas(x_NxD, expert_ids_Nxk, weights_Nxk, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, gmm=None,
                            fused_gate_up=False):
    """dispatch_experts on pallas_kernels.moe: gather-only permute/combine and the platform's gmm kernel
    (Mosaic on TPU, Mosaic GPU on Hopper, the blocked jnp path on CPU), or the given `gmm`. `fused_gate_up`: gate
    and up as one gmm over the concatenated [E, D, 2F] weight (one pass over the rows, wider tiles), split after."""
    from pallas_kernels.moe import Routing, combine, permute
    from pallas_kernels.moe.router import dispatch_metadata
    if gmm is None:
        from pallas_kernels.moe import gmm
    group_sizes_E, order_M, token_M, slot_Nxk = dispatch_metadata(expert_ids_Nxk, w_gate_ExDxF.shape[0])
    routing = Routing(expert_ids_Nxk, weights_Nxk, None, group_sizes_E, order_M, token_M, slot_Nxk)
    x_MxD = permute(x_NxD, routing)
    if fused_gate_up:
        F = w_gate_ExDxF.shape[-1]
        gate_up_Mx2F = gmm(x_MxD, jnp.concatenate([w_gate_ExDxF, w_up_ExDxF], axis=-1), group_sizes_E)
        h_MxF = jax.nn.silu(gate_up_Mx2F[:, :F]) * gate_up_Mx2F[:, F:]
    else:
        h_MxF = jax.nn.silu(gmm(x_MxD, w_gate_ExDxF, group_sizes_E)) * gmm(x_MxD, w_up_ExDxF, group_sizes_E)
    return combine(gmm(h_MxF, w_down_ExFxD, group_sizes_E), routing).astype(x_NxD.dtype)


class Experts(nn.Module):
    """Routed expert weights: w_gate/w_up [E,D,F], w_down [E,F,D]; `fp8` (an fp8.Fp8Recipe) runs the grouped
    matmuls in fp8 (current scaling, per-expert weight scales; the weights' fp8 copies from the 'fp8_weights'
    collection when the step made them ahead)."""
    cfg: ModelConfig
    fp8: object = None

    @nn.compact
    def __call__(self, x_NxD, expert_ids_Nxk, weights_Nxk):
        cfg, dt, pdt = self.cfg, DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        E, D, F = cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff
        init = nn.initializers.normal(cfg.init_std)
        w_gate = param_with_axes(self, "w_gate", (E, D, F), ("experts", "embed", "expert_mlp"), init, pdt)
        w_up = param_with_axes(self, "w_up", (E, D, F), ("experts", "embed", "expert_mlp"), init, pdt)
        w_down = param_with_axes(self, "w_down", (E, F, D), ("experts", "expert_mlp", "embed"), init, pdt)
        gmm = grouped_matmul(cfg.moe_impl, cfg.moe_block_rows, self.fp8)
        weights = [w.astype(dt) for w in (w_gate, w_up, w_down)]
        if self.fp8 is not None:  # the weights' fp8 copies, when the step made them ahead (model/fp8_weights.py)
            from kanana_jax.model import fp8 as fp8_lib
            from pallas_kernels.moe.fp8 import QuantizedExperts
            pres = [fp8_lib.prequantized(self, name) for name in ("w_gate", "w_up", "w_down")]
            weights = [w if p is None else QuantizedExperts(w, p["q"], p["q_t"], p["s"])
                       for w, p in zip(weights, pres)]
        args = (x_NxD.astype(dt), expert_ids_Nxk, weights_Nxk, *weights, gmm)
        plan = None if self.is_initializing() else expert_parallel.current_plan(cfg)
        if plan is not None:  # experts split over a mesh axis: all-to-all dispatch in shard_map
            if self.fp8 is not None and cfg.expert_parallel == "capacity":
                raise ValueError("precision.matmul='fp8' with model.expert_parallel='capacity' is not supported "
                                 "(its batched einsum has no fp8 path); use expert_parallel='dropless'")
            return expert_parallel.dispatch(plan, *args)
        if cfg.moe_impl == "pallas":
            fp8 = self.fp8 is not None  # fp8 weights are quantized per matrix: gate and up stay two calls
            return dispatch_experts_pallas(*args[:-1], gmm=gmm if fp8 else None,
                                           fused_gate_up=cfg.moe_fused_gate_up and not fp8)
        return dispatch_experts(*args)


def sequence_balance_loss(scores_BxTxE, expert_ids_BxTxk, n_experts: int):
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i * P_i, averaged over sequences (coefficient applied outside)."""
    B, T, k = expert_ids_BxTxk.shape
    counts_BxE = jnp.sum(jax.nn.one_hot(expert_ids_BxTxk, n_experts, dtype=jnp.float32), axis=(1, 2))
    f_BxE = counts_BxE * n_experts / (k * T)
    normalized = scores_BxTxE / (jnp.sum(scores_BxTxE, axis=-1, keepdims=True) + 1e-20)
    p_BxE = jnp.mean(normalized, axis=1)
    return jnp.mean(jnp.sum(f_BxE * p_BxE, axis=-1))


class MoE(nn.Module):
    """Shared SwiGLU experts (width n_shared*moe_d_ff) + routed experts; sows expert load and aux losses."""
    cfg: ModelConfig
    fp8: object = None

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg
        B, T, D = x_BxTxD.shape
        E = cfg.n_routed_experts
        pdt = DTYPES[cfg.param_dtype]
        router = RouterParams(D, E, cfg.init_std, name="router")
        kernel_DxE, bias_E = router()
        x_NxD = x_BxTxD.reshape(B * T, D)
        logits_NxE = jnp.einsum("nd,de->ne", x_NxD.astype(jnp.float32), kernel_DxE.astype(jnp.float32))
        expert_ids_Nxk, weights_Nxk, scores_NxE = route(
            logits_NxE, bias_E, top_k=cfg.top_k, score_func=cfg.score_func, n_group=cfg.n_group,
            topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor)
        routed_NxD = Experts(cfg, self.fp8, name="experts")(x_NxD, expert_ids_Nxk, weights_Nxk)
        y_BxTxD = routed_NxD.reshape(B, T, D)
        if cfg.n_shared_experts:
            shared = MLP(cfg.n_shared_experts * cfg.moe_d_ff, cfg.init_std, DTYPES[cfg.dtype], pdt, self.fp8,
                         name="shared")
            y_BxTxD = y_BxTxD + shared(x_BxTxD)
        load_E = jnp.bincount(expert_ids_Nxk.reshape(-1), length=E).astype(jnp.float32)
        self.sow("intermediates", "expert_load", load_E)
        self.sow("aux_loss", "seq_balance", sequence_balance_loss(
            scores_NxE.reshape(B, T, E), expert_ids_Nxk.reshape(B, T, -1), E))
        self.sow("aux_loss", "router_z", jnp.mean(jax.nn.logsumexp(logits_NxE, axis=-1) ** 2))
        return constrain(y_BxTxD, ("activation_batch", "activation_length", "activation_embed"))


class RouterParams(nn.Module):
    """Router weights: kernel [D,E] float32 (trained) and the balancing bias [E] (updated outside the optimizer)."""
    d_model: int
    n_experts: int
    init_std: float

    @nn.compact
    def __call__(self):
        kernel_DxE = param_with_axes(self, "kernel", (self.d_model, self.n_experts), ("embed", "experts_router"),
                                     nn.initializers.normal(self.init_std), jnp.float32)
        bias_E = param_with_axes(self, "bias", (self.n_experts,), ("experts_router",), nn.initializers.zeros,
                                 jnp.float32)
        return kernel_DxE, bias_E
