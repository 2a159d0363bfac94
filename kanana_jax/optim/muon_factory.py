"""`optimizer.name=muon`: builds `muon.muon` from an OptimizerConfig (called by `factory.make_optimizer`)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from kanana_jax.config import OptimizerConfig
from kanana_jax.optim import muon, partition

_NO_DECAY = re.compile(r"norm[^/]*/scale$|(^|/)bias$")


def adamw_decay_mask(params):
    """Decoupled weight decay on AdamW-group matrices (embeddings, LM head, router), never on norms or biases."""
    return jax.tree_util.tree_map_with_path(lambda p, _: not _NO_DECAY.search(partition.path_str(p)), params)


def make(cfg: OptimizerConfig, schedule) -> optax.GradientTransformation:
    """Muon on hidden matrices, AdamW on the rest, per `cfg.partition_rules` + `partition.DEFAULT_RULES`.

    Width transfer (`mup_base_width`) is chained on by `factory.make_optimizer`, for AdamW runs too.
    """
    rules = partition_rules(cfg)
    adamw_lr = (lambda step: cfg.adamw_lr_multiplier * schedule(step)) if cfg.adamw_lr_multiplier != 1.0 else schedule
    return muon.muon(
        schedule, weight_decay=cfg.weight_decay, rules=rules, adamw_learning_rate=adamw_lr, b1=cfg.b1, b2=cfg.b2,
        eps=cfg.eps, adamw_weight_decay=cfg.weight_decay, adamw_decay_mask=adamw_decay_mask,
        beta=cfg.muon_beta, nesterov=cfg.muon_nesterov, method=cfg.muon_method,
        coeffs=cfg.muon_coeffs if cfg.muon_method == "polar_express" else None,
        steps=cfg.muon_steps, scaling=cfg.muon_scaling, dtype=jnp.dtype(cfg.muon_dtype),
        algorithm=cfg.muon_algorithm, per_head=cfg.muon_per_head, mesh="context",
        **({} if cfg.muon_restarts == "robust" else dict(max_segment_gain=float("inf"), max_segment_steps=10**6)))


def partition_rules(cfg: OptimizerConfig) -> tuple:
    """The config's extra rules, then the defaults."""
    return tuple(tuple(r) for r in cfg.partition_rules) + partition.DEFAULT_RULES
