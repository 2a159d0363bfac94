"""Multi-host (multi-controller) start-up: one Python process per host, all running the same program.

On a Cloud TPU pod slice (gcloud tpu-vm ssh --worker=all, or an xpk/GKE JobSet) every host runs the same
command; `initialize()` calls `jax.distributed.initialize()`, which finds the coordinator and this host's index
from the TPU metadata (or from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID when set). After that
`jax.devices()` lists every chip of the slice, `jax.process_index()` / `jax.process_count()` say which host this is,
and each host feeds its share of every batch: `pipeline.make_iterator(..., shard_index=jax.process_index(),
shard_count=jax.process_count())` yields rows [i*B/P, (i+1)*B/P) of the global batch and `sharding.put_batch`
assembles the global array from the hosts' rows. Checkpoints are written by all hosts together (orbax).
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("kanana_jax.parallel")

_ENV_COORDINATOR = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS")


def is_multihost_environment(environ=None) -> bool:
    """True when this process is one of several hosts: a multi-host TPU slice or an explicit JAX coordinator."""
    env = os.environ if environ is None else environ
    if any(env.get(k) for k in _ENV_COORDINATOR):
        return True
    if int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1:
        return True
    hostnames = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hostnames) > 1:
        return True
    return int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1


def initialize(force: bool = False) -> dict:
    """Starts the JAX distributed runtime when running on several hosts (or `force`); safe to call once per
    process before any other JAX call. Returns {'process_index', 'process_count', 'devices', 'local_devices'}."""
    if (force or is_multihost_environment()) and not jax.distributed.is_initialized():
        explicit = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            explicit["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
        if os.environ.get("JAX_PROCESS_ID"):
            explicit["process_id"] = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(**explicit)  # coordinator: JAX_COORDINATOR_ADDRESS or auto-detected
    info = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count()}
    if info["process_count"] > 1:
        log.warning("host %d of %d: %d local of %d devices", info["process_index"], info["process_count"],
                    info["local_devices"], info["devices"])
    return info


def check_batch_divides(global_batch_size: int, process_count: int | None = None):
    """Raises when the global batch cannot be split evenly over the hosts (each loads B/P rows)."""
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"data.global_batch_size={global_batch_size} is not a multiple of the {process_count} "
                         "hosts; each host loads an equal share, so pick a multiple of the host count")
