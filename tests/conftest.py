"""Test defaults: CPU only (libtpu is installed for AOT compilation but there is no TPU here).

NPROC sizes XLA's CPU thread pool; Mosaic GPU interpret mode runs one thread per warpgroup and deadlocks when
the pool has fewer threads than the kernel has warpgroups (2-core CI machines), so it is raised before jax starts.
"""
import contextlib
import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("NPROC", "8")
# the CLI's XLA:CPU flags (kanana_jax/cli.py CPU_XLA_FLAGS: faster compiles, same numbers) for in-process tests too
from kanana_jax.cli import with_cpu_flags  # noqa: E402  (stdlib imports only: jax is not started)
os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""))
# Many tests compile the same tiny train steps, samplers and kernels (in-process and in the subprocesses they
# start, which inherit the environment): a persistent compilation cache shared by the xdist workers compiles
# each program once per machine. Keys include the whole HLO and flags, so a cached executable is the same program.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                "kanana_jax_test_compile_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@contextlib.contextmanager
def _own_compile_cache(directory: str):
    """Every program compiled inside goes to (and is read from) a cache of its own in `directory`, whatever its
    compile time: tests that launch one config several times (resumes, rounds) compile each program once. The
    session's cache settings come back afterwards."""
    import jax
    from jax._src import compilation_cache
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for k, v in before.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()


@pytest.fixture
def compile_cache(tmp_path):
    """A compilation cache of this test's own (`_own_compile_cache`)."""
    with _own_compile_cache(str(tmp_path / "jax_cache")):
        yield


@pytest.fixture(scope="module")
def module_compile_cache(tmp_path_factory):
    """A compilation cache shared by one module's tests (`_own_compile_cache`)."""
    with _own_compile_cache(str(tmp_path_factory.mktemp("jax_cache"))):
        yield
