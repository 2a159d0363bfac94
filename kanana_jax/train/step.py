"""The train state and the one jitted train step shared by all stages."""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import optax

from kanana_jax.config import ExperimentConfig
from kanana_jax.train import hooks


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_state(model, optimizer, rng, cfg: ExperimentConfig) -> TrainState:
    """Fresh parameters (unboxed from their logical-axis metadata) and optimizer state at step 0."""
    tokens = jnp.zeros((1, min(cfg.data.seq_len, 8)), jnp.int32)
    params = flax.linen.unbox(model.init(rng, tokens)["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def train_step(state: TrainState, batch, *, model, optimizer, stage, cfg: ExperimentConfig):
    """One update: loss and grads, optimizer, post-update rules (router bias, MuonClip), metrics."""
    grad_fn = jax.value_and_grad(functools.partial(stage.loss_fn, model), has_aux=True)
    (loss, aux), grads = grad_fn(state.params, batch, cfg)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, hook_metrics = hooks.post_update(params, aux["intermediates"], cfg)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux["metrics"], **hook_metrics,
               **hooks.routing_metrics(aux["intermediates"])}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model, stage, cfg: ExperimentConfig):
    return stage.eval_fn(model, params, batch, cfg)
