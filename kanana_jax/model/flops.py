"""Parameter counts (total and active, by component) and model FLOPs per token, from the config alone."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kanana_jax.config import ModelConfig
from kanana_jax.model.transformer import Transformer

COMPONENTS = ("embedding", "lm_head", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms")


def param_shapes(cfg: ModelConfig):
    """Shape tree of the model parameters (no allocation)."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    variables = jax.eval_shape(lambda t: Transformer(cfg).init(jax.random.PRNGKey(0), t), tokens)
    return flax.linen.unbox(variables["params"])


def component_of(path: str) -> str:
    """Which component a parameter path belongs to."""
    if path.startswith("embed/"):
        return "embedding"
    if path.startswith("lm_head/"):
        return "lm_head"
    if "norm/" in path or path.endswith("norm/scale") or "_norm/" in path:
        return "norms"
    if "/attn/" in path:
        return "attention"
    if "/moe/experts/" in path:
        return "routed_experts"
    if "/moe/shared/" in path:
        return "shared_experts"
    if "/moe/router/" in path:
        return "router"
    if "/mlp/" in path:
        return "dense_mlp"
    raise ValueError(f"parameter {path!r} belongs to no known component")


def count_params(cfg: ModelConfig) -> dict:
    """{'total': {component: n}, 'active': {component: n}} with 'all' sums; active counts top_k of E experts."""
    from kanana_jax.optim.factory import param_path
    total = {c: 0 for c in COMPONENTS}
    for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(cfg)):
        total[component_of(param_path(path))] += int(np.prod(leaf.shape))
    active = dict(total)
    active["routed_experts"] = total["routed_experts"] * cfg.top_k // cfg.n_routed_experts
    total["all"], active["all"] = sum(total.values()), sum(active.values())
    return {"total": total, "active": active}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x active matmul params (embedding lookup excluded, LM head included) plus
    causal attention 3 x 2 x H x T x (Dqk + Dv) / 2 per layer (forward + backward, no remat recompute)."""
    active = count_params(cfg)["active"]
    matmul = active["all"] - active["embedding"] - active["norms"]
    if cfg.tie_embeddings:
        matmul += active["embedding"]
    d_v = cfg.v_head_dim if cfg.attention_type == "mla" else cfg.head_dim
    attention = cfg.n_layers * 3 * 2 * cfg.n_heads * seq_len * (cfg.qk_head_dim + d_v) / 2
    return 6.0 * matmul + attention
