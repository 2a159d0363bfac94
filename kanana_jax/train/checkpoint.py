"""Orbax checkpoints of the train state, the data iterator state and the loop counters: async saves,
keep-last-K, integrity checks at restore and fallback to the newest readable checkpoint.

Layout: DIR/<step>/{state, data, meta}; meta holds the loop counters and a checksum per state leaf, by leaf path
(orbax does not checksum array data, so a flipped bit would otherwise restore silently). Orbax writes a step into
DIR/<step>.orbax-checkpoint-tmp-* and renames it on commit, so a write cut short (kill, crash, preemption)
leaves only a tmp dir, which is ignored and removed at the next start. A committed step that cannot be read
back is moved to DIR.corrupt/ when an older one is restored instead.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger("kanana_jax.train")

ITEMS = ("state", "data", "meta")


class CheckpointError(RuntimeError):
    """A checkpoint step cannot be restored; the message names the step, its path and the cause."""

    def __init__(self, step: int, path: str, cause: str):
        super().__init__(f"checkpoint step {step} at {path}: {cause}")
        self.step, self.path, self.cause = step, path, cause


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's parameter tree differs from the one this config builds (shapes, dtypes or paths)."""


@dataclasses.dataclass
class Restored:
    step: int
    state: object        # TrainState laid out like the abstract state
    data_state: dict     # the data iterator's get_state()
    loop_state: dict     # loop counters (skipped updates)


def _leaf_bits(x):
    """The raw bits of `x` as unsigned ints, widened to uint32."""
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[jnp.dtype(x.dtype).itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def device_state_checksums(state):
    """state_checksums computed where the leaves live (one jitted reduction per leaf, no transfer)."""
    return jnp.stack([jnp.sum(_leaf_bits(x), dtype=jnp.uint32) for x in jax.tree.leaves(state)])


def _on_host(x) -> bool:
    return isinstance(x, np.ndarray) or (isinstance(x, jax.Array) and x.is_fully_addressable
                                         and all(d.platform == "cpu" for d in x.devices()))


def _host_leaf_checksum(x) -> np.uint32:
    a = np.asarray(x)
    unsigned = {4: np.uint32, 2: np.uint16, 1: np.uint8}[a.dtype.itemsize]
    return a.reshape(-1).view(unsigned).astype(np.uint32).sum(dtype=np.uint32)   # numpy wraps mod 2**32


def state_checksums(state) -> np.ndarray:
    """uint32[L]: per leaf of `state`, the sum mod 2**32 of its raw bits (independent of sharding and order).
    Leaves in host memory (CPU runs) are summed by numpy, which needs no compilation (a jitted sum over every
    leaf of a train state takes seconds to compile on a CPU); accelerator leaves are summed on the device."""
    leaves = jax.tree.leaves(state)
    if all(_on_host(x) for x in leaves):
        return np.array([_host_leaf_checksum(x) for x in leaves], np.uint32)
    return np.asarray(device_state_checksums(state))


def _path_str(path) -> str:
    """'params/embed/embedding' for a jax key path (dict keys, attributes and sequence indices alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def leaves_by_path(tree) -> dict:
    """{'a/b/c': leaf} in jax.tree.leaves order."""
    return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_diff(saved: dict, expected: dict, limit: int = 30, compare_dtype: bool = True,
              subset: bool = False) -> list[str]:
    """Lines 'path: saved shape dtype, expected shape dtype' for every leaf that differs (in shape, and in dtype
    unless `compare_dtype` is False) or exists on one side (parameters first); with `subset`, leaves saved but
    not expected are fine (a restore that reads part of the tree)."""
    lines = []
    for path in sorted(set(saved) | set(expected), key=lambda p: (not p.startswith("params/"), p)):
        s, e = saved.get(path), expected.get(path)
        if s is None:
            lines.append(f"{path}: missing in the checkpoint, expected {tuple(e.shape)} {e.dtype}")
        elif e is None:
            if not subset:
                lines.append(f"{path}: saved {tuple(s.shape)} {s.dtype}, not in this config's state")
        elif tuple(s.shape) != tuple(e.shape) or (compare_dtype and str(s.dtype) != str(e.dtype)):
            lines.append(f"{path}: saved {tuple(s.shape)} {s.dtype}, expected {tuple(e.shape)} {e.dtype}")
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


def check_checksums(step: int, path: str, state, saved_sums, subset: bool = False) -> None:
    """Raises CheckpointError when leaves of `state` differ from their checksums at save. `saved_sums`:
    {leaf path: sum} (or, from checkpoints written before paths were stored, a list in leaf order); None skips.
    `subset`: `saved_sums` may name only some of the leaves."""
    if saved_sums is None:
        return
    sums = np.asarray(state_checksums(state)).tolist()
    paths = list(leaves_by_path(state))
    if isinstance(saved_sums, dict):
        got = dict(zip(paths, sums))
        bad = [p for p, v in saved_sums.items() if got.get(p) != v]
        complete = subset or set(saved_sums) == set(got)
    else:
        bad = [p for p, a, b in zip(paths, saved_sums, sums) if a != b]
        complete = len(saved_sums) == len(sums)
    if bad or not complete:
        raise CheckpointError(step, path, f"data of {len(bad)} state leaves differ from their checksum at save "
                              f"(silent corruption), first: {bad[:1]}")


class Checkpointer:
    """Saves {'state': TrainState, 'data': iterator state, 'meta': counters and checksums} under DIRECTORY/<step>."""

    def __init__(self, directory: str, *, keep: int, async_save: bool):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_state: dict, loop_state: dict | None = None) -> bool:
        """Starts a (possibly asynchronous) save at `step`; it becomes visible only once fully written."""
        sums = np.asarray(state_checksums(state)).tolist()
        meta = {"loop": dict(loop_state or {}), "state_checksums": dict(zip(leaves_by_path(state), sums))}
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def verify(self, step: int, abstract_state):
        """Raises CheckpointError if `step` lacks an item or its metadata is unreadable, and
        CheckpointMismatchError (with a per-parameter diff) if its tree differs from `abstract_state`."""
        path = self.step_path(step)
        for item in ITEMS:
            if not os.path.isdir(os.path.join(path, item)):
                raise CheckpointError(step, path, f"item '{item}' is missing (a partial or damaged checkpoint)")
        saved = self._saved_leaves(step)
        diff = tree_diff(saved, leaves_by_path(abstract_state))
        if diff:
            raise CheckpointMismatchError(step, path, "the saved train state does not match this config "
                                          "(path: saved, expected):\n  " + "\n  ".join(diff))

    def restore(self, step: int, abstract_state) -> Restored:
        """The checkpoint at `step`, laid out like `abstract_state`; CheckpointError names what is wrong."""
        path = self.step_path(step)
        if step not in self.manager.all_steps():
            raise CheckpointError(step, path, f"no committed checkpoint for this step (have {self.all_steps()})")
        self.verify(step, abstract_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # truncated or corrupt array files surface as tensorstore errors of many types
            message = str(e).split("\n")[0][:500]
            raise CheckpointError(step, path, f"unreadable data: {type(e).__name__}: {message}") from e
        meta = restored["meta"] or {}
        check_checksums(step, path, restored["state"], meta.get("state_checksums"))
        return Restored(step, restored["state"], restored["data"], dict(meta.get("loop", {})))

    def read_meta(self, step: int) -> dict:
        """The 'meta' item of a committed step (loop counters, checksums)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}

    def restore_params(self, step: int, abstract_params, prefix: tuple = ("params",)):
        """Only the parameters at `prefix` of step `step`'s state (no optimizer state is read), laid out like
        `abstract_params` (ShapeDtypeStructs with shardings; dtypes are cast; saved leaves it lacks, e.g. an LM
        head for a reward model's backbone, are not read), verified against their saved checksums.
        CheckpointMismatchError lists the leaves that are missing or differ in shape."""
        path = self.step_path(step)
        if step not in self.manager.all_steps():
            raise CheckpointError(step, path, f"no committed checkpoint for this step (have {self.all_steps()})")
        saved = self._saved_leaves(step)
        root = "/".join(prefix) + "/"
        saved_params = {k[len(root):]: v for k, v in saved.items() if k.startswith(root)}
        diff = tree_diff(saved_params, leaves_by_path(abstract_params), compare_dtype=False, subset=True)
        if diff:
            raise CheckpointMismatchError(step, path, f"its parameters at '{root.rstrip('/')}' do not match this "
                                          "run's model (path: saved, expected):\n  " + "\n  ".join(diff))
        item = abstract_params
        for key in reversed(prefix):
            item = {key: item}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), item)
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                restored = ckptr.restore(os.path.join(path, "state"), args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True))
        except Exception as e:  # truncated or corrupt array files surface as tensorstore errors of many types
            raise CheckpointError(step, path, f"unreadable data: {type(e).__name__}: {str(e).splitlines()[0][:500]}") from e
        for key in prefix:
            restored = restored[key]
        sums = self.read_meta(step).get("state_checksums")
        if isinstance(sums, dict):
            wanted = leaves_by_path(abstract_params)
            same_dtype = {k for k, v in saved_params.items() if k in wanted and str(v.dtype) == str(wanted[k].dtype)}
            check_checksums(step, path, restored, {k[len(root):]: v for k, v in sums.items()
                                                   if k.startswith(root) and k[len(root):] in same_dtype},
                            subset=True)
        return restored

    def _saved_leaves(self, step: int) -> dict:
        path = self.step_path(step)
        try:
            # the item's handler reads the tree metadata; a Checkpointer would also look for step metadata
            # (_CHECKPOINT_METADATA) inside the item dir, where orbax never writes it, and warn
            meta = ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(path, "state")))
        except Exception as e:  # orbax raises many types for damaged metadata
            raise CheckpointError(step, path, f"unreadable metadata of item 'state': {type(e).__name__}: {e}") from e
        if meta is None:
            raise CheckpointError(step, path, "unreadable metadata of item 'state' (orbax cannot parse its _METADATA)")
        return leaves_by_path(meta.tree)

    def restore_latest(self, abstract_state, *, fallback: bool) -> Restored | None:
        """The newest checkpoint that restores; None if there is none. An unreadable newer one is moved aside
        (with `fallback`) or raised (without). If none restores, the newest one's error is raised."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                restored = self.restore(step, abstract_state)
            except CheckpointError as e:
                errors.append(e)
                if not fallback:
                    raise CheckpointError(e.step, e.path, e.cause + "\n(train.checkpoint_fallback=false; set it "
                                          "to true to resume from an older readable checkpoint)") from e
                log.warning("checkpoint step %d is not usable: %s", step, e)
                continue
            if errors:
                for bad in errors:
                    self.quarantine(bad.step)
                log.warning("fell back to checkpoint step %d (newer unusable: %s); moved those to %s",
                            step, ", ".join(str(b.step) for b in errors), self.directory + ".corrupt")
            return restored
        if errors:
            raise errors[0]
        return None

    def quarantine(self, step: int):
        """Moves step `step` out of the managed directory (to DIR.corrupt/<step>-<time>) so it can be rewritten."""
        if jax.process_index() == 0:
            target_dir = self.directory + ".corrupt"
            os.makedirs(target_dir, exist_ok=True)
            shutil.move(self.step_path(step), os.path.join(target_dir, f"{step}-{int(time.time())}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"kanana_jax checkpoint quarantine {step}")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
