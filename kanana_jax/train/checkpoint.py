"""Orbax checkpoints of the train state and the data iterator state: async saves, keep-last-K, resume latest."""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


class Checkpointer:
    """Saves {'state': TrainState pytree, 'data': iterator state (JSON)} under WORKDIR/checkpoints/<step>."""

    def __init__(self, directory: str, *, keep: int, async_save: bool):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict) -> bool:
        """Starts a (possibly asynchronous) save of `state` and `data_state` at `step`."""
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)

    def restore(self, step: int, abstract_state):
        """(state, data_state) at `step`, laid out like `abstract_state` (a tree of arrays or ShapeDtypeStructs)."""
        if step not in self.manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} under {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
