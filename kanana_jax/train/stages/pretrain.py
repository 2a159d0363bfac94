"""Pre-training stage: masked next-token cross-entropy plus the router's balance and z losses.

Data: packed documents from `data.source` or the `data.mixture`. With a mixture of several sources the batch also
carries `source_ids_BxT` (which source each token came from) and the step reports per-source token counts
('tokens/<name>') and LM loss ('lm_loss/<name>'); evaluation runs each source's held-out split on its own
('eval_loss/<name>') next to the overall 'eval_loss'.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from kanana_jax.config import ExperimentConfig
from kanana_jax.data import pipeline
from kanana_jax.train.stages.protocol import BatchField

MUTABLE = ["intermediates", "aux_loss"]


def forward(model, params, batch):
    """(logits[B,T,V] float32, sown state) of the model on a packed batch."""
    return model.apply({"params": params}, batch["inputs_BxT"], batch["positions_BxT"], batch["segment_ids_BxT"],
                       mutable=MUTABLE)


def masked_mean(ce_BxT, mask_BxT):
    """(mean of the per-token losses where mask is 1, number of counted tokens)."""
    n_tokens = jnp.sum(mask_BxT)
    return jnp.sum(ce_BxT * mask_BxT) / jnp.maximum(n_tokens, 1.0), n_tokens


def token_cross_entropy(logits_BxTxV, targets_BxT, mask_BxT):
    """(mean masked next-token loss, number of counted tokens)."""
    return masked_mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT), mask_BxT)


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


def per_source_sums(ce_BxT, mask_BxT, source_ids_BxT, names):
    """({'tokens/<name>': count}, {'lm_loss/<name>': (loss sum, count)}) over the tokens of each source."""
    sums, ratios = {}, {}
    for s, name in enumerate(names):
        in_s = mask_BxT * (source_ids_BxT == s)
        count = jnp.sum(in_s)
        sums[f"tokens/{name}"] = count
        ratios[f"lm_loss/{name}"] = (jnp.sum(ce_BxT * in_s), count)
    return sums, ratios


def loss_fn(model, params, extra, batch, cfg: ExperimentConfig, rng):
    return lm_loss(model, params, batch, cfg, pipeline.source_names(cfg.data))


def lm_loss(model, params, batch, cfg: ExperimentConfig, source_names):
    """Masked next-token loss + router aux losses; per-source sums when the batch carries `source_ids_BxT`."""
    logits_BxTxV, state = forward(model, params, batch)
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets_BxT"])
    lm_loss, n_tokens = masked_mean(ce_BxT, batch["loss_mask_BxT"])
    aux = router_aux_loss(state, cfg)
    metrics = {"lm_loss": lm_loss, "router_aux_loss": aux, "tokens": n_tokens}
    out = {"metrics": metrics, "intermediates": state.get("intermediates", {})}
    if "source_ids_BxT" in batch:
        out["sums"], out["ratios"] = per_source_sums(ce_BxT, batch["loss_mask_BxT"], batch["source_ids_BxT"],
                                                     source_names)
    return lm_loss + aux, out


def eval_fn(model, params, extra, batch, cfg: ExperimentConfig):
    """Evaluation metrics on one batch: the LM loss and its token count."""
    logits_BxTxV, _ = forward(model, params, batch)
    lm_loss, n_tokens = token_cross_entropy(logits_BxTxV, batch["targets_BxT"], batch["loss_mask_BxT"])
    return {"eval_loss": lm_loss, "eval_tokens": n_tokens}


def eval_metrics(cfg: ExperimentConfig) -> dict:
    return {"eval_loss": "eval_tokens"}


def batch_spec(cfg: ExperimentConfig) -> dict:
    return token_batch_spec(cfg.data)


def token_batch_spec(data_cfg) -> dict:
    """The fields of the packed token batches of `data_cfg` (source ids with a mixture of several sources)."""
    shape = (data_cfg.global_batch_size, data_cfg.seq_len)
    spec = {name: BatchField(shape, dtype) for name, dtype in pipeline.BATCH_DTYPES.items()}
    if len(pipeline.source_names(data_cfg)) > 1:
        spec["source_ids_BxT"] = BatchField(shape, np.int32)
    return spec


def make_source(cfg: ExperimentConfig, split: str, seed: int, shard_index: int = 0, shard_count: int = 1):
    return pipeline.make_iterator(cfg.data, split=split, seed=seed, shard_index=shard_index,
                                  shard_count=shard_count)


def make_eval_sources(cfg: ExperimentConfig) -> dict:
    """One held-out iterator per mixture source ('' for a single source)."""
    return pipeline.make_eval_iterators(cfg.data, seed=cfg.train.seed)
