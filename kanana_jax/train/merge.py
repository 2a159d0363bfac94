"""Merge runs by averaging their policy parameters (the parallel-RL ablation: tracks trained apart, then merged).

    kanana-jax merge runs/rl_logic runs/rl_chat --weights 0.5,0.5 --out runs/rl_merged
    kanana-jax eval runs/rl_merged --suite math,code,ifeval,tools

merged = sum_i w_i * params_i (float32 accumulation, cast back to each leaf's dtype; weights must be > 0 and are
used as given, so they need not sum to 1 - usually they should). Every run must have the same model
architecture; each contributes the policy of its newest checkpoint (or `--steps`), e.g. a PPO run's 'policy'
subtree. The output is a run directory like any other: the first run's config.json with a 'provenance' record
(sources, steps, weights, checksums) and a step-0 checkpoint whose optimizer state is fresh, so it can be
evaluated, exported, or trained further (train.init_from=OUT).
"""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp

from kanana_jax.config import ConfigError


def average(trees: Sequence, weights: Sequence[float]):
    """sum_i w_i * tree_i leaf by leaf, accumulated in float32, in the first tree's dtypes."""
    if len(trees) != len(weights) or not trees:
        raise ValueError(f"need one weight per tree, got {len(weights)} weights for {len(trees)} trees")
    def avg(*leaves):
        acc = sum(w * leaf.astype(jnp.float32) for w, leaf in zip(weights, leaves))
        return acc.astype(leaves[0].dtype)
    return jax.tree.map(avg, *trees)


def merge_workdirs(workdirs: Sequence[str], weights: Sequence[float], out: str, steps: Sequence[int | None] = ()):
    """Writes the weighted average of the runs' policies as step 0 of a new run `out`; returns its provenance."""
    from kanana_jax.convert.hf_config import architecture_mismatch
    from kanana_jax.convert.orbax_hf import load_workdir_config, restore_params
    from kanana_jax.train import run_record
    from kanana_jax.train.builder import build_trainer
    from kanana_jax.train.checkpoint import Checkpointer
    from kanana_jax.train.init_from import params_checksum
    from kanana_jax.train.stages.protocol import replace_subtree

    if len(workdirs) < 2:
        raise ConfigError("merge needs at least two run directories")
    if len(weights) != len(workdirs) or any(not w > 0 for w in weights):
        raise ConfigError(f"--weights: one weight > 0 per run ({len(workdirs)} runs), got {list(weights)}")
    if os.path.isdir(os.path.join(out, "checkpoints")) and os.listdir(os.path.join(out, "checkpoints")):
        raise FileExistsError(f"--out {out} already holds checkpoints; choose a new directory")
    cfgs = [load_workdir_config(w) for w in workdirs]
    for w, c in zip(workdirs[1:], cfgs[1:]):
        diff = architecture_mismatch(cfgs[0].model, c.model)
        if diff:
            raise ConfigError(f"{w} has another model than {workdirs[0]}: model.{sorted(diff)[0]} differs")
    steps = list(steps) or [None] * len(workdirs)
    loaded = [restore_params(w, s, c) for w, s, c in zip(workdirs, steps, cfgs)]
    merged = average([p for _, p in loaded], [float(x) for x in weights])
    cfg = cfgs[0]
    trainer = build_trainer(cfg)
    with trainer.context():
        rng = jax.random.PRNGKey(cfg.train.seed)
        path = trainer.stage.policy_of(cfg)
        params = replace_subtree(trainer.init_params(rng), path, merged) if path else merged
        params = jax.device_put(params, trainer.state_sharding.params)
        state = trainer.state_from_params(params, rng)
        provenance = {"kind": "merge", "init_from": "merge:" + ",".join(workdirs), "path": ",".join(workdirs),
                      "step": None, "sources": [{"path": w, "step": int(s), "weight": float(x),
                                                 "checksum": params_checksum(p)}
                                                for w, (s, p), x in zip(workdirs, loaded, weights)],
                      "checksum": params_checksum(merged)}
        os.makedirs(out, exist_ok=True)
        run_record.write_record(out, cfg, provenance)
        checkpointer = Checkpointer(os.path.join(out, "checkpoints"), keep=1, async_save=False)
        checkpointer.save(0, state.replace(extra={}) if trainer.stage.rebuild_extra else state,
                          trainer.stage.make_source(cfg, "train", cfg.train.seed).get_state())
        checkpointer.close()
    return provenance
