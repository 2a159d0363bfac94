"""Reward-model stage: a scalar head on our decoder (model/heads.RewardModel), Bradley-Terry loss on preference
pairs: -log sigmoid(s(chosen) - s(rejected)) with s the score at the response's last token (its end-of-turn
token), plus reward_model.score_l2_coef * mean(s^2). Metrics: 'pair_accuracy', 'score_margin', 'score_mean';
eval: held-out 'eval_pair_accuracy'. The head is trained by AdamW (partition rule), the backbone by the
configured optimizer; `train.init_from` loads a language model into the backbone. A trained run is a scorer:
`kanana_jax.rewards.reward_model.RewardModelScorer(workdir)`.
"""
from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from kanana_jax.config import ExperimentConfig
from kanana_jax.model.heads import RewardModel, ScalarHead, last_token_scores
from kanana_jax.train.stages import pairs, protocol

policy_path = ("backbone",)
batch_spec = pairs.batch_spec_for
tokens_per_step = pairs.tokens_per_step


def make_model(cfg: ExperimentConfig):
    return RewardModel(cfg.model, protocol.fp8_recipe(cfg))


def init_params_from(cfg: ExperimentConfig, fresh_params, loaded):
    """The loaded language model as the backbone beside a fresh score head, initialized alone (normal(init_std)
    kernel, zero bias; key train.seed): the whole model's fresh init, a forward pass of the backbone that takes
    longer to compile than the tiny stage's steps take to run, is not made for a [D, 1] head."""
    dummy_h = jnp.zeros((1, 1, cfg.model.d_model), jnp.float32)
    head = ScalarHead(cfg.model.init_std).init(jax.random.PRNGKey(cfg.train.seed), dummy_h)["params"]
    return {"backbone": loaded, "reward_head": flax.core.unfreeze(nn.unbox(head))}


def pair_scores(model, params, batch):
    """(scores [B, 2] at the last token of each side, the backbone's intermediates)."""
    scores_NxT, state = pairs.apply_to_pairs(model, params, batch)
    B = batch["pair_mask_B"].shape[0]
    scores_Bx2 = last_token_scores(scores_NxT, pairs.rows(batch, "lengths_Bx2")).reshape(B, 2)
    return scores_Bx2, state.get("intermediates", {}).get("backbone", {})


def bradley_terry(scores_Bx2, pair_mask_B, cfg: ExperimentConfig):
    n = jnp.maximum(jnp.sum(pair_mask_B), 1.0)
    mean = lambda x: jnp.sum(x * pair_mask_B) / n
    diff_B = scores_Bx2[:, 0] - scores_Bx2[:, 1]
    bt = mean(-jax.nn.log_sigmoid(diff_B))
    l2 = mean(jnp.mean(jnp.square(scores_Bx2), axis=-1))
    metrics = {"bt_loss": bt, "pair_accuracy": mean((diff_B > 0).astype(jnp.float32)), "score_margin": mean(diff_B),
               "score_mean": mean(jnp.mean(scores_Bx2, axis=-1))}
    return bt + cfg.reward_model.score_l2_coef * l2, metrics


def loss_fn(model, params, extra, batch, cfg: ExperimentConfig, rng):
    scores, inter = pair_scores(model, params, batch)
    loss, metrics = bradley_terry(scores, batch["pair_mask_B"], cfg)
    tokens = jnp.sum(batch["lengths_Bx2"] * batch["pair_mask_B"][:, None].astype(jnp.int32)).astype(jnp.float32)
    return loss, {"metrics": {**metrics, "tokens": tokens}, "intermediates": inter,
                  "weight": jnp.sum(batch["pair_mask_B"])}


def eval_fn(model, params, extra, batch, cfg: ExperimentConfig):
    scores, _ = pair_scores(model, params, batch)
    loss, metrics = bradley_terry(scores, batch["pair_mask_B"], cfg)
    return {"eval_loss": loss, "eval_pair_accuracy": metrics["pair_accuracy"], "eval_pairs": jnp.sum(batch["pair_mask_B"])}


def eval_metrics(cfg: ExperimentConfig) -> dict:
    return {"eval_loss": "eval_pairs", "eval_pair_accuracy": "eval_pairs"}


def make_source(cfg: ExperimentConfig, split: str, seed: int, shard_index: int = 0, shard_count: int = 1):
    return pairs.source_for(cfg.reward_model.pairs, cfg, split, seed, shard_index, shard_count)


def flops_per_step(cfg: ExperimentConfig) -> float:
    return pairs.flops_per_step(cfg, lm_head=False)
