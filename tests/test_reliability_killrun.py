"""Kill-and-resume and preemption, end to end through the command line (subprocesses on CPU).

One module fixture runs a 2-step pre-training (the source), then an uninterrupted mid-training reference that
starts from it (`train.init_from`) and, in a second workdir, the same run SIGKILLed five
times (mid-step, mid-commit of an async checkpoint, right after a save started, at random times) and
SIGTERMed once (preemption), relaunched after each. The tests then compare: the whole loss curve and the
final train state, data state and loop counters must be bit-exact equal to the reference.
KILLRUN_SEED=<int> replays a schedule (the seed in use is in the assertion messages).
"""
import glob
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from kanana_jax.train.metrics import MetricsWriter, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "killrun_worker.py")
STEPS, CHECKPOINT_EVERY = 32, 4
LAUNCH_TIMEOUT_S = 240


def _argv(workdir, spec=None):
    """The run under test: mid-training (a token-weighted reasoning : replay mixture) started with
    train.init_from from a short pre-training run, so a relaunch before the first checkpoint starts from that
    source again and later ones from the run's own checkpoints."""
    sets = {"model.n_layers": 2, "train.checkpoint_every": CHECKPOINT_EVERY, "train.keep_checkpoints": 2,
            "train.async_checkpoint": "true", "train.log_every": 1, "train.eval_every": 0,
            "train.progress_bar": "false", "train.tensorboard": "false", "train.peak_tflops_per_device": 1}
    source = os.path.join(os.path.dirname(workdir), "source")
    spec = spec or f"experiments/midtrain.py:size=tiny,steps={STEPS},batch=4,seq_len=32,init_from={source}"
    argv = [sys.executable, WORKER, "run", spec, "--workdir", workdir]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


class Launch:
    """One worker subprocess; its stdout markers arrive on a queue, its stderr goes to a log file."""

    def __init__(self, workdir, env, name, spec=None):
        self.stderr_path = os.path.join(os.path.dirname(workdir), f"{name}.stderr")
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(_argv(workdir, spec), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self.markers = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.markers.put(line.strip())
        self.markers.put(None)

    def wait_for(self, predicate, what):
        """The first marker line satisfying `predicate`; fails with the log if the run ends or times out first."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.markers.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if predicate(line):
                return line
        self.kill(signal.SIGKILL)
        raise AssertionError(f"never saw {what}; markers {self.seen[-5:]}; stderr:\n{self.log()[-3000:]}")

    def kill(self, sig):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.finish()

    def finish(self):
        rc = self.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        self.stderr.close()
        return rc

    def log(self):
        with open(self.stderr_path) as f:
            return f.read()


def _marker(kind, at_least=0):
    return lambda line: line.startswith(kind + " ") and int(line.split()[1]) >= at_least


def _committed_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    return sorted(int(n) for n in names if n.isdigit())


def _resume_step(log_text):
    for line in log_text.splitlines():
        if "resumed from" in line:
            return int(line.rsplit(" ", 1)[1])
    return 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    seed = int(os.environ.get("KILLRUN_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    base = tmp_path_factory.mktemp("killrun")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3",
               JAX_COMPILATION_CACHE_DIR=str(base / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    reference_dir, killed_dir = str(base / "reference"), str(base / "killed")
    source = Launch(str(base / "source"), env, "source", "experiments/pretrain.py:size=tiny,steps=2,batch=4,seq_len=32")
    assert source.finish() == 0, source.log()[-3000:]
    reference = Launch(reference_dir, env, "reference")
    reference.wait_for(_marker("STEP", 1), "the reference's first step")  # compiled: later launches hit the cache
    events = []

    def launch(name, extra_env=None):
        run = Launch(killed_dir, dict(env, **(extra_env or {})), name)
        return run

    def step_of(line):
        return int(line.split()[1])

    # 1. SIGKILL in the middle of the steps (possibly before any checkpoint)
    run = launch("kill1")
    run.wait_for(_marker("STEP", rng.randint(2, 6)), "step")
    time.sleep(rng.uniform(0.0, 0.05))
    events.append(("sigkill mid-step", run.kill(signal.SIGKILL), _committed_steps(killed_dir), run.log()))

    # 2. SIGKILL while a checkpoint is written but not yet committed (commit held open for 3 s)
    run = launch("kill2", {"KILLRUN_COMMIT_DELAY_S": "3"})
    commit = run.wait_for(_marker("COMMIT"), "a checkpoint commit")
    rc = run.kill(signal.SIGKILL)
    pending = step_of(commit)
    tmp_dirs = glob.glob(os.path.join(killed_dir, "checkpoints", f"{pending}.orbax-checkpoint-tmp*"))
    events.append(("sigkill mid-commit", rc, _committed_steps(killed_dir), run.log(), pending, tmp_dirs))

    # 3. SIGTERM (preemption): checkpoint at the next step boundary and a clean exit
    run = launch("sigterm")
    first = step_of(run.wait_for(_marker("STEP"), "a step"))
    run.wait_for(_marker("STEP", first + rng.randint(0, 2)), "a later step")
    rc = run.kill(signal.SIGTERM)
    events.append(("sigterm", rc, _committed_steps(killed_dir), run.log(), run.seen))

    # 4. SIGKILL right after a save started (the async write is in flight)
    run = launch("kill4")
    run.wait_for(_marker("SAVE"), "a save")
    events.append(("sigkill after save start", run.kill(signal.SIGKILL), _committed_steps(killed_dir), run.log()))

    # 5.-6. SIGKILL at a random step and a random moment within it
    for name in ("kill5", "kill6"):
        run = launch(name)
        first = step_of(run.wait_for(_marker("STEP"), "a step"))
        run.wait_for(_marker("STEP", min(first + rng.randint(0, 5), STEPS - 6)), "a later step")
        time.sleep(rng.uniform(0.0, 0.05))
        events.append(("sigkill random", run.kill(signal.SIGKILL), _committed_steps(killed_dir), run.log()))

    # 7. the last launch runs to the end
    run = launch("final")
    final_rc = run.finish()
    events.append(("final", final_rc, _committed_steps(killed_dir), run.log()))
    reference_rc = reference.finish()
    assert reference_rc == 0, reference.log()[-3000:]
    assert final_rc == 0, run.log()[-3000:]
    return {"seed": seed, "events": events, "reference": reference_dir, "killed": killed_dir}


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return without_timing([json.loads(line) for line in f])


def _checkpoint(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step))
    state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
    with open(os.path.join(path, "data", "metadata")) as f:
        data = json.load(f)
    with open(os.path.join(path, "meta", "metadata")) as f:
        meta = json.load(f)
    return state, data, meta


def test_loss_curve_and_final_state_equal_the_uninterrupted_run(runs):
    where = f"(KILLRUN_SEED={runs['seed']})"
    kills = [e for e in runs["events"] if e[0].startswith("sigkill")]
    assert len(kills) == 5 and all(e[1] == -signal.SIGKILL for e in kills), ([e[:3] for e in kills], where)
    reference, killed = _rows(runs["reference"]), _rows(runs["killed"])
    assert [r["step"] for r in killed] == list(range(1, STEPS + 1)), where
    assert killed == reference, where   # every logged value, bit for bit (NaN-free, so == is exact)
    state_a, data_a, meta_a = _checkpoint(runs["reference"], STEPS)
    state_b, data_b, meta_b = _checkpoint(runs["killed"], STEPS)
    paths_a, leaves_a = zip(*jax.tree_util.tree_flatten_with_path(state_a)[0])
    paths_b, leaves_b = zip(*jax.tree_util.tree_flatten_with_path(state_b)[0])
    assert paths_a == paths_b
    for path, a, b in zip(paths_a, leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{jax.tree_util.keystr(path)} {where}")
    assert data_a == data_b and meta_a == meta_b
    assert meta_a["loop"] == {"skipped_updates": 0, "consecutive_skips": 0}


def test_each_relaunch_resumes_from_the_newest_committed_checkpoint(runs):
    events = runs["events"]
    for before, after in zip(events, events[1:]):
        committed = before[2]
        assert _resume_step(after[3]) == (committed[-1] if committed else 0), (before[0], after[0], committed)


def test_kill_mid_commit_leaves_only_a_tmp_dir_that_the_next_launch_removes(runs):
    name, rc, committed, _, pending, tmp_dirs = runs["events"][1]
    assert name == "sigkill mid-commit" and rc == -signal.SIGKILL
    assert tmp_dirs and pending not in committed, (pending, committed, tmp_dirs)
    assert not any(os.path.exists(d) for d in tmp_dirs)   # cleaned by a later launch
    assert not glob.glob(os.path.join(runs["killed"], "checkpoints", "*.orbax-checkpoint-tmp*"))


def test_sigterm_checkpoints_at_the_next_step_boundary_and_exits_cleanly(runs):
    name, rc, committed, log_text, markers = runs["events"][2]
    assert name == "sigterm" and rc == 0, log_text[-2000:]
    last_step = max(int(m.split()[1]) for m in markers if m.startswith("STEP"))
    message = [line for line in log_text.splitlines() if "SIGTERM at step" in line]
    assert message and "Relaunch the same command to resume" in message[0], log_text[-2000:]
    saved = int(message[0].split("SIGTERM at step ")[1].split(":")[0])
    assert saved >= last_step and saved in committed, (saved, last_step, committed)
    assert _resume_step(runs["events"][3][3]) == saved


def test_resume_over_a_metrics_line_cut_short_by_a_kill(tmp_path):
    """A SIGKILL during the write of a metrics line leaves a torn last line; the next resume drops it."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.4}\n{"step": 3, "lo')
    MetricsWriter(str(tmp_path), resume_step=2, tensorboard=False, progress_bar=False, total_steps=4).close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
