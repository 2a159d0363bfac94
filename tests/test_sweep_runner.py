"""Sweep runner: one row per point with the documented columns, resume skips finished points, failures are
recorded, curves are long-format; the CLI; one real subprocess run of the tiny model."""
import json
import math
import os

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from experiments.sweep_dsl import param, product  # noqa: E402
from kanana_jax import cli, sweeps  # noqa: E402
from kanana_jax.sweeps import plots, results, runner  # noqa: E402
from kanana_jax.train import loop  # noqa: E402

SPEC = "experiments/pretrain.py:size=tiny,steps=4"
QUIET = {"train.progress_bar": False, "train.tensorboard": False}


class FakeTrain:
    """Stands in for loop.run: writes metrics.jsonl as the real loop does (loss depends on lr and n_layers);
    `fail_lr` raises at step 2, `stop_lr` returns after step 2 as a preempted run does."""

    def __init__(self, fail_lr=None, stop_lr=None):
        self.calls, self.fail_lr, self.stop_lr = [], fail_lr, stop_lr

    def __call__(self, cfg, workdir, stop_after=None):
        self.calls.append(workdir)
        lr, layers = cfg.optimizer.learning_rate, cfg.model.n_layers
        rows = []
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            for step in range(1, cfg.train.steps + 1):
                if lr == self.fail_lr and step == 2:
                    raise FloatingPointError(f"non-finite loss nan at step {step}")
                if lr == self.stop_lr and step == 3 and stop_after is None:
                    return dict(rows[-1], preempted_at_step=2)
                row = {"step": step, "loss": 6.0 - step * lr * 100 - layers * 0.01, "max_attention_logit": step * lr}
                if step == cfg.train.steps:
                    row["eval_loss"] = row["loss"] + 0.5
                rows.append(row)
                f.write(json.dumps(row) + "\n")
        return rows[-1]


@pytest.fixture
def fake(monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(loop, "run", fake)
    return fake


SWEEP = product(param("optimizer.learning_rate", [1e-3, 3e-3]), param("model.n_layers", [2, 3]))


def test_table_has_one_row_per_point_with_documented_columns(tmp_path, fake):
    table = sweeps.run(SPEC, SWEEP, str(tmp_path), overrides=QUIET, verbose=False)
    assert list(table.columns[:8]) == ["point", "optimizer.learning_rate", "model.n_layers", "status", "path",
                                       "step", "loss", "eval_loss"]
    assert list(table.columns[-3:]) == ["seconds", "error", "command"]
    assert "max_attention_logit" in table.columns
    assert len(table) == 4 and list(table["status"]) == ["ran"] * 4
    assert list(zip(table["optimizer.learning_rate"], table["model.n_layers"])) == [
        (1e-3, 2), (1e-3, 3), (3e-3, 2), (3e-3, 3)]
    np.testing.assert_allclose(table["loss"], [6 - 4 * lr * 100 - n * 0.01 for lr, n in
                                               [(1e-3, 2), (1e-3, 3), (3e-3, 2), (3e-3, 3)]])
    np.testing.assert_allclose(table["eval_loss"], table["loss"] + 0.5)
    assert (table["step"] == 4).all() and (table["seconds"] >= 0).all() and (table["error"] == "").all()
    assert table["point"].is_unique and all(os.path.isdir(p) for p in table["path"])
    assert "--set optimizer.learning_rate=0.001 --set model.n_layers=2" in table["command"][0]
    on_disk = pd.read_csv(tmp_path / "results.csv")
    assert list(on_disk["point"]) == list(table["point"])
    reloaded = sweeps.load(str(tmp_path))
    assert list(reloaded["point"]) == list(table["point"]) and set(reloaded["status"]) == {"finished"}


def test_rerun_skips_finished_points_and_resumes_unfinished(tmp_path, fake):
    first = sweeps.run(SPEC, SWEEP, str(tmp_path), overrides=QUIET, verbose=False)
    assert len(fake.calls) == 4
    again = sweeps.run(SPEC, SWEEP, str(tmp_path), overrides=QUIET, verbose=False)
    assert len(fake.calls) == 4 and list(again["status"]) == ["skipped"] * 4
    pd.testing.assert_series_equal(first["loss"], again["loss"])
    # An interrupted point (no done marker, metrics stop early) runs again; a finished one without the marker
    # (killed after its last step) is recognised from metrics.jsonl.
    interrupted, killed_late = first["path"][1], first["path"][2]
    os.remove(os.path.join(interrupted, results.DONE_FILE))
    with open(os.path.join(interrupted, results.METRICS_FILE)) as f:
        lines = f.readlines()
    with open(os.path.join(interrupted, results.METRICS_FILE), "w") as f:
        f.writelines(lines[:2])
    os.remove(os.path.join(killed_late, results.DONE_FILE))
    third = sweeps.run(SPEC, SWEEP, str(tmp_path), overrides=QUIET, verbose=False)
    assert fake.calls[4:] == [interrupted]
    assert list(third["status"]) == ["skipped", "ran", "skipped", "skipped"]
    assert os.path.exists(os.path.join(killed_late, results.DONE_FILE))


def test_changed_base_config_gets_new_point_directories(tmp_path, fake):
    a = sweeps.run(SPEC, SWEEP, str(tmp_path), overrides=QUIET, verbose=False)
    b = sweeps.run("experiments/pretrain.py:size=tiny,steps=3", SWEEP, str(tmp_path), overrides=QUIET,
                   verbose=False)
    assert set(a["path"]).isdisjoint(b["path"]) and list(b["status"]) == ["ran"] * 4 and (b["step"] == 3).all()


def test_failed_and_stopped_points_are_recorded_and_rerun_resumes_them(tmp_path, monkeypatch):
    fake = FakeTrain(fail_lr=3e-3)
    monkeypatch.setattr(loop, "run", fake)
    table = sweeps.run(SPEC, param("optimizer.learning_rate", [1e-3, 3e-3, 1e-2]), str(tmp_path),
                       overrides=QUIET, verbose=False)
    assert list(table["status"]) == ["ran", "failed", "ran"]
    assert table["error"][1] == "FloatingPointError: non-finite loss nan at step 2"
    assert table["step"][1] == 1 and math.isnan(table["eval_loss"][1])
    with pytest.raises(FloatingPointError):
        sweeps.run(SPEC, param("optimizer.learning_rate", [3e-3]), str(tmp_path / "ff"), overrides=QUIET,
                   fail_fast=True, verbose=False)
    stopping = FakeTrain(stop_lr=1e-2)
    monkeypatch.setattr(loop, "run", stopping)
    table = sweeps.run(SPEC, param("optimizer.learning_rate", [1e-3, 1e-2]), str(tmp_path / "pre"),
                       overrides=QUIET, verbose=False)
    assert list(table["status"]) == ["ran", "stopped"] and table["step"][1] == 2
    assert table["error"][1].startswith("stopped at step 2 of 4")
    assert not os.path.exists(os.path.join(table["path"][1], results.DONE_FILE))
    stopping.stop_lr = None   # the re-run resumes the stopped point only
    again = sweeps.run(SPEC, param("optimizer.learning_rate", [1e-3, 1e-2]), str(tmp_path / "pre"),
                       overrides=QUIET, verbose=False)
    assert list(again["status"]) == ["skipped", "ran"] and stopping.calls[-1] == table["path"][1]


def test_curves_are_long_format_and_join_overrides(tmp_path, fake):
    table = sweeps.run(SPEC, SWEEP, str(tmp_path), overrides=QUIET, verbose=False)
    curves = sweeps.curves(table)
    assert list(curves.columns) == ["point", "step", "metric", "value"]
    assert len(curves) == 4 * (4 * 2 + 1)  # loss and max logit at every step, eval_loss at the last
    loss = curves[(curves["metric"] == "loss") & (curves["point"] == table["point"][3])]
    np.testing.assert_allclose(loss["value"], [6 - s * 0.3 - 0.03 for s in range(1, 5)])
    assert set(sweeps.curves(table, metrics=["eval_loss"])["metric"]) == {"eval_loss"}
    joined = sweeps.with_overrides(curves, table)
    assert set(joined.columns) == {"point", "step", "metric", "value", "optimizer.learning_rate", "model.n_layers"}
    assert joined.groupby("optimizer.learning_rate")["point"].nunique().to_dict() == {1e-3: 2, 3e-3: 2}
    ax = plots.plot_curves(curves, table, "loss", smooth=2)
    assert len(ax.get_lines()) == 4
    assert ax.get_legend().get_texts()[0].get_text() == "learning_rate=0.001, n_layers=2"
    ax = plots.plot_final(table, "optimizer.learning_rate", "loss", hue="model.n_layers", logx=True)
    assert len(ax.get_lines()) == 2
    with pytest.raises(ValueError, match="metric 'los' is not in the curves"):
        plots.plot_curves(curves, table, "los")


def test_dry_run_validates_and_lists_commands_without_running(tmp_path, fake):
    table = sweeps.run(SPEC, SWEEP, str(tmp_path / "dry"), runner="subprocess", overrides=QUIET, dry_run=True,
                       verbose=False)
    assert fake.calls == [] and list(table["status"]) == ["planned"] * 4
    assert table["command"][3].endswith("--set train.progress_bar=false --set train.tensorboard=false "
                                        "--set optimizer.learning_rate=0.003 --set model.n_layers=3")
    assert not os.path.exists(tmp_path / "dry" / table["point"][0])
    with pytest.raises(ValueError, match="runner='pod'; allowed runners: local, subprocess, tpu"):
        sweeps.run(SPEC, SWEEP, str(tmp_path), runner="pod")
    with pytest.raises(ValueError, match="workdir 'gs://b/x' is remote; the 'local' runner needs a local"):
        sweeps.run(SPEC, SWEEP, "gs://b/x")
    with pytest.raises(ValueError, match="resolves to the same config as an earlier point"):
        sweeps.run(SPEC, param("optimizer.learning_rate", [1e-3, 0.001]), str(tmp_path), dry_run=True)


def test_cli_runs_the_config_sweep(tmp_path, fake, capsys):
    cli.main(["sweep", "experiments/pretrain.py:size=tiny,steps=3", "--workdir", str(tmp_path),
              "--set", "train.progress_bar=false", "--set", "train.tensorboard=false"])
    out = capsys.readouterr().out
    assert len(fake.calls) == 3 and "optimizer.learning_rate" in out and out.count(" ran ") == 3
    cli.main(["sweep", "experiments/pretrain.py:size=tiny,steps=3", "--workdir", str(tmp_path / "d"),
              "--runner", "subprocess", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("-m kanana_jax.cli run experiments/pretrain.py" in line for line in lines)


def test_subprocess_commands_rebuild_the_same_configs(tmp_path):
    """`kanana-jax run CONFIG --set ...` as the subprocess runner writes it resolves to each point's config."""
    sweep = product(param("optimizer.schedule", ["cosine", "wsd"]), param("model.q_lora_rank", [None, 32]),
                    param("train.tensorboard", [True]), param("optimizer.learning_rate", [1e-2]))
    for point in runner.plan(SPEC, sweep, str(tmp_path), overrides={"data.mixture": [["a", "embedded", 1.0]]}):
        cmd = runner.cli_command(SPEC, point)
        assert cmd[cmd.index("run") + 1] == SPEC and cmd[cmd.index("--workdir") + 1] == point["path"]
        sets = [cmd[i + 1] for i, word in enumerate(cmd) if word == "--set"]
        _, cfg = cli.build_config(SPEC, sets)
        assert cfg == point["cfg"]


WORKER = r"""
import json, os, sys
workdir = sys.argv[sys.argv.index("--workdir") + 1]
sets = dict(s.split("=", 1) for s in sys.argv if "=" in s and "." in s.split("=", 1)[0])
lr = float(sets["optimizer.learning_rate"])
if lr == 3e-3:
    print("diverged"); sys.exit(3)
with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in (1, 2, 3, 4):
        f.write(json.dumps({"step": step, "loss": 5.0 - lr * step}) + "\n")
"""


def test_subprocess_runner_runs_points_in_parallel_and_records_failures(tmp_path, monkeypatch):
    import sys
    monkeypatch.setattr(runner, "cli_command", lambda config, point: [sys.executable, "-c", WORKER, "--workdir",
                                                                       point["path"], *point["sets"]])
    sweep = param("optimizer.learning_rate", [1e-3, 3e-3, 1e-2])
    table = sweeps.run(SPEC, sweep, str(tmp_path), runner="subprocess", parallel=2, overrides=QUIET, verbose=False)
    assert list(table["status"]) == ["ran", "failed", "ran"]
    np.testing.assert_allclose(table["loss"][[0, 2]], [5.0 - 4e-3, 5.0 - 4e-2])
    assert table["error"][1].startswith("exit status 3; last lines of") and table["error"][1].endswith("diverged")
    again = sweeps.run(SPEC, sweep, str(tmp_path), runner="subprocess", overrides=QUIET, verbose=False)
    assert list(again["status"]) == ["skipped", "failed", "skipped"]


def test_tpu_runner_hands_each_point_to_the_pod_launcher(tmp_path, fake):
    flags = ["--zone", "us-east5-a", "--project", "my-proj", "--topology", "v5p-8", "--mode", "xpk",
             "--cluster", "c1"]
    table = sweeps.run(SPEC, SWEEP, "gs://bkt/sweep", runner="tpu", overrides=QUIET, dry_run=True,
                       launcher_args=flags, verbose=False)
    assert fake.calls == [] and list(table["status"]) == ["planned"] * 4
    workloads = set()
    for point, path, command in zip(table["point"], table["path"], table["command"]):
        assert path == f"gs://bkt/sweep/{point}" and command.startswith("xpk workload create --cluster=c1")
        assert f"--workdir gs://bkt/sweep/{point}" in command and "--tpu-type=v5p-8" in command
        assert "--set train.progress_bar=false" in command
        workloads.add(command.split("--workload=")[1].split()[0])
    assert "--set optimizer.learning_rate=0.003 --set model.n_layers=3" in table["command"][3]
    assert len(workloads) == 4 and all(len(w) <= 40 for w in workloads)
    # The pod's point directories, copied here, are found by name and tabulated without training anything.
    local = tmp_path / "copied"
    first = table["point"][0]
    os.makedirs(local / first)
    with open(local / first / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in range(1, 5))
    loaded = sweeps.load(str(local), SPEC, SWEEP, overrides=QUIET)
    assert list(loaded["point"]) == list(table["point"]) and fake.calls == []
    assert list(loaded["status"]) == ["finished"] + ["not_started"] * 3 and loaded["loss"][0] == 1.0
    with pytest.raises(RuntimeError, match="(?s)pod launcher failed .*the following arguments are required: --zone"):
        sweeps.run(SPEC, SWEEP, "gs://bkt/sweep", runner="tpu", dry_run=True, verbose=False)


def test_cli_registration_does_not_need_pandas():
    """`kanana-jax run` on a machine without pandas must still start (the sweep command registers on import)."""
    import subprocess
    import sys

    from kanana_jax.sweeps import cli as sweep_cli
    assert sweep_cli.RUNNERS == runner.RUNNERS
    out = subprocess.run([sys.executable, "-c", "import sys, kanana_jax.cli as c; c._register_optional_commands(); "
                          "print('sweep' in c.COMMANDS, 'pandas' in sys.modules)"],
                         check=True, capture_output=True, text=True).stdout.split()
    assert out == ["True", "False"]
