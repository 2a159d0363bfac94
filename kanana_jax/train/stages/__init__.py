"""Training stages as plug-ins of the one loop: each is a module implementing `protocol.py`'s functions.

`midtrain` is next-token training like `pretrain` (same module): a named stage so that config.json, metrics and
the pipeline say which one ran; what differs is its config (a reasoning : replay mixture, `train.init_from`).
"""
from kanana_jax.train.stages import dpo, pretrain, reward_model, rl, sft
from kanana_jax.train.stages import calibration, pipeline, rejection_sampling  # drivers (DRIVERS)
from kanana_jax.train.stages.protocol import BatchField, Stage

MODULES = {"pretrain": pretrain, "midtrain": pretrain, "sft": sft, "dpo": dpo, "reward_model": reward_model,
           "rl": rl}
STAGES = {name: Stage.from_module(name, module) for name, module in MODULES.items()}
# Stages made of rounds of other stages: `module.run(cfg, workdir, stop_after=None) -> dict` drives them, every
# training through loop.run in its own sub-workdir (e.g. rejection sampling: sample -> verify -> keep -> SFT);
# `module.final_run(cfg, workdir) -> str` names the sub-run holding the final policy (train.init_from=WORKDIR of
# a driver run starts from it).
DRIVERS: dict = {"rejection_sampling": rejection_sampling, "calibration": calibration, "pipeline": pipeline}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"train.stage={name!r} has no train step (allowed: {', '.join(STAGES)}"
                         + (f"; {name!r} drives other stages)" if name in DRIVERS else ")"))
    return STAGES[name]
