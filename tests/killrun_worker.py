"""Kill-and-resume harness worker: the real `kanana-jax` command line, plus markers on stdout that let a test
time its kills. Usage: python tests/killrun_worker.py run CONFIG --workdir D [--set k=v ...]
Or `python tests/killrun_worker.py preemption-sync PROCESS_ID NUM_PROCESSES PORT`: one of several CPU processes
(jax.distributed) that count steps with a PreemptionWatcher and print 'STOP <step>' where they agree to stop.

Markers (one per line, flushed): 'STEP n' after step n's metrics are written, 'SAVE n' when the save of
checkpoint n starts, 'COMMIT n' when checkpoint n is fully written but not yet committed (renamed from its
tmp dir). With KILLRUN_COMMIT_DELAY_S=x the commit then waits x seconds, a window for a kill mid-commit.
"""
import asyncio
import os
import sys


def _mark(text: str):
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def install_markers():
    import orbax.checkpoint as ocp

    from kanana_jax.train import checkpoint, metrics

    write, save = metrics.MetricsWriter.write, checkpoint.Checkpointer.save

    def write_marked(self, step, values):
        row = write(self, step, values)
        _mark(f"STEP {int(step)}")
        return row

    def save_marked(self, step, *args, **kwargs):
        _mark(f"SAVE {int(step)}")
        return save(self, step, *args, **kwargs)

    rename_cls = ocp.path.atomicity.AtomicRenameTemporaryPath
    finalize = rename_cls.finalize
    delay = float(os.environ.get("KILLRUN_COMMIT_DELAY_S", "0"))

    async def finalize_marked(self, *args, **kwargs):
        name = os.path.basename(str(self.get_final()))
        if name.isdigit():  # the step directory (items inside it are finalized first)
            _mark(f"COMMIT {name}")
            if delay:
                await asyncio.sleep(delay)
        return await finalize(self, *args, **kwargs)

    metrics.MetricsWriter.write = write_marked
    checkpoint.Checkpointer.save = save_marked
    rename_cls.finalize = finalize_marked


def preemption_sync(process_id: int, num_processes: int, port: int):
    import time

    import jax
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)
    from kanana_jax.train.preemption import PreemptionWatcher
    with PreemptionWatcher() as watcher:
        _mark(f"READY {jax.process_count()}")
        for step in range(1, 100_000):
            time.sleep(0.01)
            if watcher.should_stop(step):
                _mark(f"STOP {step} {watcher.reason}")
                break
    jax.distributed.shutdown()


def main():
    sys.path.insert(0, os.getcwd())
    if sys.argv[1] == "preemption-sync":
        preemption_sync(*map(int, sys.argv[2:5]))
        return
    from kanana_jax import cli
    cli.configure_logging()   # as `kanana-jax` does before anything imports jax / orbax
    install_markers()
    cli.main(sys.argv[1:])


if __name__ == "__main__":
    main()
