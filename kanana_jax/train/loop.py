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
from kanana_jax.data.tokenizer import make_tokenizer
from kanana_jax.train import init_from, run_record
from kanana_jax.train.builder import Trainer, build_trainer
from kanana_jax.train.checkpoint import Checkpointer, leaves_by_path
from kanana_jax.train.metrics import MetricsWriter, peak_flops_per_device
from kanana_jax.train.nonfinite import NonFinitePolicy, poison_batch
from kanana_jax.train.preemption import PreemptionWatcher
from kanana_jax.train.stages import DRIVERS
from kanana_jax.train.stages.protocol import subtree

log = logging.getLogger("kanana_jax.train")


def check_vocab(cfg: ExperimentConfig, tokenizer):
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise config_lib.ConfigError(
            f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} ids from data.tokenizer={cfg.data.tokenizer!r}); raise it to at least that")


def evaluate(trainer: Trainer, state) -> dict:
    """The stage's eval metrics over the first `train.eval_batches` batches of each held-out group, averaged as
    `stage.eval_metrics` says (e.g. token-weighted); a group's metrics are named '<metric>/<group>', and with
    several groups the overall '<metric>' is the same average over all of them. A stage with its own
    `evaluate` (RL: verified greedy rollouts) is asked instead."""
    cfg, stage = trainer.cfg, trainer.stage
    if stage.evaluate is not None:
        return stage.evaluate(trainer, state)
    weights = stage.eval_metrics(cfg)
    groups = stage.make_eval_sources(cfg)
    overall = {m: [0.0, 0.0] for m in weights}
    out = {}
    for group, it in groups.items():
        sums = {m: [0.0, 0.0] for m in weights}
        for _, batch in zip(range(cfg.train.eval_batches), it):
            res = jax.device_get(trainer.eval_step(state.params, state.extra,
                                                   sharding.put_batch(batch, trainer.batch_sharding)))
            for m, w in weights.items():
                sums[m][0] += float(res[m]) * float(res[w])
                sums[m][1] += float(res[w])
        for m, (total, weight) in sums.items():
            out[f"{m}/{group}" if group else m] = total / max(weight, 1.0)
            overall[m][0] += total
            overall[m][1] += weight
    if len(groups) > 1:
        out.update({m: total / max(weight, 1.0) for m, (total, weight) in overall.items()})
    return out


def run(cfg: ExperimentConfig, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains `cfg` in `workdir`, resuming from its newest readable checkpoint (else from `train.init_from`, else
    fresh); returns the last logged metrics. `stop_after` ends this invocation after that step (with a
    checkpoint). SIGTERM or SIGINT (or a multi-host preemption notice) saves a checkpoint at the next step boundary
    and returns with 'preempted_at_step' set. Before anything is written, a relaunch's config is compared with the
    one in WORKDIR/config.json (`run_record.check_resume`: unusable checkpoint -> ResumeConfigError). A run whose
    newest checkpoint is at train.steps or later trains nothing and returns its last logged metrics with
    'already_finished_at_step'."""
    run_record.prepare_workdir(workdir)
    provenance, history = run_record.check_resume(workdir, cfg)
    run_record.write_record(workdir, cfg, provenance, history, jax.process_index())
    driver = DRIVERS.get(cfg.train.stage)
    if driver is not None:   # a stage made of rounds of other stages (each trained by this loop in a sub-workdir)
        return driver.run(cfg, workdir, stop_after=stop_after)
    steps = run_record.committed_steps(workdir)
    if steps and steps[-1] >= cfg.train.steps:
        log.info("already finished at step %d (train.steps=%d): nothing to train; relaunch with --set "
                 "train.steps=N (N > %d) to train longer", steps[-1], cfg.train.steps, steps[-1])
        return dict(last_logged_row(workdir), already_finished_at_step=steps[-1])
    check_vocab(cfg, make_tokenizer(cfg.data.tokenizer))
    trainer = build_trainer(cfg)
    sharding.check_batch_divides(trainer.batch_rows, trainer.mesh, trainer.rules, cfg.train.grad_accum_steps)
    with trainer.context():
        return _train(trainer, workdir, stop_after)


def last_logged_row(workdir: str) -> dict:
    """The last complete row of WORKDIR/metrics.jsonl ({} if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    row = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
    return row


def initial_params(trainer: Trainer, rng):
    """(step-0 params, provenance or None): the `train.init_from` source's params in the stage's policy subtree
    (the rest freshly initialized), or a fresh init."""
    cfg, stage = trainer.cfg, trainer.stage
    path = stage.policy_of(cfg)
    if not cfg.train.init_from:
        return trainer.init_params(rng), None
    abstract = trainer.abstract_state().params
    loaded = init_from.load(cfg.train.init_from, cfg, subtree(abstract, path))
    if not path and stage.init_params_from is None:
        return loaded.params, loaded.provenance
    return stage.start_params(cfg, lambda: trainer.init_params(rng), loaded.params), loaded.provenance


def _start(trainer: Trainer, checkpointer: Checkpointer, data, workdir: str):
    """(state, loop counters, provenance of a fresh init_from start or None): resumed from this run's newest
    usable checkpoint, else built from `initial_params`."""
    cfg, stage = trainer.cfg, trainer.stage
    rng = jax.random.PRNGKey(cfg.train.seed)
    abstract = trainer.abstract_state()
    saved = abstract.replace(extra={}) if stage.rebuild_extra else abstract
    restored = checkpointer.restore_latest(saved, fallback=cfg.train.checkpoint_fallback)
    if restored is None:
        if not cfg.train.init_from:
            return trainer.init(rng), {}, None
        params, provenance = initial_params(trainer, rng)
        if provenance:
            history = (run_record.read_record(workdir) or {}).get("history")
            run_record.write_record(workdir, cfg, provenance, history, jax.process_index())
            log.info("initialized from %s (step %s, params checksum %s); fresh optimizer state and data position",
                     provenance["path"], provenance["step"], provenance["checksum"])
        return trainer.state_from_params(params, rng), {}, provenance
    state = restored.state
    if stage.rebuild_extra:
        state = state.replace(extra=trainer.make_extra(initial_params(trainer, rng)[0], rng))
    data.set_state(restored.data_state)
    log.info("resumed from %s at step %d", checkpointer.step_path(restored.step), restored.step)
    return state, restored.loop_state, None


def _provenance_metrics(provenance: dict) -> dict:
    return {"init_from": provenance["init_from"], "init_from_step": provenance["step"] if provenance["step"]
            is not None else -1, "init_from_checksum": int(provenance["checksum"], 16)}


def _data_metrics(data) -> dict:
    """Host-side numbers of the data source: the realized token share of each mixture source over the run so far
    ('mixture_share/<name>'), and whatever a source's `metrics()` reports (rollout rewards, timings)."""
    out = dict(data.metrics()) if hasattr(data, "metrics") else {}
    counts = data.stats().get("packed_tokens_per_source", {}) if hasattr(data, "stats") else {}
    total = sum(counts.values())
    if len(counts) >= 2 and total:
        out.update({f"mixture_share/{name}": n / total for name, n in counts.items()})
    return out


def _train(trainer: Trainer, workdir: str, stop_after: int | None) -> dict:
    cfg, stage = trainer.cfg, trainer.stage
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.train.keep_checkpoints,
                                async_save=cfg.train.async_checkpoint)
    data = stage.make_source(cfg, "train", cfg.train.seed, jax.process_index(), jax.process_count())
    if hasattr(data, "bind"):    # e.g. a rollout source: the model it samples with, the workdir it logs to
        data.bind(trainer, workdir)
    state, counters, provenance = _start(trainer, checkpointer, data, workdir)
    saveable = (lambda st: st.replace(extra={})) if stage.rebuild_extra else (lambda st: st)
    start = int(state.step)
    param_paths = list(leaves_by_path(state.params))
    nonfinite = NonFinitePolicy(cfg.train, param_paths, counters)
    poison = set(cfg.train.debug_poison_steps)

    writer = MetricsWriter(workdir, resume_step=start, tensorboard=cfg.train.tensorboard,
                           progress_bar=cfg.train.progress_bar, total_steps=cfg.train.steps)
    if provenance is None and start and not writer.rows_kept:   # resumed before its first row: log it then
        saved = (run_record.read_record(workdir) or {}).get("provenance") or {}
        provenance = saved if {"init_from", "step", "checksum"} <= set(saved) else None   # not e.g. a merge's
    peak = peak_flops_per_device(cfg.train.peak_tflops_per_device) * jax.device_count()
    tokens_per_step, flops_per_step = stage.tokens_per_step(cfg), stage.flops_per_step(cfg)
    last_row, window_start, window_steps = {}, time.perf_counter(), 0
    end = cfg.train.steps if stop_after is None else min(stop_after, cfg.train.steps)
    pending = None  # (step, metrics) not yet checked for non-finite values: read one step late, not to stall
    if start < end:
        log.info("compiling the train step…")
        compile_start = time.perf_counter()
    try:
        with PreemptionWatcher() as preemption:
            for step in range(start, end):
                done = step + 1
                if hasattr(data, "observe"):   # rollouts sample from the live params
                    data.observe(state)
                batch = next(data)
                if done in poison:
                    batch = poison_batch(batch)
                state, metrics = trainer.train_step(state, sharding.put_batch(batch, trainer.batch_sharding))
                if step == start:  # the first call compiles; the progress bar's rate and ETA start after it
                    jax.block_until_ready(metrics)
                    log.info("compiled the train step in %.1f s (first step included); training steps %d-%d of %d",
                             time.perf_counter() - compile_start, start + 1, end, cfg.train.steps)
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
                    metrics.update(learning_rate=trainer.schedule(step),
                                   tokens_per_s=window_steps * tokens_per_step / elapsed,
                                   mfu=window_steps * flops_per_step / elapsed / peak,
                                   skipped_updates=nonfinite.skipped, **_data_metrics(data))
                    if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                        eval_start = time.perf_counter()
                        metrics.update(evaluate(trainer, state))
                        metrics["time/eval_s"] = time.perf_counter() - eval_start
                    if provenance is not None:
                        metrics.update(_provenance_metrics(provenance))
                        provenance = None
                    last_row = writer.write(done, metrics)
                    window_start, window_steps = time.perf_counter(), 0
                if save_now or preempted:
                    checkpointer.save(done, saveable(state), data.get_state(), nonfinite.counters())
                if preempted:
                    log.warning("%s at step %d: saved checkpoint %s; exiting. Relaunch the same command to resume.",
                                preemption.reason, done, checkpointer.step_path(done))
                    last_row = dict(last_row, preempted_at_step=done, preempted_by=preemption.reason)
                    break
    finally:  # an error still lets an in-flight async save commit
        checkpointer.close()
        writer.close()
    return last_row
