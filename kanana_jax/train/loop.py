"""The one training loop shared by every stage: init or resume, jitted steps, eval, checkpoints, metrics."""
from __future__ import annotations

import json
import logging
import os
import time

import jax

from kanana_jax import config as config_lib
from kanana_jax import sharding
from kanana_jax.config import ExperimentConfig
from kanana_jax.data import pipeline
from kanana_jax.data.tokenizer import make_tokenizer
from kanana_jax.model.flops import flops_per_token
from kanana_jax.train.builder import Trainer, build_trainer
from kanana_jax.train.checkpoint import Checkpointer, leaves_by_path
from kanana_jax.train.metrics import MetricsWriter, peak_flops_per_device
from kanana_jax.train.nonfinite import NonFinitePolicy, poison_batch
from kanana_jax.train.preemption import PreemptionWatcher

log = logging.getLogger("kanana_jax.train")


def check_vocab(cfg: ExperimentConfig, tokenizer):
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise config_lib.ConfigError(
            f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids from data.tokenizer={cfg.data.tokenizer!r}); raise it to at least that")


def evaluate(trainer: Trainer, params) -> dict:
    """Mean eval loss over the first `train.eval_batches` batches of the eval split (token-weighted)."""
    cfg = trainer.cfg
    it = pipeline.make_iterator(cfg.data, split="eval", seed=cfg.train.seed)
    total, tokens = 0.0, 0.0
    for _, batch in zip(range(cfg.train.eval_batches), it):
        out = jax.device_get(trainer.eval_step(params, sharding.put_batch(batch, trainer.batch_sharding)))
        total += float(out["eval_loss"]) * float(out["eval_tokens"])
        tokens += float(out["eval_tokens"])
    return {"eval_loss": total / max(tokens, 1.0)}


def run(cfg: ExperimentConfig, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains `cfg` in `workdir`, resuming from its newest readable checkpoint; returns the last logged metrics.
    `stop_after` ends this invocation after that step (with a checkpoint). SIGTERM (or a multi-host preemption
    notice) saves a checkpoint at the next step boundary and returns with 'preempted_at_step' set."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    tmp = f"{path}.tmp{jax.process_index()}"   # written aside and renamed: a kill never leaves half a file
    with open(tmp, "w") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=1)
    os.replace(tmp, path)
    check_vocab(cfg, make_tokenizer(cfg.data.tokenizer))
    trainer = build_trainer(cfg)
    sharding.check_batch_divides(cfg.data.global_batch_size, trainer.mesh, trainer.rules, cfg.train.grad_accum_steps)
    with trainer.context():
        return _train(trainer, workdir, stop_after)


def _train(trainer: Trainer, workdir: str, stop_after: int | None) -> dict:
    cfg = trainer.cfg
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                async_save=cfg.train.async_checkpoint)
    data = pipeline.make_iterator(cfg.data, split="train", seed=cfg.train.seed,
                                  shard_index=jax.process_index(), shard_count=jax.process_count())
    abstract = trainer.abstract_state()
    restored = checkpointer.restore_latest(abstract, fallback=cfg.train.checkpoint_fallback)
    if restored is None:
        state, counters = trainer.init(jax.random.PRNGKey(cfg.train.seed)), {}
    else:
        state, counters = restored.state, restored.loop_state
        data.set_state(restored.data_state)
        log.warning("resumed from %s at step %d", checkpointer.step_path(restored.step), restored.step)
    start = int(state.step)
    param_paths = list(leaves_by_path(abstract.params))
    nonfinite = NonFinitePolicy(cfg.train, param_paths, counters)
    poison = set(cfg.train.debug_poison_steps)

    writer = MetricsWriter(workdir, resume_step=start, tensorboard=cfg.train.tensorboard,
                           progress_bar=cfg.train.progress_bar, total_steps=cfg.train.steps)
    flops_token = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops_per_device(cfg.train.peak_tflops_per_device) * jax.device_count()
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    last_row, window_start, window_steps = {}, time.perf_counter(), 0
    end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
    pending = None  # (step, metrics) not yet checked for non-finite values: read one step late, not to stall
    try:
        with PreemptionWatcher() as preemption:
            for step in range(start, end):
                done = step + 1
                batch = next(data)
                if done in poison:
                    batch = poison_batch(batch)
                state, metrics = trainer.train_step(state, sharding.put_batch(batch, trainer.batch_sharding))
                if pending is not None:
                    nonfinite.check(*pending)
                pending = (done, metrics)
                window_steps += 1
                writer.advance()
                log_now = done % cfg.train.log_every == 0 or done == cfg.train.steps
                preempted = preemption.should_stop(done)
                save_now = (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or done == end
                if log_now or save_now or preempted:
                    nonfinite.check(*pending)
                    pending = None
                if log_now:
                    metrics = jax.device_get(metrics)
                    metrics.pop("first_nonfinite_grad_leaf", None)
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_steps * tokens_per_step / elapsed
                    metrics.update(learning_rate=trainer.schedule(step), tokens_per_s=tokens_per_s,
                                   mfu=tokens_per_s * flops_token / peak, skipped_updates=nonfinite.skipped)
                    if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                        metrics.update(evaluate(trainer, state.params))
                    last_row = writer.write(done, metrics)
                    window_start, window_steps = time.perf_counter(), 0
                if save_now or preempted:
                    checkpointer.save(done, state, data.get_state(), nonfinite.counters())
                if preempted:
                    log.warning("%s at step %d: saved checkpoint %s; exiting. Relaunch the same command to resume.",
                                preemption.reason, done, checkpointer.step_path(done))
                    last_row = dict(last_row, preempted_at_step=done)
                    break
    finally:  # an error still lets an in-flight async save commit
        checkpointer.close()
        writer.close()
    return last_row
