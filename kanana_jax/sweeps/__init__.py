"""Hyperparameter sweeps: run every point of an experiment's sweep and tabulate final metrics and curves.

`run(config, sweep, workdir)` -> results table (one row per point); `curves(table)` -> long table of
(point, step, metric, value); `load(workdir)` rebuilds the table from disk; plotting helpers live in
`kanana_jax.sweeps.plots` (matplotlib is imported only there).
"""
from kanana_jax.sweeps.results import curves, load, with_overrides
from kanana_jax.sweeps.runner import RUNNERS, STATUSES, plan, run

__all__ = ["RUNNERS", "STATUSES", "curves", "load", "plan", "run", "with_overrides"]
