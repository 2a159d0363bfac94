"""Preemption: SIGTERM handling of one process, and the multi-process sync point (jax's preemption service
on CPU processes): a SIGTERM to any one process stops every process at the same step.
(The end-to-end SIGTERM -> checkpoint -> clean exit -> resume of a training run is in test_reliability_killrun.)"""
import os
import signal
import socket
import subprocess
import sys

from kanana_jax.train.preemption import PreemptionWatcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "killrun_worker.py")


def test_sigterm_sets_the_flag_and_a_second_one_reaches_the_previous_handler():
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with PreemptionWatcher() as watcher:
            assert not watcher.should_stop(1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert watcher.should_stop(2) and watcher.reason == "SIGTERM" and calls == []
            os.kill(os.getpid(), signal.SIGTERM)     # a second SIGTERM is not deferred
            assert calls == [signal.SIGTERM]
        os.kill(os.getpid(), signal.SIGTERM)         # the handler in place before the watcher is back
        assert calls == [signal.SIGTERM, signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ctrl_c_sets_the_flag_and_a_second_one_raises_keyboard_interrupt():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a `kanana-jax` process
    try:
        with PreemptionWatcher() as watcher:
            os.kill(os.getpid(), signal.SIGINT)
            assert watcher.should_stop(1) and watcher.reason == "SIGINT"
            try:
                os.kill(os.getpid(), signal.SIGINT)    # Python's default handler: abort at once
                raised = False
            except KeyboardInterrupt:
                raised = True
        assert raised and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step():
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, WORKER, "preemption-sync", str(i), "2", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for p in procs:
            line = p.stdout.readline().strip()
            assert line == "READY 2", (line, p.stderr.read()[-2000:] if p.poll() is not None else "")
        os.kill(procs[1].pid, signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    stops = [out.strip().splitlines()[-1].split() for out, _ in outs]
    assert all(s[0] == "STOP" for s in stops), outs
    assert stops[0][1] == stops[1][1], stops                    # the same step on both processes
    assert "all hosts synced" in " ".join(stops[0]) and [p.returncode for p in procs] == [0, 0], outs
