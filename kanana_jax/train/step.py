"""The train state and the one jitted train step shared by all stages."""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import optax

from kanana_jax import sharding
from kanana_jax.config import ExperimentConfig
from kanana_jax.train import hooks, nonfinite


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_params(model, rng, cfg: ExperimentConfig, boxed: bool = False):
    """Fresh parameters; `boxed` keeps flax's logical-axis metadata (for computing shardings)."""
    tokens = jnp.zeros((1, min(cfg.data.seq_len, 8)), jnp.int32)
    params = model.init(rng, tokens)["params"]
    return params if boxed else flax.linen.unbox(params)


def init_state(model, optimizer, rng, cfg: ExperimentConfig) -> TrainState:
    """Fresh parameters (width-scaled when hyperparameter transfer is on) and optimizer state at step 0."""
    params = init_params(model, rng, cfg)
    if cfg.optimizer.mup_base_width:
        from kanana_jax.optim import hparam_transfer, muon_factory
        params = hparam_transfer.scale_init(params, cfg.optimizer.mup_base_width,
                                            muon_factory.partition_rules(cfg.optimizer), cfg.optimizer.name)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def state_shardings(model, optimizer, cfg: ExperimentConfig, mesh, rules) -> TrainState:
    """NamedShardings of every leaf of the train state, from the parameters' logical axis names."""
    rng = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(functools.partial(init_params, model, cfg=cfg, boxed=True), rng)
    params_sharding = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = flax.linen.unbox(boxed)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    return TrainState(step=sharding.replicated(mesh), params=params_sharding,
                      opt_state=sharding.opt_state_shardings(abstract_opt, abstract_params, params_sharding, mesh))


def train_step(state: TrainState, batch, *, model, optimizer, stage, cfg: ExperimentConfig):
    """One update: loss and grads, optimizer, post-update rules (router bias, MuonClip), metrics; a step with a
    non-finite loss or gradient skips the update (nonfinite.apply_if_finite)."""
    grad_fn = jax.value_and_grad(functools.partial(stage.loss_fn, model), has_aux=True)
    (loss, aux), grads = grad_fn(state.params, batch, cfg)

    def update(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, hook_metrics = hooks.post_update(params, aux["intermediates"], cfg)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), hook_metrics

    new_state, update_metrics = nonfinite.apply_if_finite(state, loss, grads, update)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux["metrics"], **update_metrics,
               **hooks.routing_metrics(aux["intermediates"])}
    return new_state, metrics


def eval_step(params, batch, *, model, stage, cfg: ExperimentConfig):
    return stage.eval_fn(model, params, batch, cfg)
