"""The whole recipe as one run (experiments/pipeline.py, train.stage='pipeline'), end to end on CPU with every
stage cut to a few steps: pretrain -> midtrain -> SFT -> reward model -> rejection sampling -> RL -> calibration.

The run is SIGKILLed once SFT (a middle stage) has committed a checkpoint, then relaunched with the same command.
Checked: the relaunch resumes SFT from that checkpoint and does not touch the finished stages; every stage
started from the stage before it (config.json provenance and the first metrics row name the folder and step);
the eval table covers every language-model stage. The pipeline's one slow test (250 s of module setup in a full
CI run on a 2-core box)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = {"pretrain": 4, "midtrain": 3, "sft": 6, "reward_model": 2, "rl": 2, "calibration": 2}
SPEC = ("experiments/pipeline.py:size=tiny,suites=math,limit=1,"
        + ",".join(f"{stage}.train.steps={n}" for stage, n in STEPS.items())
        + ",sft.train.checkpoint_every=2,rejection_sampling.train.steps=2")
SETS = ["train.progress_bar=false", "train.tensorboard=false"]
CHAIN = {"1_midtrain": "0_pretrain", "2_sft": "1_midtrain", "3_reward_model": "2_sft",
         "4_rejection_sampling": "2_sft", "5_rl": "4_rejection_sampling", "6_calibration": "5_rl"}


def _launch(workdir, env, log_path):
    argv = [sys.executable, "-m", "kanana_jax.cli", "run", SPEC, "--workdir", workdir]
    for s in SETS:
        argv += ["--set", s]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def _digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read(path):
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    workdir = str(base / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_LOG_COMPILES="1")   # the logs then name each persistent compilation cache hit
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)   # the pipeline's own cache (WORKDIR/compile_cache), as for a user
    first = _launch(workdir, env, str(base / "first.log"))
    sft_checkpoint = os.path.join(workdir, "2_sft", "checkpoints", "2")
    deadline = time.monotonic() + 900
    while not os.path.isdir(sft_checkpoint) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    first_log = lambda: _read(base / "first.log")[-4000:]
    assert first.poll() is None, "the pipeline ended before SFT's first checkpoint:\n" + first_log()
    assert os.path.isdir(sft_checkpoint), "no SFT checkpoint in time:\n" + first_log()
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    finished_before = {name: _digest(os.path.join(workdir, name, "metrics.jsonl"))
                       for name in ("0_pretrain", "1_midtrain")}
    second = _launch(workdir, env, str(base / "second.log"))
    assert second.wait(timeout=1200) == 0, _read(base / "second.log")[-4000:]
    return workdir, _read(base / "first.log"), _read(base / "second.log"), finished_before


def test_a_killed_pipeline_resumes_in_the_stage_it_stopped_in(pipeline):
    workdir, _, second_log, finished_before = pipeline
    resumed = [line for line in second_log.splitlines() if "resumed from" in line]
    assert any(os.path.join("2_sft", "checkpoints") in line for line in resumed), second_log[-4000:]
    for name, digest in finished_before.items():   # finished stages are not trained again
        assert _digest(os.path.join(workdir, name, "metrics.jsonl")) == digest, name
    for stage, n in (("0_pretrain", 4), ("1_midtrain", 3), ("2_sft", 6)):
        with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps[-1] == n and len(steps) == len(set(steps)), (stage, steps)


def test_the_relaunch_loads_what_the_killed_run_compiled(pipeline):
    """WORKDIR/compile_cache: the relaunch finds the interrupted stage's train step there instead of compiling it."""
    workdir, _, second_log, _ = pipeline
    sft = second_log[second_log.index("pipeline stage sft"):].split("pipeline stage reward_model")[0]
    assert "Persistent compilation cache hit for 'jit_train_step'" in sft, sft[-4000:]
    assert os.listdir(os.path.join(workdir, "compile_cache"))


def test_every_stage_starts_from_the_stage_before_it(pipeline):
    """config.json's train.init_from names the earlier stage's folder; the params came from its final policy (a
    rejection-sampling run's last trained round, else its start policy) at its last step."""
    from kanana_jax.config import read_run_config
    from kanana_jax.train.run_record import committed_steps
    from kanana_jax.train.stages.pipeline import final_policy_dir
    workdir = pipeline[0]
    for stage, source in CHAIN.items():
        with open(os.path.join(workdir, stage, "config.json")) as f:
            record = json.load(f)
        assert record["train"]["init_from"] == os.path.join(workdir, source), stage
        if stage in ("4_rejection_sampling", "6_calibration"):
            continue   # drivers: their first sub-run holds the provenance (it starts from the same folder)
        folder = os.path.join(workdir, source)
        policy = final_policy_dir(read_run_config(os.path.join(folder, "config.json")), folder)
        assert record["provenance"]["path"] == policy, stage
        last_step = committed_steps(policy)[-1]
        assert record["provenance"]["step"] == last_step, stage
        with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
            first_row = json.loads(f.readline())
        assert first_row["init_from"] == f"{policy}:{last_step}", (stage, first_row)


def test_the_eval_table_covers_every_language_model_stage(pipeline):
    workdir = pipeline[0]
    with open(os.path.join(workdir, "eval_table.json")) as f:
        rows = json.load(f)
    assert [r["stage"] for r in rows] == ["pretrain", "midtrain", "sft", "rejection_sampling", "rl", "calibration"]
    for r in rows:
        assert 0.0 <= r["suites"]["math"]["accuracy"] <= 1.0 and r["suites"]["math"]["n"] == 1
    by_stage = {r["stage"]: r for r in rows}
    for r in rows:   # a reused eval row: the earlier stage it names ended on the same policy, at the same step
        if r.get("same_policy_as"):
            source = by_stage[r["same_policy_as"]]
            assert (r["policy"], r["policy_step"]) == (source["policy"], source["policy_step"]), r
            assert r["suites"] == source["suites"] and "same_policy_as" not in source
    assert os.path.getsize(os.path.join(workdir, "eval_table.png")) > 0
    assert "| sft (sft) |" in _read(os.path.join(workdir, "eval_table.md"))
    summary = pipeline[2]   # the relaunch's closing lines: the final policy, the reports, the table itself
    assert "pipeline finished in" in summary and f"final policy  {os.path.join(workdir, '6_calibration')}" in summary
    assert "| calibration (calibration) |" in summary
