"""Preemption: the loop asks at every step boundary whether to checkpoint and exit.

One process: a SIGTERM or SIGINT (Ctrl-C) handler sets a flag; a second signal gets the previous handler (for
SIGINT a KeyboardInterrupt: abort now, without a checkpoint; for SIGTERM usually: terminate now).
Several processes: jax's preemption sync service (started by jax.distributed.initialize) catches the notice
and `reached_preemption_sync_point(step)` turns true on every host at the same step."""
from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger("kanana_jax.train")


class PreemptionWatcher:
    """Context manager; `should_stop(step)` is True at the step boundary where the run should save and exit."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self.reason = signals, None
        self.multihost = jax.process_count() > 1
        self._previous = {}

    def __enter__(self):
        if not self.multihost and threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.reason = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal is not deferred
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving a checkpoint at the end of this step, then exiting (Ctrl-C again aborts "
                        "at once, without saving)")

    def should_stop(self, step: int) -> bool:
        """Call at every step boundary with the number of completed steps (the same on every host)."""
        if self.multihost:
            from jax.experimental import multihost_utils
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.reason = "preemption notice (all hosts synced)"
            except RuntimeError as e:
                log.warning("preemption handling is off: %s (enable jax_enable_preemption_service before "
                            "jax.distributed.initialize)", e)
                self.multihost = False
        return self.reason is not None
