"""Run metrics: WORKDIR/metrics.jsonl (one object per logged step), TensorBoard events, a terminal progress bar.
Values are numbers, except a few strings (e.g. 'init_from', the source of a run's params), kept in the JSON only."""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak per chip (datasheets), used for the MFU estimate when train.peak_tflops_per_device is 0.
PEAK_TFLOPS = {"TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
               "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0}


def peak_flops_per_device(configured_tflops: float) -> float:
    """FLOP/s of one device: configured, else the datasheet table by device kind, else a measured f32 matmul."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops * 1e12
    n = 512
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        f(a).block_until_ready()
    return 5 * 2 * n ** 3 / (time.perf_counter() - start)


class MetricsWriter:
    """Appends metrics to metrics.jsonl and TensorBoard; on resume, drops lines logged after the restored step."""

    def __init__(self, workdir: str, *, resume_step: int, tensorboard: bool, progress_bar: bool, total_steps: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.tb = None
        if tensorboard and jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.bar = None
        if progress_bar and jax.process_index() == 0:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=resume_step, file=sys.stderr, dynamic_ncols=True,
                            desc="train", mininterval=1.0)

    def _truncate_after(self, step: int):
        if not os.path.exists(self.path):
            return
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

    def write(self, step: int, metrics: dict):
        row = {"step": int(step)}
        row.update({k: v if isinstance(v, str) else float(np.asarray(v)) for k, v in metrics.items()})
        if jax.process_index() == 0:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and not isinstance(v, str):
                        self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            self.bar.set_postfix({k: f"{row[k]:.4g}" for k in ("loss", "eval_loss") if k in row}, refresh=False)
        return row

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.bar is not None:
            self.bar.close()
