"""The train state and the one jitted train step shared by all stages (stage protocol: train/stages/protocol.py)."""
from __future__ import annotations

import functools
import re

import flax
import jax
import jax.numpy as jnp
import optax

from kanana_jax import sharding
from kanana_jax.config import ExperimentConfig
from kanana_jax.model import fp8
from kanana_jax.model.layers import DTYPES
from kanana_jax.optim.partition import path_str
from kanana_jax.train import hooks, nonfinite


@flax.struct.dataclass
class TrainState:
    """step, the trained params, their optimizer state, the stage's non-trained `extra` state (frozen
    reference params, controllers): never differentiated, never given to the optimizer, and `model_state`: the
    model's non-param collections (`MODEL_STATE_COLLECTIONS`: fp8 delayed-scaling amax histories), {} for models
    without them, so every other run keeps its checkpoint tree. The step updates it outside the optimizer
    (`loss_and_grad_fn`)."""
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    extra: dict = flax.struct.field(default_factory=dict)
    model_state: dict = flax.struct.field(default_factory=dict)


# Variable collections besides 'params' that live in the train state: the fp8 amax histories (model/fp8.py).
MODEL_STATE_COLLECTIONS = (fp8.COLLECTION,)


class ModelWithState:
    """The model as a stage's loss_fn / eval_fn sees it when the train state carries `model_state` or the step
    made the weights' fp8 copies ahead: `.apply` adds the `model_state` collections to the variables it is given
    (read-only; the histories' new values come back as their cotangent, model/fp8.py), and `constants` (the
    'fp8_weights' collection, model/fp8_weights.py) only when it is applied to `constants_of`, the very params
    tree they were made from: a forward of other params (DPO's frozen reference) quantizes its own weights.
    Every other attribute is the model's."""

    def __init__(self, model, model_state: dict, constants: dict | None = None, constants_of=None):
        self.model, self.model_state = model, model_state
        self.constants, self.constants_of = constants or {}, constants_of

    def apply(self, variables, *args, **kwargs):
        extra = self.constants if self.constants and variables.get("params") is self.constants_of else {}
        return self.model.apply({**self.model_state, **extra, **variables}, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


_EXTRA_SALT = 0x657874  # the rng of init_extra, apart from the params' init rng


def init_params(model, rng, cfg: ExperimentConfig, boxed: bool = False):
    """Fresh parameters (width-scaled when hyperparameter transfer is on); `boxed` keeps flax's logical-axis
    metadata (for computing shardings)."""
    tokens = jnp.zeros((1, min(cfg.data.seq_len, 8)), jnp.int32)
    params = model.init(rng, tokens)["params"]
    if boxed:
        return params
    params = flax.linen.unbox(params)
    if cfg.optimizer.mup_base_width:
        from kanana_jax.optim import hparam_transfer, muon_factory
        params = hparam_transfer.scale_init(params, cfg.optimizer.mup_base_width,
                                            muon_factory.partition_rules(cfg.optimizer), cfg.optimizer.name)
    return params


def init_model_state(model, cfg: ExperimentConfig) -> dict:
    """The model's `MODEL_STATE_COLLECTIONS` at init ({} when it has none): zeros, as the fp8 history variables
    initialise (an empty history; the first step scales from the current amaxes)."""
    if model is None:
        return {}
    tokens = jax.ShapeDtypeStruct((1, min(cfg.data.seq_len, 8)), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)
    return {c: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), flax.core.unfreeze(shapes[c]))
            for c in MODEL_STATE_COLLECTIONS if c in shapes}


def make_extra(stage, params, rng, cfg: ExperimentConfig) -> dict:
    """The stage's extra state for initial params `params` (run rng `rng`)."""
    return stage.init_extra(cfg, params, jax.random.fold_in(rng, _EXTRA_SALT))


def state_from_params(optimizer, stage, params, rng, cfg: ExperimentConfig, model=None) -> TrainState:
    """The step-0 state around `params` (fresh or loaded by train.init_from): fresh optimizer state, the stage's
    extra state built from these params, the model's initial `model_state` (none without `model`)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      extra=make_extra(stage, params, rng, cfg), model_state=init_model_state(model, cfg))


def init_state(model, optimizer, stage, rng, cfg: ExperimentConfig) -> TrainState:
    """Fresh parameters, optimizer state, extra state and model state at step 0."""
    return state_from_params(optimizer, stage, init_params(model, rng, cfg), rng, cfg, model=model)


def state_shardings(model, optimizer, stage, cfg: ExperimentConfig, mesh, rules) -> TrainState:
    """NamedShardings of every leaf of the train state, from the parameters' logical axis names; optimizer and
    extra leaves follow the parameter whose path they end with (same shape), the rest is replicated."""
    rng = jax.random.PRNGKey(0)
    boxed = jax.eval_shape(functools.partial(init_params, model, cfg=cfg, boxed=True), rng)
    params_sharding = sharding.param_shardings(boxed, mesh, rules)
    abstract_params = flax.linen.unbox(boxed)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    abstract_extra = jax.eval_shape(functools.partial(stage.init_extra, cfg), abstract_params, rng)
    follow = functools.partial(sharding.opt_state_shardings, abstract_params=abstract_params,
                               params_sharding=params_sharding, mesh=mesh)
    model_state = jax.tree.map(lambda _: sharding.replicated(mesh), init_model_state(model, cfg))
    return TrainState(step=sharding.replicated(mesh), params=params_sharding, opt_state=follow(abstract_opt),
                      extra=follow(abstract_extra), model_state=model_state)


def microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...], microbatch i = rows i, i+n, i+2n, ...: each device's contiguous share of the
    batch stays on that device (when B/devices is a multiple of n), so the split moves no data."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows cannot be split into train.grad_accum_steps={n} "
                             "microbatches; use a divisor of data.global_batch_size")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def _reduced_by_max(path) -> bool:
    """Sown values combined over microbatches by max (attention max logits); the rest (expert loads) add up."""
    return "max_logits" in jax.tree_util.keystr(path)


def _combine_intermediates(a, b):
    """Sown values of two microbatches: max for attention max logits, sum for counts (expert loads)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x, y: jnp.maximum(x, y) if _reduced_by_max(path) else x + y, a, b)


# Weights the model reads only through `w.astype(model.dtype)` (attention projections, dense / shared / routed
# expert matrices); not the embedding (gathered in fp32, then cast), LM head (fp32 gradient), norms or router.
_READ_IN_COMPUTE_DTYPE = re.compile(r"(^|/)(attn/w[a-z_]*|mlp/w_(gate|up|down)|(experts|shared)/w_(gate|up|down))$")


def compute_dtype_copy(params, cfg: ExperimentConfig):
    """`params` with the weights that the model reads only through a cast to model.dtype cast up front, once per
    step instead of once per microbatch. Their gradients come out in model.dtype with the values the float32
    parameters would get (the cast's backward is only a convert), at half the bytes."""
    dt = DTYPES[cfg.model.dtype]
    if dt == DTYPES[cfg.model.param_dtype]:
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.astype(dt) if _READ_IN_COMPUTE_DTYPE.search(path_str(path)) else p, params)


def loss_and_grad_fn(stage, model, extra, cfg: ExperimentConfig, model_state=None, fp8_weights=None):
    """(params, batch, rng) -> ((loss, aux), grads) of the stage's loss; grads w.r.t. params only.

    With a non-empty `model_state` (fp8 delayed scaling) the stage gets a `ModelWithState` and the loss is also
    differentiated w.r.t. model_state: its "gradient" is the updated state (the fp8 ops' cotangent convention,
    model/fp8.py), returned as aux['model_state'], never part of grads. So a stage differentiates at most one
    fp8 forward of the model per microbatch (a stop-gradient'ed one, like DPO's reference, runs no backward).
    `fp8_weights`: the weights' fp8 copies made from the params this fn is called with (`fp8_weights_of`);
    the model reads them instead of quantizing in every call, never differentiated."""
    constants = {fp8.WEIGHTS: fp8_weights} if fp8_weights else {}
    if not model_state and not constants:
        return jax.value_and_grad(lambda p, b, r: stage.loss_fn(model, p, extra, b, cfg, r), has_aux=True)
    if not model_state:
        return jax.value_and_grad(lambda p, b, r: stage.loss_fn(ModelWithState(model, {}, constants, p), p, extra,
                                                                b, cfg, r), has_aux=True)
    loss = lambda p, ms, b, r: stage.loss_fn(ModelWithState(model, ms, constants, p), p, extra, b, cfg, r)
    value_and_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

    def grad_fn(params, batch, rng):
        (value, aux), (grads, new_model_state) = value_and_grads(params, model_state, batch, rng)
        return (value, {**aux, "model_state": new_model_state}), grads
    return grad_fn


def fp8_weights_of(params, model_state, cfg: ExperimentConfig) -> dict:
    """The fp8 copies of the weights the fp8 matmuls read (model/fp8_weights.py), made once for the step from
    `params` (cast to model.dtype as the sites cast them); {} without fp8 or with precision.fp8_prequantize off."""
    recipe = fp8.recipe_from(cfg.precision)
    if recipe is None or not cfg.precision.fp8_prequantize:
        return {}
    from kanana_jax.model import fp8_weights
    return fp8_weights.prequantize(jax.lax.stop_gradient(params), recipe, cfg.model,
                                   (model_state or {}).get(fp8.COLLECTION))


def microbatch_weight(aux):
    """A microbatch's share of the batch loss: aux['weight'], else its counted tokens, else 1."""
    if "weight" in aux:
        return aux["weight"].astype(jnp.float32)
    return aux["metrics"].get("tokens", jnp.ones((), jnp.float32)).astype(jnp.float32)


def finish_metrics(aux) -> dict:
    """The metrics of a step's aux: means as they are, sums as they are, ratios divided out."""
    ratios = {k: num / jnp.maximum(den, 1e-9) for k, (num, den) in aux.get("ratios", {}).items()}
    return {**aux["metrics"], **aux.get("sums", {}), **ratios}


def accumulate_gradients(grad_fn, params, batch, cfg: ExperimentConfig, rng, params_c=None):
    """(loss, aux, grads) of the whole batch from train.grad_accum_steps microbatches run in a lax.scan.

    `grad_fn(params, microbatch, rng)` as from `loss_and_grad_fn`, called with `params_c` (default
    `compute_dtype_copy(params, cfg)`, made once); microbatch i gets fold_in(rng, i). Each
    microbatch is weighted by `microbatch_weight` (its counted tokens for next-token stages), so the masked-mean
    LM loss and its gradient equal the full-batch ones; gradients accumulate in float32; the metric 'tokens' and
    aux 'sums' and 'ratios' parts are summed, the other metrics are weighted means; sown intermediates are combined
    by `_combine_intermediates` (MuonClip sees the max logit over the whole batch, the router bias the total load);
    aux 'model_state' (updated fp8 amax histories, see `loss_and_grad_fn`) by elementwise max, not weighted: every
    microbatch rolled the same old history, so the max holds the amax over the whole batch in its newest column.
    """
    n = cfg.train.grad_accum_steps
    mb = microbatches(batch, n)
    params_c = compute_dtype_copy(params, cfg) if params_c is None else params_c

    def one(mb_i, i):
        (loss, aux), grads = grad_fn(params_c, mb_i, jax.random.fold_in(rng, i))
        return microbatch_weight(aux), loss, aux, grads

    # Zero-initialized carry (max logits start at -inf): the microbatch body is traced and compiled once
    # (with train.grad_accum_first_outside, twice: microbatch 0 runs before the loop, from the same zeros).
    shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], mb), jnp.zeros((), jnp.int32))
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
    inter0 = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.full(s.shape, -jnp.inf if _reduced_by_max(path) else 0, s.dtype),
        shapes[2]["intermediates"])
    totals0 = {k: zeros(shapes[2].get(k, {})) for k in ("sums", "ratios")}
    if "tokens" in shapes[2]["metrics"]:
        totals0["tokens"] = jnp.zeros((), jnp.float32)
    if "model_state" in shapes[2]:  # amaxes are >= 0: zeros are the identity of the max
        totals0["model_state"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2]["model_state"])
    carry0 = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros(shapes[2]["metrics"]), inter0,
              zeros(shapes[3]), totals0)
    weigh = lambda w, tree: jax.tree.map(lambda x: w * x.astype(jnp.float32), tree)
    add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)

    def body(carry, xs):
        w_sum, loss_sum, metrics_sum, inter, grads_sum, totals = carry
        w, loss, aux, grads = one(*xs)
        totals = {**totals, **{k: add(totals[k], aux.get(k, {})) for k in ("sums", "ratios")}}
        if "tokens" in aux["metrics"]:  # counted tokens add up, whatever the microbatch weights
            totals["tokens"] = totals["tokens"] + aux["metrics"]["tokens"].astype(jnp.float32)
        if "model_state" in aux:
            totals["model_state"] = jax.tree.map(jnp.maximum, totals["model_state"], aux["model_state"])
        return (w_sum + w, loss_sum + w * loss, add(metrics_sum, weigh(w, aux["metrics"])),
                _combine_intermediates(inter, aux["intermediates"]), add(grads_sum, weigh(w, grads)), totals), None

    xs = (mb, jnp.arange(n, dtype=jnp.int32))
    if cfg.train.grad_accum_first_outside:  # 0 + x folds to x: microbatch 0's values become the initial carry
        carry0, _ = body(carry0, jax.tree.map(lambda x: x[0], xs))
        xs = jax.tree.map(lambda x: x[1:], xs)
    carry, _ = jax.lax.scan(body, carry0, xs)
    w_sum, loss_sum, metrics_sum, inter, grads_sum, totals = carry
    inv = 1.0 / jnp.maximum(w_sum, 1e-9)
    metrics = {k: (totals["tokens"] if k == "tokens" else v * inv) for k, v in metrics_sum.items()}
    grads = jax.tree.map(lambda g, p: (g * inv).astype(p.dtype), grads_sum, params)
    aux = {"metrics": metrics, "intermediates": inter, "sums": totals["sums"], "ratios": totals["ratios"]}
    if "model_state" in totals:
        aux["model_state"] = totals["model_state"]
    return loss_sum * inv, aux, grads


def step_rng(cfg: ExperimentConfig, step):
    """The key of train step `step` (0-based): a function of train.seed and the step only, so a resumed run
    draws the same keys."""
    return jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), step)


def train_step(state: TrainState, batch, *, model, optimizer, stage, cfg: ExperimentConfig):
    """One update: loss and grads, optimizer, post-update rules (router bias, MuonClip) on the policy subtree,
    the model state (fp8 amax histories) from aux['model_state'], metrics; a step with a non-finite loss or
    gradient skips the update (nonfinite.apply_if_finite), keeping the old model state too."""
    rng = step_rng(cfg, state.step)
    params_in = state.params if cfg.train.grad_accum_steps == 1 else compute_dtype_copy(state.params, cfg)
    # fp8: the weights' fp8 copies once per step, before the microbatch loop (the grads go to params_in)
    grad_fn = loss_and_grad_fn(stage, model, state.extra, cfg, state.model_state,
                               fp8_weights_of(params_in, state.model_state, cfg))
    if cfg.train.grad_accum_steps == 1:
        (loss, aux), grads = grad_fn(params_in, batch, rng)
    else:
        loss, aux, grads = accumulate_gradients(grad_fn, state.params, batch, cfg, rng, params_c=params_in)

    def update(state):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params, hook_metrics = hooks.post_update(params, aux["intermediates"], cfg, stage.policy_of(cfg))
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if "model_state" in aux:
            new = new.replace(model_state=aux["model_state"])
        return new, hook_metrics

    new_state, update_metrics = nonfinite.apply_if_finite(state, loss, grads, update)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **finish_metrics(aux), **update_metrics,
               **hooks.routing_metrics(aux["intermediates"])}
    if fp8.COLLECTION in aux.get("model_state", {}):
        metrics.update(fp8.summarize(aux["model_state"][fp8.COLLECTION], state.model_state[fp8.COLLECTION],
                                     fp8.recipe_from(cfg.precision)))
    return new_state, metrics


def eval_step(params, extra, batch, *, model, stage, cfg: ExperimentConfig):
    """The stage's eval metrics; a model with `model_state` (fp8 delayed scaling) evaluates with its initial
    (empty) state: fp8 forwards scale from the current amaxes (model/fp8.py)."""
    model_state = init_model_state(model, cfg)
    if model_state:
        model = ModelWithState(model, model_state)
    return stage.eval_fn(model, params, extra, batch, cfg)
