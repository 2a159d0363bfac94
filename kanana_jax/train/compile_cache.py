"""A run folder's own persistent compilation cache, so that a relaunched run loads what the killed one compiled.

The pipeline (train/stages/pipeline.py) runs its stages inside `persistent_cache(WORKDIR/compile_cache)`: every
program that took over jax's `jax_persistent_cache_min_compile_time_secs` to compile is written there (keyed by the
whole program and the compiler flags, so an entry is the same executable), and a relaunch after a kill finds the
interrupted stage's train step and samplers there instead of compiling them again. A cache configured already
(`jax_compilation_cache_dir`, e.g. JAX_COMPILATION_CACHE_DIR) is used as it is. An entry cut short by a kill is
reported by jax as unreadable and compiled again.

Tried and not kept (2026-12-01, tiny pipeline on a 2-core CPU): compiling each later stage's functions on a
background thread while earlier stages ran (at nice 19 too) made the run slower, 5m49s -> 6m19s / 6m30s: XLA's CPU
compiler and the loop's steps already keep both cores busy, so the thread only moved compile time into the stage
it overlapped.
"""
from __future__ import annotations

import contextlib
import os

import jax


@contextlib.contextmanager
def persistent_cache(directory: str):
    """jax's persistent compilation cache in `directory` for the block, unless one is configured already (then
    that one is used and left as it is). Yields the directory in use."""
    from jax._src import compilation_cache
    if jax.config.jax_compilation_cache_dir:
        yield jax.config.jax_compilation_cache_dir
        return
    os.makedirs(directory, exist_ok=True)
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", directory)
    try:
        yield directory
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()
