"""`kanana-jax run` as a user meets it, through the command line in subprocesses (CPU, tiny model, a shared JAX
compilation cache): Ctrl-C saves a checkpoint and prints the resume command; the relaunch resumes quietly (INFO,
no warnings), says how long the compile took, and ends with a summary; a finished run started again says so; a
changed config is compared with the saved one before anything is written (an optimizer change stops with the key
named, a learning-rate / step-count change resumes with a one-line notice and a history entry in config.json);
TensorBoard events never repeat a step after a resume."""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from kanana_jax.train.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "killrun_worker.py")   # the real CLI plus 'STEP n' markers on stdout
SPEC = "experiments/pretrain.py:size=tiny,steps=6,batch=4,seq_len=32"
SETS = ["model.n_layers=2", "train.checkpoint_every=2", "train.log_every=1", "train.eval_every=3",
        "train.eval_batches=1", "train.progress_bar=false", "train.peak_tflops_per_device=1"]
TIMEOUT_S = 300


def _argv(workdir, *extra_sets):
    argv = [sys.executable, WORKER, "run", SPEC, "--workdir", workdir]
    for s in [*SETS, *extra_sets]:
        argv += ["--set", s]
    return argv


def _launch(workdir, env, *extra_sets, interrupt_after_step=None):
    """(exit status, stdout, stderr) of one `kanana-jax run`; SIGINT after the 'STEP n' marker if asked."""
    proc = subprocess.Popen(_argv(workdir, *extra_sets), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, out = queue.Queue(), []
    err = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            continue
        if line is None:
            break
        out.append(line)
        if interrupt_after_step is not None and line.strip() == f"STEP {interrupt_after_step}":
            proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    time.sleep(0.1)
    return rc, "".join(l for l in out if not l.startswith(("STEP ", "SAVE ", "COMMIT "))), "".join(err)


def _config_bytes(workdir):
    with open(os.path.join(workdir, "config.json"), "rb") as f:
        return f.read()


def _tensorboard_steps(workdir, tag="loss"):
    from tensorboardX.proto.event_pb2 import Event

    from kanana_jax.train.metrics import _read_records
    logdir = os.path.join(workdir, "tensorboard")
    steps = []
    for name in sorted(os.listdir(logdir)):
        for record in _read_records(os.path.join(logdir, name)):
            event = Event.FromString(record)
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_run")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KANANA_DEBUG", "KANANA_LAUNCHER")}
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    workdir = str(base / "run")
    out = {"workdir": workdir}
    out["interrupted"] = _launch(workdir, env, interrupt_after_step=3)
    out["resumed"] = _launch(workdir, env)
    out["finished_again"] = _launch(workdir, env)
    before = _config_bytes(workdir), open(os.path.join(workdir, "metrics.jsonl")).read()
    out["optimizer_changed"] = _launch(workdir, env, "optimizer.name=muon")
    out["untouched"] = before == (_config_bytes(workdir), open(os.path.join(workdir, "metrics.jsonl")).read())
    out["lr_and_steps_changed"] = _launch(workdir, env, "optimizer.learning_rate=0.01", "train.steps=8")
    return out


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(runs):
    rc, out, err = runs["interrupted"]
    assert rc == 0, err[-3000:]
    saved = [line for line in err.splitlines() if "SIGINT at step" in line]
    assert saved and "Relaunch the same command to resume" in saved[0], err[-3000:]
    step = int(saved[0].split("SIGINT at step ")[1].split(":")[0])
    assert step >= 3 and f"resumed from {runs['workdir']}/checkpoints/{step} at step {step}" in runs["resumed"][2]
    assert "Ctrl-C: saving a checkpoint at the end of this step" in err
    assert f"stopped at step {step} of 6 (SIGINT)" in out
    assert f"resume        kanana-jax run {SPEC} --workdir {runs['workdir']}" in out


def test_resume_is_quiet_times_the_compile_and_ends_with_a_summary(runs):
    rc, out, err = runs["resumed"]
    assert rc == 0, err[-3000:]
    lines = err.strip().splitlines()
    assert not [line for line in lines if line.startswith(("warning", "WARNING", "E0000", "error"))], err
    assert any(line.startswith("resumed from ") for line in lines), err
    assert "compiling the train step…" in lines and any(line.startswith("compiled the train step in ") for line in
                                                        lines), err
    summary = out.strip().splitlines()
    assert summary[0].startswith("finished step 6 of 6 in ") and "loss " in summary[0] and "eval_loss " in summary[0]
    workdir = runs["workdir"]
    assert f"  checkpoints   {workdir}/checkpoints (steps 4, 6)" in summary
    assert f"  metrics       {workdir}/metrics.jsonl" in summary
    assert any(line.startswith(f"  tensorboard   tensorboard --logdir {workdir}/tensorboard") for line in summary)


def test_a_finished_run_started_again_says_so(runs):
    rc, out, err = runs["finished_again"]
    assert rc == 0 and out.startswith("already finished at step 6 of 6: loss "), (out, err[-2000:])
    assert "compiling" not in err


def test_an_optimizer_change_stops_before_anything_is_written(runs):
    rc, out, err = runs["optimizer_changed"]
    assert rc == 2 and runs["untouched"], err[-3000:]
    (line,) = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert "optimizer.name 'adamw' -> 'muon'" in line and "checkpoint at step 6" in line
    assert "use a new --workdir" in line.lower() and f"--set train.init_from={runs['workdir']}" in line
    assert "Traceback" not in err


def test_a_learning_rate_change_resumes_with_a_notice_and_a_history_entry(runs):
    rc, out, err = runs["lr_and_steps_changed"]
    assert rc == 0, err[-3000:]
    (notice,) = [line for line in err.splitlines() if "config changed since the checkpoint at step 6" in line]
    assert notice.startswith("config changed") and "optimizer.learning_rate 0.003 -> 0.01" in notice
    assert "train.steps 6 -> 8" in notice
    with open(os.path.join(runs["workdir"], "config.json")) as f:
        record = json.load(f)
    assert record["optimizer"]["learning_rate"] == 0.01 and record["train"]["steps"] == 8
    (entry,) = record["history"]
    assert entry["step"] == 6 and entry["changed"] == {"optimizer.learning_rate": [0.003, 0.01],
                                                       "train.steps": [6, 8]}
    assert out.startswith("finished step 8 of 8")


def test_tensorboard_steps_are_not_repeated_after_resumes(runs):
    assert _tensorboard_steps(runs["workdir"]) == list(range(1, 9))


def test_resume_purges_tensorboard_events_after_the_restored_step(tmp_path):
    def write(resume_step, steps):
        writer = MetricsWriter(str(tmp_path), resume_step=resume_step, tensorboard=True, progress_bar=False,
                               total_steps=10)
        for s in steps:
            writer.write(s, {"loss": float(s)})
        writer.close()
    write(0, range(1, 6))
    write(3, range(4, 8))          # a resume from the checkpoint at step 3: 4 and 5 are logged again
    write(0, [1])                  # started over without a checkpoint
    assert _tensorboard_steps(str(tmp_path)) == [1]
    write(1, range(2, 4))
    assert _tensorboard_steps(str(tmp_path)) == [1, 2, 3]
