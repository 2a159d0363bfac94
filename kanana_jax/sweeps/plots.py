"""Matplotlib helpers for sweep results: metric curves per point, final metric against a hyperparameter."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from kanana_jax.sweeps.results import override_columns


def point_labels(table: pd.DataFrame, by: Sequence[str] | None = None) -> dict:
    """{point name: 'key=value, ...'} from the override columns `by` (default: all, short key names)."""
    by = override_columns(table) if by is None else list(by)
    labels = {}
    for _, row in table.iterrows():
        parts = [f"{c.rsplit('.', 1)[-1]}={row[c]}" for c in by if not _missing(row[c])]
        labels[row["point"]] = ", ".join(parts) or row["point"]
    return labels


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` logged values (the first ones average what exists)."""
    if window <= 1 or len(values) == 0:
        return values
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[lo]) / (idx - lo)


def plot_curves(curves: pd.DataFrame, table: pd.DataFrame, metric: str = "loss", *,
                by: Sequence[str] | None = None, ax=None, smooth: int = 1, logy: bool = False, title: str = ""):
    """One line per point of `metric` against step, labelled by the override columns `by`; returns the Axes."""
    import matplotlib.pyplot as plt
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 4.0))
    labels = point_labels(table, by)
    rows = curves[curves["metric"] == metric]
    if rows.empty:
        raise ValueError(f"metric {metric!r} is not in the curves; available: {sorted(curves['metric'].unique())}")
    for name in table["point"]:
        line = rows[rows["point"] == name].sort_values("step")
        if not line.empty:
            ax.plot(line["step"].to_numpy(), _smooth(line["value"].to_numpy(), smooth), label=labels[name])
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title or metric)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax


def plot_final(table: pd.DataFrame, x: str, metric: str = "loss", *, hue: str | None = None, ax=None,
               logx: bool = False):
    """Final `metric` against hyperparameter column `x`, one line per value of column `hue`; returns the Axes."""
    import matplotlib.pyplot as plt
    for column in (x, metric) + ((hue,) if hue else ()):
        if column not in table.columns:
            raise ValueError(f"column {column!r} is not in the results table; columns: {list(table.columns)}")
    if ax is None:
        _, ax = plt.subplots(figsize=(5.0, 3.6))
    groups = table.groupby(hue, dropna=False, sort=False) if hue else [(None, table)]
    for value, group in groups:
        group = group.sort_values(x)
        label = f"{hue.rsplit('.', 1)[-1]}={value}" if hue else metric
        ax.plot(group[x].to_numpy(), group[metric].to_numpy(), marker="o", label=label)
    ax.set_xlabel(x)
    ax.set_ylabel(f"final {metric}")
    if logx:
        ax.set_xscale("log")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return ax
