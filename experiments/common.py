"""Shared pieces of experiment configs: the `key=value,...` argument parser and the base ConfigDict."""
from __future__ import annotations

import ml_collections

from experiments import sizes
from kanana_jax import config as config_lib


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'size=tiny,steps=50' into a ConfigDict over `defaults`; an unknown name lists the allowed ones."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" not in item:
            raise config_lib.ConfigError(f"config argument {item!r} is not key=value; allowed keys: {', '.join(defaults)}")
        key, value = item.split("=", 1)
        if key not in defaults:
            raise config_lib.ConfigError(f"unknown config argument {key!r}; allowed: {', '.join(defaults)}")
        out[key] = config_lib.parse_value(value, defaults[key], key)
    return out


def base_config(size: str) -> ml_collections.ConfigDict:
    """Every declared key with its default (from kanana_jax.config), with the model size applied."""
    c = ml_collections.ConfigDict(config_lib.to_dict(config_lib.ExperimentConfig()))
    c.model.update(sizes.model_overrides(size))
    return c


def ablation_run(c: ml_collections.ConfigDict, *, steps: int, seed: int, batch: int, seq_len: int, lr: float):
    """Short ablation settings shared by the research configs: log every step, no eval or intermediate
    checkpoints, a constant learning rate without warmup."""
    c.train.stage = "pretrain"
    c.train.steps, c.train.seed = steps, seed
    c.train.eval_every, c.train.checkpoint_every, c.train.log_every = 0, 0, 1
    c.data.global_batch_size, c.data.seq_len = batch, seq_len
    c.optimizer.learning_rate, c.optimizer.schedule, c.optimizer.warmup_steps = lr, "constant", 0
    return c


def pod_layout(c: ml_collections.ConfigDict, size: str, slice_name: str = "") -> str | None:
    """For a full size (kanana2_30b_a3b, kanana2_155b_a17b): the pod layout of experiments/pod.py on `c` (mesh,
    batch, sequence, remat) for its named slice or `slice_name`; returns the slice, or None for tiny/small."""
    from experiments import pod
    model = pod.MODEL_OF_SIZE.get(size)
    return pod.apply_layout(c, model, slice_name) if model else None


def pod_topology(size: str, slice_name: str = "") -> str:
    """The TPU slice a stage config of `size` is laid out for (its module's `topology(arg)`)."""
    from experiments import pod
    if size not in pod.MODEL_OF_SIZE:
        raise ValueError(f"size={size!r} has no pod layout (only {', '.join(pod.MODEL_OF_SIZE)} do); pass "
                         "--topology to compile it for a slice anyway")
    return pod.named_slice(pod.MODEL_OF_SIZE[size], slice_name)
