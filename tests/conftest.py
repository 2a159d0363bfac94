"""Test defaults: CPU only (libtpu is installed for AOT compilation but there is no TPU here).

NPROC sizes XLA's CPU thread pool; Mosaic GPU interpret mode runs one thread per warpgroup and deadlocks when
the pool has fewer threads than the kernel has warpgroups (2-core CI machines), so it is raised before jax starts.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NPROC", "8")
