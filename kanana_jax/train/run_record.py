"""A run's record in its workdir: the workdir check, WORKDIR/config.json (config, provenance, history) and the
comparison of a relaunch's config with the one the run's checkpoints were written under.

Relaunching a run with a changed config is checked before anything is written: a change that makes the
checkpoint unusable (`BLOCKING`: the model's architecture and parameter layout, the optimizer and its parameter
groups, the stage, the data stream the iterator position refers to) stops with the keys named and the way out;
any other change (steps, schedule, learning rate, eval / log / checkpoint cadence, mesh: restores reshard) resumes
with one INFO line listing it, and config.json's "history" records it with the step it applied from.
"""
from __future__ import annotations

import datetime
import json
import logging
import os

from kanana_jax import config as config_lib
from kanana_jax.config import ConfigError, ExperimentConfig

log = logging.getLogger("kanana_jax.train")

CONFIG_FILE = "config.json"

# Changing one of these makes the run's checkpoints unusable for resuming (dotted key, or 'section.' for a whole
# section, minus the keys in NOT_BLOCKING). model: shapes, dtypes and layer layout of the saved parameters and
# what the model computes; optimizer name and partition rules: the optimizer state's structure; the stage; data
# (and train.seed, sft.buckets, dpo.pairs, reward_model.pairs): what the saved iterator position points into;
# precision.fp8_scaling / fp8_amax_history: whether the state holds fp8 amax histories, and their length.
BLOCKING = ("model.", "optimizer.name", "optimizer.partition_rules", "train.stage", "train.seed", "data.",
            "sft.buckets", "dpo.pairs", "reward_model.pairs", "precision.fp8_scaling", "precision.fp8_amax_history")
# keys inside those sections that change how a step is computed or fed, not what the checkpoint means
NOT_BLOCKING = ("model.attention_impl", "model.moe_impl", "model.moe_block_rows", "model.moe_fused_gate_up",
                "model.expert_parallel", "model.expert_capacity_factor", "model.dtype", "model.remat_policy",
                "model.init_std", "data.global_batch_size", "data.on_bad_record", "data.eval_sources")


class WorkdirError(ConfigError):
    """--workdir cannot hold a run (a file, not writable); the message names it and the fix."""


class ResumeConfigError(ConfigError):
    """The config differs from the one the workdir's checkpoints were written under in keys that make them
    unusable; the message names the keys, both values and the way out."""


def prepare_workdir(workdir: str) -> None:
    """Creates `workdir` (and its parents) if missing; WorkdirError if it is a file or cannot be written."""
    if "://" in workdir:
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; pass a directory (it is created if "
                           "missing)")
    parent = workdir
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent.rstrip(os.sep)) or "."
    if parent and not os.path.isdir(parent):
        raise WorkdirError(f"--workdir {workdir}: {parent} is a file, so the directory cannot be created; pass "
                           "another path")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"--workdir {workdir} cannot be created: {e.strerror or e}; pass another path") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {workdir} is not writable; pass a directory you can write to")


def read_record(workdir: str) -> dict | None:
    """The parsed WORKDIR/config.json (config plus `config.RUN_RECORD_KEYS`), or None if absent or unreadable."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def write_record(workdir: str, cfg: ExperimentConfig, provenance: dict | None = None,
                 history: list | None = None, process_index: int = 0) -> None:
    """WORKDIR/config.json: the validated config, where its params came from (`train.init_from`) and the history
    of config changes across relaunches. Written aside and renamed: a kill never leaves half a file."""
    path = os.path.join(workdir, CONFIG_FILE)
    record = config_lib.to_dict(cfg)
    if provenance:
        record["provenance"] = provenance
    if history:
        record["history"] = history
    tmp = f"{path}.tmp{process_index}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _json_normal(value):
    """Values as they read back from JSON (tuples become lists), so saved and new configs compare equal."""
    return json.loads(json.dumps(value))


def config_changes(saved: dict, cfg: ExperimentConfig) -> dict:
    """{dotted key: (saved value, new value)} for every config key that differs (run-record keys ignored); a key
    the saved record lacks (written before the key existed) reads as its default, a key only it has as None."""
    old = _flatten({k: v for k, v in saved.items() if k not in config_lib.RUN_RECORD_KEYS})
    old = {**_flatten(_json_normal(config_lib.to_dict(ExperimentConfig()))), **old}
    new = _flatten(_json_normal(config_lib.to_dict(cfg)))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}


def is_blocking(key: str) -> bool:
    """Whether changing `key` makes a run's checkpoints unusable for resuming (see BLOCKING)."""
    if key in NOT_BLOCKING:
        return False
    return any(key.startswith(b) if b.endswith(".") else key == b for b in BLOCKING)


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe(changes: dict) -> str:
    """'optimizer.learning_rate 0.003 -> 0.01, train.steps 200 -> 400'."""
    return ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in changes.items())


def committed_steps(workdir: str) -> list[int]:
    """Steps under WORKDIR/checkpoints that orbax committed (a write cut short leaves only a *.tmp-* dir)."""
    directory = os.path.join(workdir, "checkpoints")
    if "://" in workdir or not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def check_resume(workdir: str, cfg: ExperimentConfig) -> tuple[dict | None, list]:
    """Compares `cfg` with WORKDIR/config.json before anything is written; returns (saved provenance, history to
    write). Raises ResumeConfigError when the workdir has checkpoints and a BLOCKING key changed; logs one INFO
    line (and adds a history entry) for other changes. Without checkpoints the new config simply replaces the
    old one (the run starts from step 0)."""
    record = read_record(workdir)
    if record is None:
        return None, []
    provenance, history = record.get("provenance"), list(record.get("history") or [])
    steps = committed_steps(workdir)
    if not steps:
        return provenance, history
    changes = config_changes(record, cfg)
    if not changes:
        return provenance, history
    step = steps[-1]
    blocking = {k: v for k, v in changes.items() if is_blocking(k)}
    if blocking:
        raise ResumeConfigError(
            f"cannot resume {workdir} (checkpoint at step {step}) with this config: {describe(blocking)} "
            f"changed, and the checkpoint was written for the old value{'s' if len(blocking) > 1 else ''}. "
            f"Use a new --workdir, or start a new run from this one's parameters with "
            f"--set train.init_from={workdir} (fresh optimizer state and data position)")
    log.info("config changed since the checkpoint at step %d, resuming with: %s", step, describe(changes))
    history.append({"step": step, "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                    "changed": {k: list(v) for k, v in changes.items()}})
    return provenance, history
