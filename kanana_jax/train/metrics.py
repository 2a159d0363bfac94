"""Run metrics: WORKDIR/metrics.jsonl (one object per logged step), TensorBoard events, a terminal progress bar.
Values are numbers, except a few strings (e.g. 'init_from', the source of a run's params), kept in the JSON only,
and a few arrays (e.g. per-layer fp8 amaxes, 'fp8/<site>/x_amax_by_layer'), logged as TensorBoard histograms only."""
from __future__ import annotations

import json
import logging
import os
import struct
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Row keys that measure wall time or speed: a resumed run's rows equal an uninterrupted run's except these.
TIMING_KEYS = frozenset({"tokens_per_s", "mfu", "time/eval_s", "time/rollout_s", "time/learner_s",
                         "rollout/samples_per_s", "rollout/generated_tokens_per_s"})


def without_timing(rows: list[dict]) -> list[dict]:
    """The rows with their TIMING_KEYS removed (what must repeat exactly when a run is replayed)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


# Dense bf16 peak per chip from the vendors' datasheets (no sparsity): the one table of spec peaks. The loop's
# `mfu` metric (train.peak_tflops_per_device = 0), benchmarks/train_step.py and BENCHMARKS.md divide by it, as
# MaxText and most papers do. Keys are prefixes of jax's device_kind, longest first where one prefixes another.
# Sources: NVIDIA H100/H200 SXM datasheets (989.4 TFLOP/s bf16 dense; 1,979 with sparsity); Google Cloud TPU
# pages (v4 275, v5e 197, v5p 459, v6e 918, TPU7x/Ironwood 2,307 bf16 and 4,614 fp8).
PEAK_TFLOPS = {"NVIDIA H100": 989.0, "NVIDIA H200": 989.0, "NVIDIA GH200": 989.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0, "TPU7x": 2307.0, "TPU v7": 2307.0}


def spec_peak_tflops(device_kind: str) -> float | None:
    """Datasheet dense bf16 TFLOP/s of one chip of this jax device_kind (e.g. 'NVIDIA H200'), or None if unlisted."""
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if device_kind.startswith(name):
            return PEAK_TFLOPS[name]
    return None


def peak_flops_per_device(configured_tflops: float) -> float:
    """FLOP/s of one device: configured, else the datasheet table by device kind, else (a device the table does not
    list, e.g. a CPU) a measured f32 matmul rate, said once (a warning; INFO on a CPU), since MFU against it is no
    spec-peak MFU."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    kind = jax.devices()[0].device_kind
    tflops = spec_peak_tflops(kind)
    if tflops is not None:
        return tflops * 1e12
    n = 512
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    rate = 5 * 2 * n ** 3 / (time.perf_counter() - start)
    if kind not in _SAID_NO_PEAK:
        _SAID_NO_PEAK.add(kind)
        # an accelerator missing from the table is worth a warning; a CPU (tests, laptops) only an INFO line
        if kind == "cpu":
            logging.getLogger("kanana_jax.train").info(
                "mfu on a CPU: no spec peak for device kind 'cpu', so mfu is against a measured f32 matmul (%.3g "
                "TFLOP/s; train.peak_tflops_per_device sets another)", rate / 1e12)
        else:
            logging.getLogger("kanana_jax.train").warning(
                "no spec peak for device kind %r in metrics.PEAK_TFLOPS; mfu is against a measured f32 matmul "
                "(%.3g TFLOP/s); set train.peak_tflops_per_device to fix it", kind, rate / 1e12)
    return rate


_SAID_NO_PEAK: set[str] = set()


def _read_records(path: str):
    """The records of a TFRecord file (TensorBoard events); a record cut short by a kill ends the file."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        end = pos + 12 + length + 4
        if end > len(data):
            break
        yield data[pos + 12:pos + 12 + length]
        pos = end


def purge_events_after(logdir: str, step: int) -> int:
    """Rewrites the TensorBoard event files under `logdir`, dropping events logged after `step` (the steps a
    resumed run logs again); returns how many were dropped. Rewritten aside and renamed, like metrics.jsonl."""
    if not os.path.isdir(logdir):
        return 0
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.record_writer import masked_crc32c
    dropped = 0
    for name in sorted(os.listdir(logdir)):
        path = os.path.join(logdir, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        kept, n = [], 0
        for record in _read_records(path):
            n += 1
            event = Event.FromString(record)
            if event.step <= step or not event.HasField("summary"):
                kept.append(record)
        dropped += n - len(kept)
        if len(kept) == n and os.path.getsize(path) == sum(len(r) + 16 for r in kept):
            continue
        with open(path + ".tmp", "wb") as f:
            for record in kept:
                header = struct.pack("<Q", len(record))
                f.write(header + struct.pack("<I", masked_crc32c(header)) + record
                        + struct.pack("<I", masked_crc32c(record)))
        os.replace(path + ".tmp", path)
    return dropped


class MetricsWriter:
    """Appends metrics to metrics.jsonl and TensorBoard; on resume, drops lines and TensorBoard events logged after
    the restored step. The progress bar appears at the first `advance()` (after the first step, which compiles),
    so its rate and ETA count training steps only."""

    def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool, progress_bar: bool, total_steps: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.rows_kept = self._truncate_after(resume_step)   # rows of earlier launches (up to the resumed step)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.tb_dir = os.path.join(workdir, "tensorboard")
            purge_events_after(self.tb_dir, resume_step)
            # a unique file per launch (tensorboardX names files by the second; a relaunch within it would
            # overwrite the earlier file)
            self.tb = SummaryWriter(self.tb_dir, filename_suffix=f".{os.getpid()}.{time.time_ns() % 10 ** 9}")
        self.bar, self._step, self._total = None, resume_step, total_steps
        self._want_bar = progress_bar and jax.process_index() == 0

    def _truncate_after(self, step: int) -> int:
        if not os.path.exists(self.path):
            return 0
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # blank, or a last line cut short by a kill: dropped
                    continue
                if row.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(self.path + ".tmp", "w") as f:   # rewritten aside and renamed: a kill here loses nothing
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)
        return len(kept)

    def write(self, step: int, metrics: dict):
        row = {"step": int(step)}
        arrays = {k: np.asarray(v) for k, v in metrics.items() if not isinstance(v, str) and np.ndim(v) > 0}
        row.update({k: v if isinstance(v, str) else float(np.asarray(v)) for k, v in metrics.items()
                    if k not in arrays})
        if jax.process_index() == 0:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and not isinstance(v, str):
                        self.tb.add_scalar(k, v, step)
                for k, v in arrays.items():
                    self.tb.add_histogram(k, v.astype(np.float64), step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "eval_loss") if k in row}, refresh=False)
        return row

    def advance(self, n: int = 1):
        self._step += n
        if self.bar is not None:
            self.bar.update(n)
        elif self._want_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=self._total, initial=self._step, file=sys.stderr, dynamic_ncols=True,
                            desc="train", mininterval=1.0)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
