"""SFT stage: conversations from buckets (Chat, Math, Code, Tool calling, instruction following) mixed by a recipe
(`sft.buckets`), trained on their assistant tokens only.

Each bucket is a chat source ('sft:<bucket>' for the embedded buckets, 'chat:<file>' for message records);
records render with the tokenizer's chat template, or the project's plain template (the one the eval runner
prompts with), and carry their per-token assistant mask through packing; a conversation is never split across
rows (data.chat_too_long: truncate at a turn boundary or drop; both counted in the data stats). The loss is the
next-token cross-entropy over assistant tokens; metrics per bucket: 'tokens/<bucket>' (assistant tokens trained
on) and 'lm_loss/<bucket>'; held-out eval per bucket: 'eval_loss/<bucket>'.
"""
from __future__ import annotations

import dataclasses

from kanana_jax.config import ConfigError, ExperimentConfig
from kanana_jax.data import pipeline
from kanana_jax.train.stages import pretrain

eval_fn, eval_metrics = pretrain.eval_fn, pretrain.eval_metrics


def sft_data(cfg: ExperimentConfig):
    """The DataConfig the SFT batches come from: data.* with the bucket recipe as its mixture."""
    if not cfg.sft.buckets:
        raise ConfigError("config key 'sft.buckets' is empty: the SFT stage needs at least one bucket, e.g. "
                          "(('math', 'sft:math', 1.0),) (experiments/sft.py sets a recipe)")
    if cfg.data.mixture:
        raise ConfigError("config key 'data.mixture' must be empty for train.stage='sft': the bucket recipe "
                          "sft.buckets is the SFT data mixture")
    return dataclasses.replace(cfg.data, mixture=tuple(cfg.sft.buckets))


def loss_fn(model, params, extra, batch, cfg: ExperimentConfig, rng):
    return pretrain.lm_loss(model, params, batch, cfg, [b[0] for b in cfg.sft.buckets])


def batch_spec(cfg: ExperimentConfig) -> dict:
    return pretrain.token_batch_spec(sft_data(cfg))


def make_source(cfg: ExperimentConfig, split: str, seed: int, shard_index: int = 0, shard_count: int = 1):
    return pipeline.make_iterator(sft_data(cfg), split=split, seed=seed, shard_index=shard_index,
                                  shard_count=shard_count)


def make_eval_sources(cfg: ExperimentConfig) -> dict:
    """One held-out iterator per bucket ('eval_loss/<bucket>'; '' for a single bucket)."""
    return pipeline.make_eval_iterators(sft_data(cfg), seed=cfg.train.seed)
