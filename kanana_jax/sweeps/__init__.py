"""Hyperparameter sweeps: run every point of an experiment's sweep and tabulate final metrics and curves.

`run(config, sweep, workdir)` -> results table (one row per point); `curves(table)` -> long table of
(point, step, metric, value); `load(workdir)` rebuilds the table from disk; plotting helpers live in
`kanana_jax.sweeps.plots`. pandas (and matplotlib, for plots) load on first use, so the `kanana-jax` CLI,
which registers the `sweep` subcommand, works on machines without them.
"""
import importlib

_EXPORTS = {"curves": "results", "load": "results", "with_overrides": "results",
            "RUNNERS": "runner", "STATUSES": "runner", "plan": "runner", "run": "runner"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kanana_jax.sweeps' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kanana_jax.sweeps.{_EXPORTS[name]}"), name)
