"""What every config section uses: the error type, declared fields with an inclusive numeric range, checks.
(kanana_jax/config.py re-exports these; the sections live in config.py and config_posttrain.py.)"""
from __future__ import annotations

import dataclasses

_INT32_MAX = 2 ** 31 - 1


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the dotted key and the allowed values."""


def _field(default, *, lo=None, hi=None, doc: str = ""):
    """A dataclass field with an optional inclusive numeric range [lo, hi] checked at load."""
    return dataclasses.field(default=default, metadata={"lo": lo, "hi": hi, "doc": doc})


def _check(ok: bool, key: str, message: str):
    if not ok:
        raise ConfigError(f"config key '{key}': {message}")
