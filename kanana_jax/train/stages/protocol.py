"""The stage protocol: what a training stage hands the one loop (`train/loop.py`) and the one step (`train/step.py`).

A stage is one module (`train/stages/<name>.py`) with these module-level names; `Stage.from_module` fills in the
defaults marked below, so a stage writes only what differs from next-token training.

  loss_fn(model, params, extra, batch, cfg, rng) -> (loss, aux)        required
      Pure and jit-able. `params` is the trained tree (the only thing differentiated), `extra` the stage's
      non-trained state (frozen reference params, a KL coefficient...; never differentiated, never seen by the
      optimizer), `batch` one microbatch of the fields in `batch_spec`, `rng` a key unique to (step, microbatch).
      `aux` holds:
        'metrics'        {name: scalar} means over this microbatch; combined over microbatches weighted by 'weight'
        'intermediates'  the policy Transformer's sown values ({} if none): MuonClip and the router-bias rule read
                         them, rooted like the policy's params (see `policy_path`)
        'weight'         optional scalar: this microbatch's share of the loss and gradient (default
                         metrics['tokens'], else 1); the whole-batch loss is the weight-averaged microbatch loss
        'sums'           optional {name: scalar}, summed over microbatches (e.g. per-source token counts)
        'ratios'         optional {name: (numerator, denominator)}, each summed over microbatches, reported as their
                         quotient (e.g. per-source loss = loss sum / token count; preference accuracy)
      metrics['tokens'] (when present) is the number of tokens the loss is taken over.
  eval_fn(model, params, extra, batch, cfg) -> {name: scalar}           required
  eval_metrics(cfg) -> {metric: weight}                                 required: how to average eval_fn's outputs
      over eval batches: sum(metric * weight) / sum(weight), with `weight` another key of eval_fn's output.
  batch_spec(cfg) -> {field: BatchField}                                required: global shapes and dtypes; every
      field's first axis is the batch (rows split over the data-parallel mesh axes and, in order, into
      microbatches), so the rows of a pair [B, 2, T] or of a group [B, G, T] always stay together.
  make_source(cfg, split, seed, shard_index, shard_count) -> iterator  required: this host's batches (dicts of
      numpy arrays, fields as in batch_spec with B = global rows / shard_count); resumable through
      `get_state()` / `set_state(state)` (a JSON-able dict saved in every checkpoint).
  make_eval_sources(cfg) -> {group: iterator}                           default {'': make_source(cfg, 'eval', ...)};
      each group's metrics are logged as '<metric>/<group>' (plus the overall '<metric>' when there are several).
  make_model(cfg) -> flax Module called as model(tokens_BxT, ...)       default: Transformer(cfg.model,
      fp8_recipe(cfg)) (fp8 matmuls per the `precision` section). With fp8 delayed scaling the model has an
      'fp8_meta' collection: loss_fn / eval_fn then get a step.ModelWithState whose .apply adds it (call
      model.apply({'params': p}, ...) as always), and loss_fn may differentiate at most one fp8 forward of the
      model per microbatch (stop-gradient'ed forwards, e.g. a frozen reference, are free); see model/fp8.py.
  init_extra(cfg, params, rng) -> dict                                  default: {} (`params` = the initial params,
      from `train.init_from` when set)
  policy_path: tuple of keys, or cfg -> tuple                          default (): where the policy Transformer's
      params sit inside `params` (a reward model's backbone, say); `train.init_from` loads into that subtree and
      the post-update hooks address it (`Stage.policy_of(cfg)` resolves it).
  init_params_from(cfg, fresh_params, loaded_policy) -> params         default: loaded_policy at policy_path in
      fresh_params (PPO also starts its critic's backbone from it); `fresh_params()` makes the fresh init, so a
      stage that keeps none of it (GRPO) compiles no init.
  evaluate(trainer, state) -> {name: value}                           default None: the loop averages eval_fn
      over make_eval_sources; a stage whose evaluation is not a batch function (RL: greedy rollouts on held-out
      prompts, verified) gives its own; eval_fn / eval_metrics are then optional.
  Sources may also define `bind(trainer, workdir)` (called once after creation), `observe(state)` (called with
  the live state before every batch: rollouts sample from it) and `metrics()` (host-side numbers logged with
  the step's, e.g. reward statistics).
  rebuild_extra: bool                                                   default False: True keeps `extra` out of
      checkpoints and rebuilds it with init_extra from the `train.init_from` params at every start.
  tokens_per_step(cfg) -> int                                           default global_batch_size * seq_len: the
      tokens the model processes per optimizer step (tokens/s)
  flops_per_step(cfg) -> float                                          default: 6N + attention FLOPs per token x
      tokens_per_step (MFU)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from kanana_jax.config import ExperimentConfig


@dataclasses.dataclass(frozen=True)
class BatchField:
    """One batch field: global shape (first axis = rows) and dtype."""
    shape: tuple[int, ...]
    dtype: Any

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if not self.shape:
            raise ValueError("a batch field needs a leading batch axis; got shape ()")

    def local(self, shard_count: int) -> tuple[int, ...]:
        """This host's shape: rows / shard_count."""
        return (self.shape[0] // shard_count,) + self.shape[1:]


def fp8_recipe(cfg: ExperimentConfig):
    """The model's fp8 recipe from the `precision` section (None for bf16 matmuls), checked on this backend:
    fp8 where it cannot run raises, naming the key (no silent bf16 fallback)."""
    from kanana_jax.model import fp8
    recipe = fp8.recipe_from(cfg.precision)
    fp8.check_supported(recipe, moe_impl=cfg.model.moe_impl)
    return recipe


def default_make_model(cfg: ExperimentConfig):
    from kanana_jax.model import Transformer
    return Transformer(cfg.model, fp8_recipe(cfg))


def default_init_extra(cfg: ExperimentConfig, params, rng) -> dict:
    return {}


def default_tokens_per_step(cfg: ExperimentConfig) -> int:
    return cfg.data.global_batch_size * cfg.data.seq_len


def default_flops_per_step_of(tokens_per_step: Callable):
    def flops_per_step(cfg: ExperimentConfig) -> float:
        from kanana_jax.model.flops import flops_per_token
        return flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step(cfg)
    return flops_per_step


REQUIRED = ("loss_fn", "batch_spec", "make_source")


@dataclasses.dataclass(frozen=True)
class Stage:
    """A stage module's protocol functions (see the module docstring), defaults filled in."""
    name: str
    loss_fn: Callable
    batch_spec: Callable
    make_source: Callable
    make_eval_sources: Callable
    eval_fn: Callable | None = None
    eval_metrics: Callable | None = None
    evaluate: Callable | None = None
    make_model: Callable = default_make_model
    init_extra: Callable = default_init_extra
    init_params_from: Callable | None = None
    policy_path: Any = ()
    rebuild_extra: bool = False
    tokens_per_step: Callable = default_tokens_per_step
    flops_per_step: Callable | None = None

    def __post_init__(self):
        if self.flops_per_step is None:
            object.__setattr__(self, "flops_per_step", default_flops_per_step_of(self.tokens_per_step))
        if self.evaluate is None and (self.eval_fn is None or self.eval_metrics is None):
            raise TypeError(f"stage {self.name!r} needs eval_fn and eval_metrics, or its own evaluate")

    def policy_of(self, cfg: ExperimentConfig) -> tuple:
        """The policy subtree's path for this config."""
        return tuple(self.policy_path(cfg) if callable(self.policy_path) else self.policy_path)

    def start_params(self, cfg: ExperimentConfig, fresh_params: Callable, loaded_policy):
        """The step-0 params of a run started from `train.init_from` (see init_params_from); `fresh_params()`
        returns a fresh init (called only when some of it is kept)."""
        if self.init_params_from is not None:
            return self.init_params_from(cfg, fresh_params, loaded_policy)
        return replace_subtree(fresh_params(), self.policy_of(cfg), loaded_policy)

    @classmethod
    def from_module(cls, name: str, module) -> "Stage":
        missing = [f for f in REQUIRED if not hasattr(module, f)]
        if missing:
            raise TypeError(f"stage module {module.__name__} lacks {missing} (see kanana_jax/train/stages/protocol.py)")
        kwargs = {f.name: getattr(module, f.name) for f in dataclasses.fields(cls)
                  if f.name != "name" and hasattr(module, f.name)}
        if "make_eval_sources" not in kwargs:
            make_source = module.make_source
            kwargs["make_eval_sources"] = (lambda cfg: {"": make_source(cfg, "eval", cfg.train.seed, 0, 1)})
        return cls(name=name, **kwargs)


def subtree(tree, path: tuple):
    """tree[path[0]][path[1]]...; KeyError names the missing key."""
    for key in path:
        if key not in tree:
            raise KeyError(f"no {'/'.join(path)} in the parameter tree (top-level keys: {sorted(tree)[:8]})")
        tree = tree[key]
    return tree


def replace_subtree(tree, path: tuple, value):
    """A copy of `tree` with tree[path...] set to `value` (dicts along the path are copied, not mutated)."""
    if not path:
        return value
    return {**tree, path[0]: replace_subtree(tree[path[0]], path[1:], value)}
