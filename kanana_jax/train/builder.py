"""Everything a run compiles, built once from a validated config: model, optimizer, mesh, shardings and the
jitted init / train / eval functions. The training loop, ahead-of-time TPU compilation and the benchmarks
all use this, so they compile the same step."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh

from kanana_jax import sharding
from kanana_jax.config import ExperimentConfig
from kanana_jax.optim.factory import make_optimizer
from kanana_jax.train import step as step_lib
from kanana_jax.train.stages import Stage, get_stage


@dataclasses.dataclass(frozen=True)
class Trainer:
    cfg: ExperimentConfig
    model: nn.Module
    stage: Stage
    optimizer: Any
    schedule: Callable
    mesh: Mesh
    rules: list
    state_sharding: step_lib.TrainState
    batch_spec: dict            # field -> BatchField (global shape, dtype), from the stage
    batch_sharding: dict        # field -> NamedSharding (rows over the batch mesh axes)
    init: Callable              # rng -> TrainState (sharded), fresh params
    init_params: Callable       # rng -> fresh params alone (sharded; the same values as init(rng).params)
    state_from_params: Callable  # (params, rng) -> TrainState at step 0 around given params (train.init_from)
    make_extra: Callable        # (initial params, rng) -> the stage's extra state (Stage.rebuild_extra)
    train_step: Callable        # (TrainState, batch) -> (TrainState, metrics); donates the state
    eval_step: Callable         # (params, extra, batch) -> metrics

    @property
    def batch_rows(self) -> int:
        """Rows of one global batch (its leading axis: sequences, pairs, or RL prompts), what the batch mesh axes
        and microbatching split."""
        return next(iter(self.batch_spec.values())).shape[0]

    def abstract_batch(self) -> dict:
        """ShapeDtypeStructs (with shardings) of one global batch, for AOT lowering."""
        return {k: jax.ShapeDtypeStruct(f.shape, f.dtype, sharding=self.batch_sharding[k])
                for k, f in self.batch_spec.items()}

    def context(self):
        """The mesh + logical-rules context every call of the jitted functions must run under."""
        return _Context(self.mesh, self.rules)

    def abstract_state(self):
        """ShapeDtypeStructs (with shardings) of the train state, for restores and AOT lowering."""
        with self.context():
            shapes = jax.eval_shape(self.init, jax.random.PRNGKey(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_sharding)


class _Context:
    def __init__(self, mesh, rules):
        self.mesh, self.rules, self._mesh_ctx, self._rules_ctx = mesh, rules, None, None

    def __enter__(self):
        # the mesh that expert parallelism and Muon's sharded update find (sharding.context_mesh); not
        # jax.set_mesh, which would also switch on flax's logical activation constraints (off so far)
        self._mesh_ctx = sharding.use_mesh(self.mesh)
        self._mesh_ctx.__enter__()
        self._rules_ctx = nn.logical_axis_rules(self.rules)
        self._rules_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._rules_ctx.__exit__(*exc)
        self._mesh_ctx.__exit__(*exc)


def build_trainer(cfg: ExperimentConfig, devices=None, stage: Stage | None = None) -> Trainer:
    """Builds the stage's model, the optimizer, mesh over `devices` (default: all), shardings and jitted step
    functions. `stage` defaults to the registered stage named by train.stage."""
    stage = stage or get_stage(cfg.train.stage)
    model = stage.make_model(cfg)
    optimizer, schedule = make_optimizer(cfg.optimizer, cfg.train.steps)
    mesh, rules = sharding.make_mesh(cfg.mesh, devices), sharding.logical_rules(cfg.mesh.rules)
    with _Context(mesh, rules):
        state_sharding = step_lib.state_shardings(model, optimizer, stage, cfg, mesh, rules)
    batch_spec = stage.batch_spec(cfg)
    batch_sharding = sharding.batch_shardings(batch_spec, mesh, rules)
    init = jax.jit(functools.partial(step_lib.init_state, model, optimizer, stage, cfg=cfg),
                   out_shardings=state_sharding)
    init_params = jax.jit(functools.partial(step_lib.init_params, model, cfg=cfg), out_shardings=state_sharding.params)
    state_from_params = jax.jit(functools.partial(step_lib.state_from_params, optimizer, stage, cfg=cfg,
                                                  model=model),
                                in_shardings=(state_sharding.params, None), out_shardings=state_sharding)
    make_extra = jax.jit(functools.partial(step_lib.make_extra, stage, cfg=cfg),
                         in_shardings=(state_sharding.params, None), out_shardings=state_sharding.extra)
    train_step = jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer, stage=stage,
                                           cfg=cfg), in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, None), donate_argnums=0)
    eval_step = jax.jit(functools.partial(step_lib.eval_step, model=model, stage=stage, cfg=cfg),
                        in_shardings=(state_sharding.params, state_sharding.extra, batch_sharding))
    return Trainer(cfg, model, stage, optimizer, schedule, mesh, rules, state_sharding, batch_spec, batch_sharding,
                   init, init_params, state_from_params, make_extra, train_step, eval_step)
