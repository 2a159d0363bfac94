"""What the pair stages (DPO, reward model) share: the pair batch, its source, and running a model on both sides.

A pair batch holds chosen (index 0) and rejected (index 1) rows [B, 2, T] (data/preference.py); the model runs on
them as 2B rows in one forward pass, so a pair is never split (also not by microbatching, which splits B).
"""
from __future__ import annotations

from kanana_jax.config import ExperimentConfig
from kanana_jax.data import preference
from kanana_jax.model.flops import flops_per_token
from kanana_jax.train.stages.protocol import BatchField


def batch_spec_for(cfg: ExperimentConfig) -> dict:
    shapes = preference.batch_shapes(cfg.data.global_batch_size, cfg.data.seq_len)
    return {k: BatchField(shapes[k], dtype) for k, dtype in preference.batch_dtypes().items()}


def source_for(path: str, cfg: ExperimentConfig, split: str, seed: int, shard_index: int, shard_count: int):
    return preference.make_pair_iterator(path, cfg.data, split=split, seed=seed, shard_index=shard_index,
                                         shard_count=shard_count)


def rows(batch, name: str):
    """A [B, 2, ...] field as [2B, ...]: row 2b is pair b's chosen side, 2b + 1 its rejected side."""
    x = batch[name]
    return x.reshape((-1,) + x.shape[2:])


def apply_to_pairs(model, params, batch, **kwargs):
    """model.apply on the 2B rows of a pair batch (mutable=['intermediates'] unless given)."""
    kwargs.setdefault("mutable", ["intermediates"])
    return model.apply({"params": params}, rows(batch, "inputs_Bx2xT"), rows(batch, "positions_Bx2xT"),
                       rows(batch, "segment_ids_Bx2xT"), **kwargs)


def tokens_per_step(cfg: ExperimentConfig) -> int:
    return 2 * cfg.data.global_batch_size * cfg.data.seq_len


def flops_per_step(cfg: ExperimentConfig, forwards_without_grad: int = 0, lm_head: bool = True) -> float:
    """Model FLOPs of one step: forward + backward of the trained model on both sides (6N per token) plus
    `forwards_without_grad` forward-only passes (2N per token, e.g. DPO's reference); without the LM head for
    scalar-head models."""
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)
    if not lm_head:
        per_token -= 6.0 * cfg.model.d_model * cfg.model.vocab_size
    return per_token * (1.0 + forwards_without_grad / 3.0) * tokens_per_step(cfg)
