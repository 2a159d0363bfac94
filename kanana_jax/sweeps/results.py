"""Sweep results from disk: each point's metrics.jsonl -> final metrics and a long-format curves table.

A point directory holds `point.json` (name, index, overrides, config spec), the run's `metrics.jsonl` and,
once the run reached its last step, `done.json` (final metrics, steps, seconds).
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable

import pandas as pd

POINT_FILE = "point.json"
DONE_FILE = "done.json"
METRICS_FILE = "metrics.jsonl"
CURVE_COLUMNS = ["point", "step", "metric", "value"]


def read_metrics(path: str) -> list[dict]:
    """The rows of `path`/metrics.jsonl (one dict per logged step; [] when there is none)."""
    file = os.path.join(path, METRICS_FILE)
    if not os.path.exists(file):
        return []
    rows = []
    with open(file) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a killed writer ends the readable log
    return rows


def final_metrics(rows: list[dict]) -> dict:
    """The last logged value of every metric (eval_loss comes from the last step that evaluated), plus 'step'."""
    out = {}
    for row in rows:
        out.update(row)
    return out


def last_step(path: str) -> int:
    """The last step logged in `path`/metrics.jsonl (0 when nothing was logged)."""
    rows = read_metrics(path)
    return int(rows[-1]["step"]) if rows else 0


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: dict):
    """Writes atomically (temp file + rename) so a killed run never leaves half a marker."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def is_finished(path: str, steps: int) -> bool:
    """True when the run in `path` reached `steps`: our done marker says so, or metrics.jsonl logged that step."""
    done = read_json(os.path.join(path, DONE_FILE))
    if done is not None and int(done.get("steps", -1)) == steps:
        return True
    return last_step(path) >= steps


def curves(table_or_paths, metrics: Iterable[str] | None = None) -> pd.DataFrame:
    """Long table (point, step, metric, value) from every point's metrics.jsonl; `table_or_paths` is a sweep
    results table (uses its 'point' and 'path' columns) or a {point name: directory} dict."""
    if isinstance(table_or_paths, pd.DataFrame):
        pairs = list(zip(table_or_paths["point"], table_or_paths["path"]))
    else:
        pairs = list(dict(table_or_paths).items())
    wanted = None if metrics is None else set(metrics)
    records = []
    for name, path in pairs:
        for row in read_metrics(path):
            step = int(row["step"])
            for metric, value in row.items():
                if metric != "step" and (wanted is None or metric in wanted):
                    records.append((name, step, metric, float(value)))
    out = pd.DataFrame.from_records(records, columns=CURVE_COLUMNS)
    return out.astype({"point": str, "step": "int64", "metric": str, "value": "float64"})


def with_overrides(long: pd.DataFrame, table: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """`long` (curves) joined with the override columns of `table` on 'point', for grouping by hyperparameter."""
    columns = override_columns(table) if columns is None else columns
    return long.merge(table[["point", *columns]], on="point", how="left")


def override_columns(table: pd.DataFrame) -> list[str]:
    """The dotted-key columns of a results table (the overrides each point set)."""
    return list(table.attrs.get("override_columns", [c for c in table.columns if "." in c]))


def _status(path: str, steps: int | None) -> str:
    finished = os.path.exists(os.path.join(path, DONE_FILE)) if steps is None else is_finished(path, steps)
    if finished:
        return "finished"
    return "partial" if last_step(path) else "not_started"


def load(workdir: str, config: str | None = None, sweep=None, overrides=None) -> pd.DataFrame:
    """Rebuilds a results table from the point directories under `workdir`, training nothing.

    Without `config`, every directory the runner made (it holds point.json) is listed. With the sweep's
    `config` (and `sweep`, default the config's sweep(), and shared `overrides`), the points are named as
    `run` names them, so directories written elsewhere (a pod's gs:// workdir copied here) are found too.
    Status: 'finished', 'partial' (logged some steps) or 'not_started'.
    """
    from kanana_jax.sweeps.runner import plan, table_from_records
    records = []
    if config is not None:
        for point in plan(config, sweep, workdir, overrides):
            done = read_json(os.path.join(point["path"], DONE_FILE)) or {}
            records.append(dict(index=point["index"], name=point["name"], overrides=point["overrides"],
                                status=_status(point["path"], point["cfg"].train.steps), path=point["path"],
                                seconds=done.get("seconds", math.nan), error="", command=""))
        return table_from_records(records)
    for entry in sorted(os.listdir(workdir)):
        path = os.path.join(workdir, entry)
        point = read_json(os.path.join(path, POINT_FILE))
        if point is None:
            continue
        done = read_json(os.path.join(path, DONE_FILE)) or {}
        records.append(dict(index=point["index"], name=point["name"], overrides=point["overrides"],
                            status=_status(path, None), path=path, seconds=done.get("seconds", math.nan),
                            error="", command=point.get("command", "")))
    records.sort(key=lambda r: r["index"])
    return table_from_records(records)
