"""`train.init_from`: start a run from another run's parameters (or an imported HF checkpoint).

    train.init_from = WORKDIR          the newest checkpoint of WORKDIR that restores and verifies
                    = WORKDIR:STEP     that step
                    = hf:DIR           a HuggingFace Kanana-2 / DeepSeek-V3 directory (config.json + safetensors)

Only the parameters are read, straight onto this run's mesh and shardings (dtypes are cast to this run's
param_dtype); the optimizer state, the data position and the step start fresh. They land in the new stage's
policy subtree (`Stage.policy_path`: a reward model's backbone, say); leaves outside it keep their fresh init.
A model that does not match names the first differing config key and parameter. The loop records the
provenance in config.json and the first metrics row; a run that has checkpoints of its own resumes
from those and never reads the source again (except to rebuild a stage's `extra`, see Stage.rebuild_extra).
"""
from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np

from kanana_jax import config as config_lib
from kanana_jax.config import ConfigError, ExperimentConfig
from kanana_jax.train.checkpoint import CheckpointError, CheckpointMismatchError, Checkpointer, state_checksums

log = logging.getLogger("kanana_jax.train")
KEY = "train.init_from"


@dataclasses.dataclass(frozen=True)
class InitSource:
    kind: str            # 'workdir' | 'hf'
    path: str            # absolute path (or URL) of the workdir / HF directory
    step: int | None     # requested step (workdir only); None = newest usable


def parse(spec: str) -> InitSource:
    """'hf:DIR' | 'WORKDIR' | 'WORKDIR:STEP' -> InitSource; a bad spec is a ConfigError naming the key."""
    if not spec:
        raise ConfigError(f"config key '{KEY}' is empty")
    if spec.startswith("hf:"):
        path = spec[3:]
        if not path:
            raise ConfigError(f"config key '{KEY}': 'hf:' needs a directory, e.g. hf:/ckpt/kanana-2-30b-a3b-base")
        return InitSource("hf", _absolute(path), None)
    head, sep, tail = spec.rpartition(":")
    if sep and tail.isdigit() and head:
        return InitSource("workdir", _absolute(head), int(tail))
    return InitSource("workdir", _absolute(spec), None)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


@dataclasses.dataclass(frozen=True)
class Loaded:
    params: object        # the policy params, laid out like the requested abstract tree
    provenance: dict      # {'init_from', 'kind', 'path', 'step', 'checksum'}


def params_checksum(params) -> str:
    """Sum mod 2**32 of the per-leaf bit sums of a parameter tree, as 8 hex digits (same on any mesh)."""
    sums = np.asarray(state_checksums(params), np.uint64)
    return f"{int(sums.sum()) % (1 << 32):08x}"


def read_source_config(workdir: str) -> ExperimentConfig:
    """The validated config a run saved in WORKDIR/config.json; FileNotFoundError names the path."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{KEY}: {path} does not exist: expected a run directory written by `kanana-jax run`")
    return config_lib.read_run_config(path)


def _model_mismatch(ours, theirs) -> str | None:
    """'model.KEY (this run X, source Y)' for the first differing architecture key, else None."""
    from kanana_jax.convert.hf_config import architecture_mismatch
    diff = architecture_mismatch(ours, theirs)
    if not diff:
        return None
    key = sorted(diff)[0]
    more = f" (and {len(diff) - 1} more: {', '.join(sorted(diff)[1:4])})" if len(diff) > 1 else ""
    return f"model.{key} (this run {diff[key][0]!r}, source {diff[key][1]!r}){more}"


def _from_workdir(source: InitSource, cfg: ExperimentConfig, abstract_policy) -> Loaded:
    from kanana_jax.train.stages import DRIVERS, get_stage
    src_cfg = read_source_config(source.path)
    while src_cfg.train.stage in DRIVERS:   # a driver run (rounds, a pipeline): its final sub-run holds the policy
        final = DRIVERS[src_cfg.train.stage].final_run(src_cfg, source.path)
        log.info("%s: %s is a %s run; its final policy is in %s", KEY, source.path, src_cfg.train.stage, final)
        source = dataclasses.replace(source, path=final)
        src_cfg = read_source_config(source.path)
    mismatch = _model_mismatch(cfg.model, src_cfg.model)
    prefix = ("params",) + get_stage(src_cfg.train.stage).policy_of(src_cfg)
    checkpointer = Checkpointer(os.path.join(source.path, "checkpoints"), keep=10 ** 6, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"{KEY}: no committed checkpoint under {checkpointer.directory}")
        if source.step is not None and source.step not in steps:
            raise FileNotFoundError(f"{KEY}: {source.path} has no checkpoint for step {source.step}; steps: {steps}")
        candidates = [source.step] if source.step is not None else sorted(steps, reverse=True)
        errors = []
        for step in candidates:
            try:
                params = checkpointer.restore_params(step, abstract_policy, prefix)
            except CheckpointError as e:
                if isinstance(e, CheckpointMismatchError):
                    first = e.cause.split("\n")[1].strip() if "\n" in e.cause else e.cause
                    raise ConfigError(f"config key '{KEY}': the model of {source.path} does not match this run's"
                                      f"{': ' + mismatch if mismatch else ''}; first differing parameter: "
                                      f"{first}") from e
                if source.step is not None:
                    raise
                errors.append(e)
                log.warning("%s: checkpoint step %d of %s is not usable: %s", KEY, step, source.path, e.cause)
                continue
            return Loaded(params, {"init_from": f"{source.path}:{step}", "kind": "workdir", "path": source.path,
                                   "step": int(step), "stage": src_cfg.train.stage,
                                   "checksum": params_checksum(params)})
        raise errors[0]
    finally:
        checkpointer.close()


def _from_hf(source: InitSource, cfg: ExperimentConfig, abstract_policy) -> Loaded:
    from kanana_jax.convert import hf_config
    from kanana_jax.convert.hf_import import import_params
    from kanana_jax.convert.orbax_hf import check_architecture
    from kanana_jax.convert.safetensors_io import SafetensorsCheckpoint
    hf = hf_config.read_hf_config(source.path)
    try:
        check_architecture(cfg, hf)
    except hf_config.HFConfigError as e:
        raise ConfigError(f"config key '{KEY}': {source.path}: {e}") from e
    method = hf.get("topk_method", "noaux_tc" if hf.get("scoring_func", "sigmoid") == "sigmoid" else "greedy")
    shardings = jax.tree.map(lambda s: s.sharding, abstract_policy)
    params = import_params(SafetensorsCheckpoint(source.path), cfg.model, interleaved=hf_config.rope_interleaved(hf),
                           shardings=shardings, allow_missing_bias=method != "noaux_tc")
    params = jax.tree.map(lambda x, s: x.astype(s.dtype) if x.dtype != s.dtype else x,
                          _select_like(params, abstract_policy), abstract_policy)
    return Loaded(params, {"init_from": f"hf:{source.path}", "kind": "hf", "path": source.path, "step": None,
                           "stage": None, "checksum": params_checksum(params)})


def _select_like(tree, like):
    """The part of nested dict `tree` that `like` has (e.g. a language model's params without the LM head, for a
    reward model's backbone)."""
    if not isinstance(like, dict):
        return tree
    return {k: _select_like(tree[k], v) for k, v in like.items()}


def load(spec: str, cfg: ExperimentConfig, abstract_policy) -> Loaded:
    """The parameters `spec` names, laid out like `abstract_policy` (ShapeDtypeStructs with shardings)."""
    source = parse(spec)
    if source.kind == "hf":
        return _from_hf(source, cfg, abstract_policy)
    return _from_workdir(source, cfg, abstract_policy)
