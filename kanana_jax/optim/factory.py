"""The optimizer factory: `make_optimizer(cfg, total_steps)` -> an optax chain used by every stage.

Parameters labelled 'frozen' (the router balancing bias, updated by its own rule in the train step) get zero
updates. Muon plugs in here through `OptimizerConfig.name`.
"""
from __future__ import annotations

import jax
import optax

from kanana_jax.config import OptimizerConfig
from kanana_jax.optim.schedules import make_schedule

FROZEN_SUFFIXES = ("router/bias",)


def param_path(path) -> str:
    """'moe_layers/moe/router/bias' from a jax tree path."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def frozen_labels(params):
    """'frozen' for parameters the optimizer must not touch, else 'trained'."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "frozen" if param_path(p).endswith(FROZEN_SUFFIXES) else "trained", params)


def _decay_mask(params):
    """Weight decay on matrices only (ndim >= 2 after the layer axis would still be >= 2)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def adamw(cfg: OptimizerConfig, schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask)


def make_optimizer(cfg: OptimizerConfig, total_steps: int):
    """(optax transformation, schedule) for the configured optimizer, with global-norm clipping first."""
    schedule = make_schedule(cfg, total_steps)
    if cfg.name == "adamw":
        inner = adamw(cfg, schedule)
    elif cfg.name == "muon":
        from kanana_jax.optim import muon_factory
        inner = muon_factory.make(cfg, schedule)
    else:
        raise ValueError(f"optimizer.name={cfg.name!r}; allowed values: 'adamw', 'muon'")
    if cfg.mup_base_width:
        from kanana_jax.optim import hparam_transfer, muon_factory
        inner = optax.chain(inner, hparam_transfer.scale_by_width(
            cfg.mup_base_width, muon_factory.partition_rules(cfg), optimizer=cfg.name, scaling=cfg.muon_scaling))
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    chain.append(optax.multi_transform({"trained": inner, "frozen": optax.set_to_zero()}, frozen_labels))
    return optax.chain(*chain), schedule
