"""Test defaults: CPU only (libtpu is installed for AOT compilation but there is no TPU here).

NPROC sizes XLA's CPU thread pool; Mosaic GPU interpret mode runs one thread per warpgroup and deadlocks when
the pool has fewer threads than the kernel has warpgroups (2-core CI machines), so it is raised before jax starts.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NPROC", "8")
# Many tests compile the same tiny train steps, samplers and kernels (in-process and in the subprocesses they
# start, which inherit the environment): a persistent compilation cache shared by the xdist workers compiles
# each program once per machine. Keys include the whole HLO and flags, so a cached executable is the same program.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                "kanana_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
