"""Our training checkpoints (orbax, WORKDIR/checkpoints/<step>) <-> HuggingFace DeepSeek-V3 checkpoints.

hf_to_workdir: imports a HF checkpoint straight into the trainer's parameter shardings, adds a fresh optimizer
state and writes it as step 0 of WORKDIR, so `kanana-jax run CONFIG --workdir WORKDIR` mid-/post-trains from it.
workdir_to_hf: restores only the parameters of a step (no optimizer state) and exports them.
"""
from __future__ import annotations

import json
import logging
import os

import jax

from kanana_jax import config as config_lib
from kanana_jax.config import ExperimentConfig
from kanana_jax.convert import hf_config, hf_tokenizer
from kanana_jax.convert.hf_export import export_hf
from kanana_jax.convert.hf_import import import_params
from kanana_jax.convert.safetensors_io import SafetensorsCheckpoint

CHECKPOINTS = "checkpoints"
log = logging.getLogger("kanana_jax.convert")


def check_architecture(cfg: ExperimentConfig, hf: dict) -> None:
    """Raises HFConfigError listing the `--set model.KEY=VALUE` overrides that make cfg.model match config.json."""
    theirs = hf_config.model_config_from_hf(hf)
    diff = hf_config.architecture_mismatch(cfg.model, theirs)
    if diff:
        sets = " ".join(f"--set model.{k}={'none' if v[1] is None else v[1]}" for k, v in sorted(diff.items()))
        raise hf_config.HFConfigError(
            f"the experiment's model differs from the checkpoint's config.json in {sorted(diff)}; run with: {sets}")


def hf_to_workdir(hf_dir: str, cfg: ExperimentConfig, workdir: str) -> str:
    """Writes HF checkpoint `hf_dir` as step 0 (params + fresh optimizer state + data position 0) of `workdir`;
    cfg.model must have the checkpoint's architecture (dtypes, kernels and remat may differ). Returns the path."""
    from kanana_jax.train.builder import build_trainer
    from kanana_jax.train.checkpoint import Checkpointer

    hf = hf_config.read_hf_config(hf_dir)
    check_architecture(cfg, hf)
    directory = os.path.join(workdir, CHECKPOINTS)
    if os.path.isdir(directory) and os.listdir(directory):
        raise FileExistsError(f"{directory} already holds checkpoints; use a new --workdir for the imported model")
    method = hf.get("topk_method", "noaux_tc" if hf.get("scoring_func", "sigmoid") == "sigmoid" else "greedy")
    trainer = build_trainer(cfg)
    with trainer.context():
        params = import_params(SafetensorsCheckpoint(hf_dir), cfg.model, interleaved=hf_config.rope_interleaved(hf),
                               shardings=trainer.state_sharding.params, allow_missing_bias=method != "noaux_tc")
        state = trainer.state_from_params(params, jax.random.PRNGKey(cfg.train.seed))
        data_state = trainer.stage.make_source(cfg, "train", cfg.train.seed).get_state()
        checkpointer = Checkpointer(directory, keep=cfg.train.keep_checkpoints, async_save=False)
        checkpointer.save(0, state, data_state)
        checkpointer.close()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config_lib.to_dict(cfg), f, indent=1)
    return os.path.join(directory, "0")


def load_workdir_config(workdir: str) -> ExperimentConfig:
    """The ExperimentConfig a run saved in WORKDIR/config.json."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: expected a workdir written by `kanana-jax run`")
    return config_lib.read_run_config(path)


def restore_params(workdir: str, step: int | None = None, cfg: ExperimentConfig | None = None):
    """(step, params) of checkpoint `step` (default: latest) of `workdir`: the stage's policy Transformer params
    (a reward model's backbone, say), sharded like the trainer's and verified against their checksums; the
    optimizer state is not read."""
    from kanana_jax.train.builder import build_trainer
    from kanana_jax.train.checkpoint import Checkpointer
    from kanana_jax.train.stages.protocol import subtree

    cfg = cfg or load_workdir_config(workdir)
    checkpointer = Checkpointer(os.path.join(workdir, CHECKPOINTS), keep=10 ** 6, async_save=False)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints under {checkpointer.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} under {checkpointer.directory}; steps: {steps}")
        trainer = build_trainer(cfg)
        with trainer.context():
            path = trainer.stage.policy_of(cfg)
            abstract = subtree(trainer.abstract_state().params, path)
            return step, checkpointer.restore_params(step, abstract, ("params",) + path)
    finally:
        checkpointer.close()


def workdir_to_hf(workdir: str, out_dir: str, *, step: int | None = None, dtype: str | None = None,
                  base_dir: str | None = None, max_shard_bytes: int = 5 << 30) -> tuple[int, list[str]]:
    """Exports the parameters of checkpoint `step` (default: latest) of `workdir` as a HF checkpoint that
    transformers loads as it is: `base_dir` (the checkpoint it started from) supplies token ids and tokenizer files,
    else the run's own tokenizer is written (`hf_tokenizer`). Warns before overwriting files in `out_dir`.
    Returns (step, files)."""
    cfg = load_workdir_config(workdir)
    warn_if_overwriting(out_dir)
    step, params = restore_params(workdir, step, cfg)
    if base_dir is not None:
        return step, export_hf(params, cfg.model, out_dir, dtype=dtype, base_dir=base_dir,
                               max_shard_bytes=max_shard_bytes)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer_files, token_ids = hf_tokenizer.write_tokenizer(out_dir, cfg.data.tokenizer)
    files = export_hf(params, cfg.model, out_dir, dtype=dtype, base_config=token_ids, max_shard_bytes=max_shard_bytes)
    return step, files + tokenizer_files


def warn_if_overwriting(out_dir: str) -> list[str]:
    """Logs a warning naming the files already in `out_dir` (an export replaces its config, weights and
    tokenizer files); returns their names."""
    existing = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if existing:
        shown = ", ".join(existing[:6]) + (f" and {len(existing) - 6} more" if len(existing) > 6 else "")
        log.warning("%s already holds %d files (%s): overwriting the export's files there (weights, config.json, "
                    "tokenizer); pass a new directory to keep them", out_dir, len(existing), shown)
    return existing
