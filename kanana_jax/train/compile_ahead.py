"""Compiling a run's jitted functions before its loop needs them, from shapes alone, so that the loop finds them in
jax's persistent compilation cache instead of compiling them itself.

The pipeline (train/stages/pipeline.py, `pipeline.compile_ahead`) does this for every later stage on one background
thread while the current stage trains: XLA compiles outside the GIL, so on a machine whose cores the loop leaves
partly idle (a 2-core CPU running the tiny recipe: most of each stage's wall time is compiling) the next stage's
train step is ready when it starts. What is compiled is what `loop.run` builds from the same config
(`builder.build_trainer`): the train step, the eval step when the run evaluates, and the start of the state
(`state_from_params` for a train.init_from start, plus the fresh init where the stage keeps part of it; `init`
otherwise). A driver stage (rounds of other stages) lists the runs it will train through its `trainings(cfg,
workdir)`. The executables are the loop's own only if the lowered programs are identical: same config, shapes and
shardings (the persistent cache is keyed by the program); a miss costs the time compiled here, nothing else.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import time

import jax

from kanana_jax.config import ExperimentConfig

log = logging.getLogger("kanana_jax.train")


def trainings(cfg: ExperimentConfig, workdir: str) -> list[ExperimentConfig]:
    """The configs `loop.run(cfg, workdir)` will build a trainer for, as far as they are known before it runs."""
    from kanana_jax.train.stages import DRIVERS
    driver = DRIVERS.get(cfg.train.stage)
    if driver is None:
        return [cfg]
    listed = getattr(driver, "trainings", None)
    return [] if listed is None else list(listed(cfg, workdir))


def compile_run(cfg: ExperimentConfig) -> list[str]:
    """Compiles the jitted functions `loop.run(cfg, ...)` calls (module docstring); returns their names."""
    from kanana_jax.train.builder import build_trainer
    trainer = build_trainer(cfg)
    stage, done = trainer.stage, []
    with trainer.context():
        state = trainer.abstract_state()
        rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
        trainer.train_step.lower(state, trainer.abstract_batch()).compile()
        done.append("train_step")
        if cfg.train.eval_every and stage.evaluate is None:
            trainer.eval_step.lower(state.params, state.extra, trainer.abstract_batch()).compile()
            done.append("eval_step")
        if not cfg.train.init_from:
            trainer.init.lower(rng).compile()
            done.append("init")
            return done
        if stage.policy_of(cfg):   # the fresh init around the loaded policy (e.g. a reward model's new head)
            trainer.init_params.lower(rng).compile()
            done.append("init_params")
        trainer.state_from_params.lower(state.params, rng).compile()
        done.append("state_from_params")
    return done


class CompileAhead:
    """One background thread compiling runs in the order given (`submit`); `wait(key)` blocks until that key's
    runs are compiled (so the loop does not compile them a second time beside it). Failures are logged and
    ignored: the loop then compiles (and reports any error) itself."""

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile_ahead")
        self._futures: dict[str, concurrent.futures.Future] = {}

    def submit(self, key: str, cfgs: list[ExperimentConfig]):
        if cfgs:
            self._futures[key] = self._pool.submit(self._compile, key, cfgs)

    @staticmethod
    def _compile(key: str, cfgs: list[ExperimentConfig]):
        start = time.perf_counter()
        try:
            names = [n for c in cfgs for n in compile_run(c)]
        except Exception as e:   # an optimization only: the stage's own run compiles and raises what it must
            log.warning("compile ahead of %s failed (%s: %s); the stage compiles its own functions", key,
                        type(e).__name__, e)
            return
        log.info("compiled ahead for %s: %s (%.1f s)", key, ", ".join(names), time.perf_counter() - start)

    def wait(self, key: str):
        future = self._futures.pop(key, None)
        if future is not None:
            future.result()

    def close(self):
        """Drops what has not started (a stopped pipeline); what is compiling finishes on its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def persistent_cache(directory: str):
    """jax's persistent compilation cache in `directory` for the block, unless one is configured already (then
    that one is used and left as it is)."""
    from jax._src import compilation_cache
    if jax.config.jax_compilation_cache_dir:
        yield jax.config.jax_compilation_cache_dir
        return
    os.makedirs(directory, exist_ok=True)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", directory)
    try:
        yield directory
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
