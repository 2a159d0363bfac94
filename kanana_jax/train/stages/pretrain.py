"""Pre-training stage: masked next-token cross-entropy plus the router's balance and z losses."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kanana_jax.config import ExperimentConfig

MUTABLE = ["intermediates", "aux_loss"]


def forward(model, params, batch):
    """(logits[B,T,V] float32, sown state) of the model on a packed batch."""
    return model.apply({"params": params}, batch["inputs_BxT"], batch["positions_BxT"], batch["segment_ids_BxT"],
                       mutable=MUTABLE)


def token_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
    """(mean masked next-token loss, number of counted tokens)."""
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    n_tokens = jnp.sum(mask_BxT)
    return jnp.sum(ce_BxT * mask_BxT) / jnp.maximum(n_tokens, 1.0), n_tokens


def router_aux_loss(state, cfg: ExperimentConfig):
    """Weighted sum over MoE layers of the sequence-balance and router z losses (0 when weights are 0)."""
    total = jnp.zeros((), jnp.float32)
    for tree in state.get("aux_loss", {}).values():
        moe = tree.get("moe", {})
        if cfg.train.seq_aux_loss_coef and "seq_balance" in moe:
            total += cfg.train.seq_aux_loss_coef * jnp.sum(moe["seq_balance"][0])
        if cfg.train.router_z_loss_coef and "router_z" in moe:
            total += cfg.train.router_z_loss_coef * jnp.sum(moe["router_z"][0])
    return total


def loss_fn(model, params, batch, cfg: ExperimentConfig):
    logits_BxTxV, state = forward(model, params, batch)
    lm_loss, n_tokens = token_cross_entropy(logits_BxTxV, batch["targets_BxT"], batch["loss_mask_BxT"])
    aux = router_aux_loss(state, cfg)
    metrics = {"lm_loss": lm_loss, "router_aux_loss": aux, "tokens": n_tokens}
    return lm_loss + aux, {"metrics": metrics, "intermediates": state.get("intermediates", {})}


def eval_fn(model, params, batch, cfg: ExperimentConfig):
    """Evaluation metrics on one batch: the LM loss and its token count."""
    logits_BxTxV, _ = forward(model, params, batch)
    lm_loss, n_tokens = token_cross_entropy(logits_BxTxV, batch["targets_BxT"], batch["loss_mask_BxT"])
    return {"eval_loss": lm_loss, "eval_tokens": n_tokens}
