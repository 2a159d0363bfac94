"""Parameter updates that happen after the optimizer, inside the jitted step: router balancing bias, MuonClip."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kanana_jax.config import ExperimentConfig
from kanana_jax.optim import muon_clip


def _expert_loads(intermediates) -> dict:
    """{stack name: load[L,E]} from the sown 'expert_load' of each MoE stack."""
    out = {}
    for stack, tree in intermediates.items():
        if "moe" in tree and "expert_load" in tree["moe"]:
            out[stack] = tree["moe"]["expert_load"][0]
    return out


def update_router_bias(params, intermediates, rate: float):
    """Aux-loss-free balancing (DeepSeek-V3): bias_e += rate * sign(mean load - load_e), per layer."""
    if rate == 0.0:
        return params
    params = dict(params)
    for stack, load_LxE in _expert_loads(intermediates).items():
        layer = dict(params[stack])
        moe = dict(layer["moe"])
        router = dict(moe["router"])
        mean_Lx1 = jnp.mean(load_LxE, axis=-1, keepdims=True)
        router["bias"] = router["bias"] + rate * jnp.sign(mean_Lx1 - load_LxE)
        moe["router"], layer["moe"] = router, moe
        params[stack] = layer
    return params


def post_update(params, intermediates, cfg: ExperimentConfig, policy_path: tuple = ()):
    """All post-optimizer parameter rules, in order: router balancing bias, then MuonClip (QK-clip of every head
    whose max logit on this batch exceeded optimizer.muon_clip_tau; 0 turns it off). They address the policy
    Transformer at `policy_path` inside `params` (a stage's protocol field); `intermediates` are that policy's
    sown values. Returns (params, metrics)."""
    from kanana_jax.train.stages.protocol import replace_subtree, subtree
    policy = subtree(params, policy_path)
    policy = update_router_bias(policy, intermediates, cfg.optimizer.router_bias_update_rate)
    metrics = {}
    if cfg.optimizer.muon_clip_tau > 0:
        policy, metrics = muon_clip.apply(policy, intermediates, cfg.optimizer.muon_clip_tau)
    return replace_subtree(params, policy_path, policy), metrics


def routing_metrics(intermediates) -> dict:
    """Expert load balance (max/mean tokens per expert, worst layer) and the max attention logit."""
    metrics = {}
    loads = list(_expert_loads(intermediates).values())
    if loads:
        # load is [L, E] for a scanned stack and [E] for an unscanned layer
        ratios = [jnp.ravel(jnp.max(l, axis=-1) / jnp.maximum(jnp.mean(l, axis=-1), 1e-9)) for l in loads]
        metrics["expert_load_max_over_mean"] = jnp.max(jnp.concatenate(ratios))
    max_logits = [tree["attn"]["max_logits"][0] for tree in intermediates.values() if "attn" in tree]
    if max_logits:
        metrics["max_attention_logit"] = jnp.max(jnp.stack([jnp.max(m) for m in max_logits]))
    return metrics
