"""Test defaults: CPU only (libtpu is installed for AOT compilation but there is no TPU here).

NPROC sizes XLA's CPU thread pool; Mosaic GPU interpret mode runs one thread per warpgroup and deadlocks when
the pool has fewer threads than the kernel has warpgroups (2-core CI machines), so it is raised before jax starts.
"""
import contextlib
import faulthandler
import os
import sys

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


# Longest modules first. Under `pytest -n 2 --dist loadfile` each module runs whole on one worker, and xdist's
# default (--loadscope-reorder) hands out the modules with the most tests first, which leaves the few-test slow
# modules (the pipeline, the README, the notebook: 3-5 minutes each) for the end of the run, where one of them can
# keep a worker busy after the other has finished. pytest.ini turns that reorder off; this hook hands modules out
# longest first. Seconds per module (the sum of its tests of 10 s or more): the 2-core fresh-clone CI run of
# 7d75e7f (`.ci/run`). A module missing here keeps its place after these.
MODULE_SECONDS = {
    "test_grad_accum": 384, "test_pipeline": 301, "test_model": 269, "test_rl": 259, "test_sharding": 235,
    "test_attention_gpu": 229, "test_readme": 221, "test_notebook": 210, "test_rl_learns": 204,
    "test_fp8_prequantize": 190, "test_train": 167, "test_stage_protocol": 166, "test_reliability_killrun": 157,
    "test_attention_tpu": 157, "test_muon": 115, "test_stage_port": 102, "test_generate": 99, "test_cli_run": 98,
    "test_expert_parallel": 97, "test_moe_kernels": 86, "test_rejection_sampling_learn": 84,
    "test_generate_sharded": 76, "test_fp8_train": 71, "test_rejection_sampling_resume": 69, "test_midtrain": 68,
    "test_calibration_tuning": 68, "test_eval_memory": 61, "test_router": 60, "test_reliability_nonfinite": 50,
    "test_muon_clip": 50, "test_sft": 46, "test_fp8_model": 46, "test_restore_reshard": 41, "test_decode_moe": 41,
    "test_eval_cli": 39, "test_compile_aot": 38,
}


def pytest_collection_modifyitems(config, items):
    def module_seconds(item):
        return MODULE_SECONDS.get(os.path.splitext(os.path.basename(str(item.fspath)))[0], 0)
    items.sort(key=lambda item: -module_seconds(item))   # stable: a module's tests keep their order


# A hang that holds the GIL (seen: test_polar_kernel's Mosaic GPU interpret-mode run deadlocked, its threads in
# XLA:CPU's in-flight-computation semaphore) also stops pytest-timeout's Python timer thread, and then the whole
# run waits for CI's limit. faulthandler's watchdog is a C thread that needs no GIL: past WATCHDOG_S it prints every
# thread's Python stack and exits the worker, which xdist reports (naming the test) and replaces.
WATCHDOG_S = float(os.environ.get("KANANA_TEST_WATCHDOG_S", "1000"))   # past pytest.ini's timeout = 900


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
