"""Run every point of a sweep (in this process, as subprocesses, or on a TPU pod) and tabulate the results.

    table = kanana_jax.sweeps.run("experiments/pretrain.py:size=tiny", sweep, "runs/lr_sweep")
    curves = kanana_jax.sweeps.curves(table)

Each point trains in WORKDIR/<point name>, a name built from its overrides plus a hash of its full resolved
config, so re-running the same sweep finds the same directories: a point whose run already reached its last
step is skipped ('skipped'), an interrupted one resumes from its latest checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Mapping

import pandas as pd

from kanana_jax import config as config_lib
from kanana_jax.sweeps import results

RUNNERS = ("local", "subprocess", "tpu")
STATUSES = ("ran", "skipped", "failed", "stopped", "planned", "launched")
FIXED_COLUMNS = ["point", "status", "path", "step", "loss", "eval_loss", "seconds", "error", "command"]


def _format_value(value: Any) -> str:
    """A value as `--set` text that `kanana_jax.config.parse_value` reads back to the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return json.dumps(list(value))
    return repr(value) if isinstance(value, float) else str(value)


def _slug(overrides: Mapping[str, Any]) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={_format_value(v)}" for k, v in overrides.items()]
    text = re.sub(r"[^A-Za-z0-9_.=+-]+", "-", ",".join(parts)) or "base"
    return text[:120].strip("-")


def is_remote(path: str) -> bool:
    """True for object-store paths (gs://...), which only the pod launcher writes to."""
    return "://" in path


def _join(workdir: str, name: str) -> str:
    return workdir.rstrip("/") + "/" + name if is_remote(workdir) else os.path.join(workdir, name)


def point_name(overrides: Mapping[str, Any], cfg) -> str:
    """'<key=value,...>-<hash of the resolved config>': readable, and unique per distinct config."""
    digest = hashlib.sha1(json.dumps(config_lib.to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()
    return f"{_slug(overrides)}-{digest[:8]}"


def split_spec(spec: str) -> tuple[str, str | None]:
    """'experiments/pretrain.py:size=tiny' -> ('experiments/pretrain.py', 'size=tiny')."""
    path, _, arg = spec.partition(":")
    return path, (arg or None)


def load_sweep(spec: str):
    """The `sweep()` of the config module named by `spec` (called with the spec's argument if it takes one)."""
    import inspect

    from kanana_jax.cli import load_config_module
    path, arg = split_spec(spec)
    module = load_config_module(path)
    fn = getattr(module, "sweep", None)
    if fn is None:
        raise AttributeError(f"config {path!r} defines no sweep(); add one or pass sweep= to kanana_jax.sweeps.run")
    return fn(arg) if inspect.signature(fn).parameters else fn()


def plan(config: str, sweep=None, workdir: str = ".", overrides: Mapping[str, Any] | None = None) -> list[dict]:
    """One dict per point (index, name, overrides, cfg, path, sets), every point validated against the config."""
    from experiments import sweep_dsl
    from kanana_jax.cli import load_config_module
    path, arg = split_spec(config)
    module = load_config_module(path)
    sweep = sweep_dsl.as_sweep(load_sweep(config) if sweep is None else sweep)
    cfgs = sweep_dsl.validate(sweep, module.get_config, arg, base=overrides)
    points, names = [], set()
    for i, (point, cfg) in enumerate(zip(sweep, cfgs)):
        name = point_name(point, cfg)
        if name in names:
            raise ValueError(f"sweep point {i} {point} resolves to the same config as an earlier point; "
                             "remove the duplicate")
        names.add(name)
        sets = [f"{k}={_format_value(v)}" for k, v in {**dict(overrides or {}), **point}.items()]
        points.append(dict(index=i, name=name, overrides=point, cfg=cfg, path=_join(workdir, name),
                           sets=sets))
    return points


def cli_command(config: str, point: dict) -> list[str]:
    """The `python -m kanana_jax.cli run` command line that trains one point."""
    cmd = [sys.executable, "-m", "kanana_jax.cli", "run", config, "--workdir", point["path"]]
    for s in point["sets"]:
        cmd += ["--set", s]
    return cmd


def tpu_name(config: str, point: dict) -> str:
    """A TPU VM / xpk workload name for one point: the launcher's default name for the config + the point hash."""
    from launch import tpu
    return f"{tpu.default_name(config)[:31].rstrip('-')}-{point['name'][-8:]}"


def tpu_command(config: str, point: dict, dry_run: bool, launcher_args=()) -> list[str]:
    """The pod launcher (`python -m launch.tpu`) invocation for one point; `launcher_args` adds its flags
    (--zone, --project, --mode xpk --cluster ..., --topology); without dry_run it gets --execute."""
    cmd = [sys.executable, "-m", "launch.tpu", "--config", config, "--workdir", point["path"],
           "--name", tpu_name(config, point)]
    for s in point["sets"]:
        cmd += ["--set", s]
    return cmd + list(launcher_args) + ([] if dry_run else ["--execute"])


def _record(point: dict, status: str, *, seconds=math.nan, error: str = "", command: str = "") -> dict:
    return dict(index=point["index"], name=point["name"], overrides=point["overrides"], status=status,
                path=point["path"], seconds=seconds, error=error, command=command)


def _write_point_file(point: dict, config: str, command: str):
    os.makedirs(point["path"], exist_ok=True)
    results.write_json(os.path.join(point["path"], results.POINT_FILE),
                       dict(index=point["index"], name=point["name"], overrides=point["overrides"],
                            config=config, sets=point["sets"], command=command))


def _mark_done(point: dict, seconds: float):
    final = results.final_metrics(results.read_metrics(point["path"]))
    results.write_json(os.path.join(point["path"], results.DONE_FILE),
                       dict(steps=point["cfg"].train.steps, seconds=seconds, final=final))


def _finished_record(point: dict, command: str) -> dict | None:
    if not results.is_finished(point["path"], point["cfg"].train.steps):
        return None
    done = results.read_json(os.path.join(point["path"], results.DONE_FILE))
    if done is None:
        _mark_done(point, math.nan)
        done = {}
    return _record(point, "skipped", seconds=done.get("seconds", math.nan), command=command)


def _completed(point: dict, seconds: float) -> dict:
    """'ran' (and the done marker) if the run reached its last step, else 'stopped' (e.g. preempted by SIGTERM)."""
    steps, reached = point["cfg"].train.steps, results.last_step(point["path"])
    if reached < steps:
        return _record(point, "stopped", seconds=seconds,
                       error=f"stopped at step {reached} of {steps} (preempted?); run the sweep again to resume")
    _mark_done(point, seconds)
    return _record(point, "ran", seconds=seconds)


def _run_local(point: dict, fail_fast: bool) -> dict:
    from kanana_jax.train import loop
    start = time.perf_counter()
    try:
        loop.run(point["cfg"], point["path"])
    except Exception as e:  # one diverged or broken point must not lose the rest of the sweep
        if fail_fast:
            raise
        return _record(point, "failed", seconds=time.perf_counter() - start, error=f"{type(e).__name__}: {e}")
    return _completed(point, time.perf_counter() - start)


def _log_tail(path: str, n: int = 20) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:]).strip()


def _run_subprocesses(config: str, todo: list[dict], parallel: int, env, fail_fast: bool) -> dict:
    """Runs `todo` points as `kanana-jax run` subprocesses, at most `parallel` at a time; {index: record}."""
    out, queue, running = {}, list(todo), []
    while queue or running:
        while queue and len(running) < parallel:
            point = queue.pop(0)
            log_path = os.path.join(point["path"], "run.log")
            log = open(log_path, "w")
            proc = subprocess.Popen(cli_command(config, point), stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, **(env or {})})
            running.append((point, proc, log, log_path, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            point, proc, log, log_path, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            seconds = time.perf_counter() - start
            if proc.returncode == 0:
                out[point["index"]] = _completed(point, seconds)
            else:
                error = f"exit status {proc.returncode}; last lines of {log_path}:\n{_log_tail(log_path)}"
                if fail_fast:
                    for other in running:
                        other[1].kill()
                    raise RuntimeError(f"sweep point {point['name']} failed: {error}")
                out[point["index"]] = _record(point, "failed", seconds=seconds, error=error)
    return out


def _launch_tpu(config: str, point: dict, dry_run: bool, launcher_args) -> dict:
    """Runs the pod launcher's CLI in this process for one point; its printed commands become 'command'."""
    import contextlib
    import io

    from launch import tpu
    cmd = tpu_command(config, point, dry_run, launcher_args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = tpu.main(cmd[3:])
        except SystemExit as e:  # argparse rejected the launcher flags
            rc = e.code if isinstance(e.code, int) else 2
    if rc:
        raise RuntimeError(f"pod launcher failed for sweep point {point['name']} (exit {rc}): "
                           f"{shlex.join(cmd)}\n{err.getvalue().strip()}")
    return _record(point, "planned" if dry_run else "launched", command=out.getvalue().strip())


def run(config: str, sweep=None, workdir: str = "sweeps", runner: str = "local", *,
        overrides: Mapping[str, Any] | None = None, dry_run: bool = False, fail_fast: bool = False,
        parallel: int = 1, env: Mapping[str, str] | None = None, launcher_args=(),
        verbose: bool = True) -> pd.DataFrame:
    """Runs every point of `sweep` (default: the config module's `sweep()`) and returns the results table.

    config: 'path.py[:arg]' spec, as for `kanana-jax run`. overrides: dotted keys applied to every point
    before the point's own keys. runner: 'local' (in this process, one after another), 'subprocess'
    (`kanana-jax run` per point, `parallel` at a time, `env` added to their environment) or 'tpu' (each
    point handed to the pod launcher launch/tpu.py with `launcher_args`, e.g. ['--zone', 'us-east5-a',
    '--mode', 'xpk', '--cluster', 'c1']). dry_run: validate and list the commands, run nothing.
    A failed point gets status 'failed' and its error, unless fail_fast re-raises. The table (also written to
    WORKDIR/results.csv) has one row per point; its columns are documented in docs/configs_and_sweeps.md.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner={runner!r}; allowed runners: {', '.join(RUNNERS)}")
    if parallel < 1:
        raise ValueError(f"parallel={parallel}: must be at least 1")
    remote = is_remote(workdir)
    if remote and runner != "tpu":
        raise ValueError(f"workdir {workdir!r} is remote; the {runner!r} runner needs a local directory "
                         "(remote workdirs are for runner='tpu')")
    points = plan(config, sweep, workdir, overrides)
    if not remote:
        os.makedirs(workdir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    records, todo = {}, []
    for point in points:
        command = shlex.join(tpu_command(config, point, False, launcher_args) if runner == "tpu"
                             else cli_command(config, point))
        finished = None if dry_run or remote else _finished_record(point, command)
        if finished is not None:
            records[point["index"]] = finished
            say(f"[{point['index'] + 1}/{len(points)}] {point['name']}: finished earlier, skipped")
            continue
        if runner == "tpu":
            records[point["index"]] = _launch_tpu(config, point, dry_run, launcher_args)
            if not dry_run and not remote:
                _write_point_file(point, config, command)
            say(f"# [{point['index'] + 1}/{len(points)}] {point['name']}: {records[point['index']]['status']}")
            say(records[point["index"]]["command"])
        elif dry_run:
            records[point["index"]] = _record(point, "planned", command=command)
            say(command)
        else:
            _write_point_file(point, config, command)
            todo.append((point, command))
    if runner == "local":
        for point, command in todo:
            say(f"[{point['index'] + 1}/{len(points)}] {point['name']}: training {point['cfg'].train.steps} steps")
            records[point["index"]] = dict(_run_local(point, fail_fast), command=command)
    elif runner == "subprocess" and todo:
        say(f"running {len(todo)} points as subprocesses, {parallel} at a time")
        done = _run_subprocesses(config, [p for p, _ in todo], parallel, env, fail_fast)
        for point, command in todo:
            records[point["index"]] = dict(done[point["index"]], command=command)
    table = table_from_records([records[p["index"]] for p in points])
    if not dry_run and not remote:
        table.to_csv(os.path.join(workdir, "results.csv"), index=False)
    return table


def table_from_records(records: list[dict]) -> pd.DataFrame:
    """One row per point: point, override columns, status, path, step, final metrics, seconds, error, command."""
    keys = list(dict.fromkeys(k for r in records for k in r["overrides"]))
    rows, metric_names = [], []
    for r in records:
        final = results.final_metrics(results.read_metrics(r["path"])) if os.path.isdir(r["path"]) else {}
        for name in final:
            if name not in metric_names and name != "step":
                metric_names.append(name)
        row = {"point": r["name"], **{k: r["overrides"].get(k) for k in keys}, "status": r["status"],
               "path": r["path"], "step": final.get("step", 0)}
        row.update({m: v for m, v in final.items() if m != "step"})
        row.update(seconds=r["seconds"], error=r["error"], command=r["command"])
        rows.append(row)
    extra = [m for m in metric_names if m not in ("loss", "eval_loss")]
    columns = ["point", *keys, "status", "path", "step", "loss", "eval_loss", *extra, "seconds", "error", "command"]
    table = pd.DataFrame(rows, columns=columns)
    table = table.astype({"step": "int64", "loss": "float64", "eval_loss": "float64", "seconds": "float64"})
    table.attrs["override_columns"] = keys
    return table
