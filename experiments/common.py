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
