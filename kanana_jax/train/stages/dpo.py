"""DPO / IPO stage: preference pairs against a frozen reference (the `train.init_from` params).

h = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), response tokens summed
(`dpo.loss='dpo'`) or averaged per token (`'ipo'`, as TRL does). Losses per pair:
  dpo: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)       (eps = dpo.label_smoothing)
  ipo: (h - 1 / (2 beta))^2
averaged over the real pairs of the batch. Metrics: 'rewards/chosen' and 'rewards/rejected' (beta x log-ratio),
'reward_margin', 'preference_accuracy' (chosen reward above rejected), 'kl/chosen' (log-ratio of the chosen side).

The reference lives in the stage's `extra` (a copy of the initial params; `rebuild_extra`: not checkpointed,
rebuilt from `train.init_from` on resume). It costs one forward pass per step (a third of the policy's
forward + backward) and one copy of the params in memory; caching its log-probs instead would cost the same
forward once per epoch plus a file, and cannot follow data you change between runs (BENCHMARKS/RESULTS say what
was measured). Log-probs come from the hidden states through the chunked `model.logprobs`: no [B, T, V]
float32 logits exist at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kanana_jax.config import ExperimentConfig
from kanana_jax.model.logprobs import head_weight, sequence_logprob, token_logprobs
from kanana_jax.train.stages import pairs

rebuild_extra = True
batch_spec = pairs.batch_spec_for
tokens_per_step = pairs.tokens_per_step


def init_extra(cfg: ExperimentConfig, params, rng) -> dict:
    """A copy of the initial params; weights the model reads only through a cast to the compute dtype are kept in
    that dtype (the same forward at half their bytes: step.compute_dtype_copy)."""
    from kanana_jax.train.step import compute_dtype_copy
    return {"reference": jax.tree.map(jnp.copy, compute_dtype_copy(params, cfg))}


def response_logprobs(model, params, batch, cfg: ExperimentConfig):
    """(summed response log-prob [B, 2], response token counts [B, 2], the policy's intermediates)."""
    h, state = pairs.apply_to_pairs(model, params, batch, return_hidden=True)
    logp_NxT, _ = token_logprobs(h, head_weight(params, cfg.model), pairs.rows(batch, "targets_Bx2xT"))
    mask_NxT = pairs.rows(batch, "loss_mask_Bx2xT")
    B = batch["pair_mask_B"].shape[0]
    return (sequence_logprob(logp_NxT, mask_NxT).reshape(B, 2), jnp.sum(mask_NxT, -1).reshape(B, 2),
            state.get("intermediates", {}))


def preference_loss(logp_Bx2, ref_logp_Bx2, n_tokens_Bx2, pair_mask_B, cfg: ExperimentConfig):
    """(mean loss over real pairs, metrics) from policy and reference response log-probs."""
    beta, eps = cfg.dpo.beta, cfg.dpo.label_smoothing
    ratio_Bx2 = logp_Bx2 - ref_logp_Bx2
    if cfg.dpo.loss == "ipo":
        h_B = ratio_Bx2[:, 0] / jnp.maximum(n_tokens_Bx2[:, 0], 1.0) - ratio_Bx2[:, 1] / jnp.maximum(n_tokens_Bx2[:, 1], 1.0)
        loss_B = jnp.square(h_B - 1.0 / (2.0 * beta))
    else:
        h_B = ratio_Bx2[:, 0] - ratio_Bx2[:, 1]
        loss_B = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h_B) - eps * jax.nn.log_sigmoid(-beta * h_B)
    n = jnp.maximum(jnp.sum(pair_mask_B), 1.0)
    mean = lambda x: jnp.sum(x * pair_mask_B) / n
    rewards_Bx2 = beta * ratio_Bx2
    metrics = {"rewards/chosen": mean(rewards_Bx2[:, 0]), "rewards/rejected": mean(rewards_Bx2[:, 1]),
               "reward_margin": mean(rewards_Bx2[:, 0] - rewards_Bx2[:, 1]),
               "preference_accuracy": mean((rewards_Bx2[:, 0] > rewards_Bx2[:, 1]).astype(jnp.float32)),
               "kl/chosen": mean(ratio_Bx2[:, 0])}
    return mean(loss_B), metrics


def _losses(model, params, extra, batch, cfg):
    logp, n_tokens, inter = response_logprobs(model, params, batch, cfg)
    ref_logp, _, _ = response_logprobs(model, jax.lax.stop_gradient(extra["reference"]), batch, cfg)
    loss, metrics = preference_loss(logp, jax.lax.stop_gradient(ref_logp), n_tokens, batch["pair_mask_B"], cfg)
    return loss, metrics, inter, n_tokens


def loss_fn(model, params, extra, batch, cfg: ExperimentConfig, rng):
    loss, metrics, inter, n_tokens = _losses(model, params, extra, batch, cfg)
    metrics = {"dpo_loss": loss, **metrics, "tokens": jnp.sum(n_tokens * batch["pair_mask_B"][:, None])}
    return loss, {"metrics": metrics, "intermediates": inter, "weight": jnp.sum(batch["pair_mask_B"])}


def eval_fn(model, params, extra, batch, cfg: ExperimentConfig):
    loss, metrics, _, _ = _losses(model, params, extra, batch, cfg)
    return {"eval_loss": loss, "eval_preference_accuracy": metrics["preference_accuracy"],
            "eval_reward_margin": metrics["reward_margin"], "eval_pairs": jnp.sum(batch["pair_mask_B"])}


def eval_metrics(cfg: ExperimentConfig) -> dict:
    return {"eval_loss": "eval_pairs", "eval_preference_accuracy": "eval_pairs", "eval_reward_margin": "eval_pairs"}


def make_source(cfg: ExperimentConfig, split: str, seed: int, shard_index: int = 0, shard_count: int = 1):
    return pairs.source_for(cfg.dpo.pairs, cfg, split, seed, shard_index, shard_count)


def flops_per_step(cfg: ExperimentConfig) -> float:
    return pairs.flops_per_step(cfg, forwards_without_grad=1)
