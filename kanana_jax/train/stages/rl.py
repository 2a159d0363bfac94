"""RL stage: GRPO or PPO on rollouts of the live policy, with tracks optimized side by side (Kanana-2's parallel
RL: a Chat track scored by a reward model, a Logic track by verifiers).

Data: `rollout.rl_source.RolloutSource` samples each batch from the current params (prompts drawn from the
tracks by weight), scores them on the host, recomputes old and reference log-probs with the training forward,
computes advantages (GRPO: group-relative, PPO: GAE on the critic's values; both normalized per track) and
yields [P, G, T] batches: P prompts x G samples, so a group is never split by microbatching (which splits P).

Loss per response token (mask = generated assistant tokens), ratio = exp(logp - old_logp):
  policy: max(-A ratio, -A clip(ratio, 1 - clip_low, 1 + clip_high))       (DAPO clip-higher: clip_high > low)
  KL to the frozen reference (rl.kl_mode='penalty'): + kl_coef * k, k1 = logp - ref, k3 = e^(ref-logp) - (ref-logp) - 1
  PPO critic: + value_coef * 0.5 max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-value_clip)
aggregated as rl.loss_aggregation: token_mean (all response tokens of the batch), seq_mean (per sequence,
then over sequences) or dr_grpo (sum over tokens / (sequences x max_new_tokens), Liu et al. 2025).
Evaluation: greedy rollouts of held-out prompts per track, verified ('eval_pass_rate/<track>', 'eval_reward/<track>').
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kanana_jax.config import ExperimentConfig
from kanana_jax.model.heads import PolicyCritic
from kanana_jax.model.logprobs import head_weight, token_logprobs
from kanana_jax.train.stages.protocol import BatchField, default_make_model, subtree

rebuild_extra = True
TOKEN_FIELDS = ("inputs", "targets", "positions", "segment_ids", "loss_mask", "old_logp", "ref_logp", "advantages",
                "returns", "old_values")


def policy_path(cfg: ExperimentConfig) -> tuple:
    return ("policy",) if cfg.rl.algorithm == "ppo" else ()


def make_model(cfg: ExperimentConfig):
    if cfg.rl.algorithm == "ppo":
        return PolicyCritic(cfg.model, getattr(default_make_model(cfg), "fp8", None))
    return default_make_model(cfg)


def init_extra(cfg: ExperimentConfig, params, rng) -> dict:
    """The frozen reference: the initial policy, with the weights the model reads only through a cast to the
    compute dtype stored in that dtype (the same forward, half their bytes: step.compute_dtype_copy)."""
    from kanana_jax.train.step import compute_dtype_copy
    return {"reference": jax.tree.map(jnp.copy, compute_dtype_copy(subtree(params, policy_path(cfg)), cfg))}


def init_params_from(cfg: ExperimentConfig, fresh_params, loaded):
    """GRPO: the loaded policy (no fresh init made). PPO: the policy, and the critic's backbone from the same
    weights (no LM head) beside the fresh value head."""
    if cfg.rl.algorithm != "ppo":
        return loaded
    fresh = fresh_params()
    backbone = {k: loaded[k] for k in fresh["critic"]["backbone"]}
    return {**fresh, "policy": loaded, "critic": {**fresh["critic"], "backbone": backbone}}


def batch_spec(cfg: ExperimentConfig) -> dict:
    P, G, T = cfg.data.global_batch_size, cfg.rl.group_size, cfg.data.seq_len
    spec = {f"{k}_PxGxT": BatchField((P, G, T), np.float32 if k in ("loss_mask", "old_logp", "ref_logp", "advantages",
                                                                     "returns", "old_values") else np.int32)
            for k in TOKEN_FIELDS}
    spec.update(sample_mask_PxG=BatchField((P, G), np.float32), track_ids_P=BatchField((P,), np.int32),
                kl_coef_P=BatchField((P,), np.float32))
    return spec


def tokens_per_step(cfg: ExperimentConfig) -> int:
    return cfg.data.global_batch_size * cfg.rl.group_size * cfg.data.seq_len


def flops_per_step(cfg: ExperimentConfig) -> float:
    """The learner's FLOPs (policy forward + backward; PPO: the critic's too, without an LM head)."""
    from kanana_jax.model.flops import flops_per_token
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    if cfg.rl.algorithm == "ppo":
        per_token += per_token - 6.0 * cfg.model.d_model * cfg.model.vocab_size
    return per_token * tokens_per_step(cfg)


def _rows(batch, name):
    x = batch[name]
    return x.reshape((-1,) + x.shape[2:])


def policy_logprobs(model, params, batch, cfg: ExperimentConfig):
    """(log p(target) [N, T], entropy [N, T], the policy's intermediates) over the N = P x G rows."""
    args = (_rows(batch, "inputs_PxGxT"), _rows(batch, "positions_PxGxT"), _rows(batch, "segment_ids_PxGxT"))
    if cfg.rl.algorithm == "ppo":
        h, state = model.apply({"params": params}, *args, method="policy_hidden", mutable=["intermediates"])
        inter = state.get("intermediates", {}).get("policy", {})
    else:
        h, state = model.apply({"params": params}, *args, return_hidden=True, mutable=["intermediates"])
        inter = state.get("intermediates", {})
    logp, entropy = token_logprobs(h, head_weight(subtree(params, policy_path(cfg)), cfg.model),
                                   _rows(batch, "targets_PxGxT"))
    return logp, entropy, inter


def kl_estimate(logp, ref_logp, estimator: str):
    """Per-token KL(policy || reference) estimate from the sampled tokens' log-probs."""
    log_ratio = ref_logp - logp
    if estimator == "k1":
        return -log_ratio
    return jnp.exp(log_ratio) - log_ratio - 1.0


def aggregate(per_token_NxT, mask_NxT, how: str, max_new_tokens: int):
    """(loss, microbatch weight) of per-token losses under rl.loss_aggregation."""
    seqs = jnp.sum((jnp.sum(mask_NxT, -1) > 0).astype(jnp.float32))
    total = jnp.sum(per_token_NxT * mask_NxT)
    if how == "token_mean":
        n = jnp.sum(mask_NxT)
        return total / jnp.maximum(n, 1.0), n
    if how == "seq_mean":
        per_seq = jnp.sum(per_token_NxT * mask_NxT, -1) / jnp.maximum(jnp.sum(mask_NxT, -1), 1.0)
        return jnp.sum(per_seq) / jnp.maximum(seqs, 1.0), seqs
    return total / jnp.maximum(seqs * max_new_tokens, 1.0), seqs   # dr_grpo


def loss_fn(model, params, extra, batch, cfg: ExperimentConfig, rng):
    rl = cfg.rl
    logp, entropy, inter = policy_logprobs(model, params, batch, cfg)
    mask = _rows(batch, "loss_mask_PxGxT") * batch["sample_mask_PxG"].reshape(-1)[:, None]
    old, ref, adv = (_rows(batch, f"{k}_PxGxT") for k in ("old_logp", "ref_logp", "advantages"))
    ratio = jnp.exp(logp - old)
    clipped = jnp.clip(ratio, 1.0 - rl.clip_low, 1.0 + rl.clip_high)
    pg = jnp.maximum(-adv * ratio, -adv * clipped)
    kl = kl_estimate(logp, ref, rl.kl_estimator)
    kl_coef = jnp.repeat(batch["kl_coef_P"], batch["sample_mask_PxG"].shape[1])[:, None]
    per_token = pg + (kl_coef * kl if rl.kl_mode == "penalty" else 0.0)
    loss, weight = aggregate(per_token, mask, rl.loss_aggregation, rl.max_new_tokens)
    n = jnp.sum(mask)
    clip_hit = ((ratio < 1.0 - rl.clip_low) & (adv < 0)) | ((ratio > 1.0 + rl.clip_high) & (adv > 0))
    ratios = {"kl": (jnp.sum(kl * mask), n), "entropy": (jnp.sum(entropy * mask), n),
              "clip_fraction": (jnp.sum(clip_hit * mask), n), "ratio_mean": (jnp.sum(ratio * mask), n),
              "pg_loss": (jnp.sum(pg * mask), n)}
    metrics = {"ratio_max": jnp.max(jnp.where(mask > 0, ratio, 0.0)), "tokens": n}
    if rl.algorithm == "ppo":
        args = (_rows(batch, "inputs_PxGxT"), _rows(batch, "positions_PxGxT"), _rows(batch, "segment_ids_PxGxT"))
        values = model.apply({"params": params}, *args, method="values")
        old_v, ret = _rows(batch, "old_values_PxGxT"), _rows(batch, "returns_PxGxT")
        err = jnp.square(values - ret)
        if rl.value_clip > 0:
            err = jnp.maximum(err, jnp.square(old_v + jnp.clip(values - old_v, -rl.value_clip, rl.value_clip) - ret))
        value_loss = 0.5 * jnp.sum(err * mask) / jnp.maximum(n, 1.0)
        loss = loss + rl.value_coef * value_loss
        ratios["value_loss"] = (0.5 * jnp.sum(err * mask), n)
        ratios["value_mean"] = (jnp.sum(values * mask), n)
    return loss, {"metrics": metrics, "ratios": ratios, "intermediates": inter, "weight": weight}


def make_source(cfg: ExperimentConfig, split: str, seed: int, shard_index: int = 0, shard_count: int = 1):
    from kanana_jax.rollout.rl_source import RolloutSource
    return RolloutSource(cfg, seed=seed, shard_index=shard_index, shard_count=shard_count)


def make_eval_sources(cfg: ExperimentConfig) -> dict:
    return {}


def evaluate(trainer, state) -> dict:
    """Greedy rollouts of rl.eval_prompts held-out prompts per track, scored as in training."""
    from kanana_jax.rollout.rl_source import evaluate_tracks
    return evaluate_tracks(trainer.cfg, subtree(state.params, policy_path(trainer.cfg)))
