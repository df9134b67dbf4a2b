"""Persistent XLA compilation cache for the entry points (`config.compilation_cache_dir`).

Why. A rerun of the same config with the same code and JAX version loads its compiled programs
from disk instead of compiling them (the tiny config's train step: ~15 s of compile on 2 CPU cores).
On XLA:CPU it also makes every step faster: compiling in the training process leaves glibc's heap
fragmented (one arena, see host_memory.py), and the ~2,000 workspace allocations per step of the
oneDNN matmuls behind XLA's non-fused dots then walk long free lists (`perf`: 11-16 % of the step's
CPU time in `_int_malloc` after an in-process compile, under 1 % when the step was loaded from the
cache). Measured on the quickstart (benchmarks/RESULTS.md, "Compilation cache"): a rerun takes
about half the wall time of a first run and its steps run 20-35 % faster.

How. `enable(path)` points JAX's persistent cache at `path` before the first compile:
  1. A cache directory JAX already has (the JAX_COMPILATION_CACHE_DIR environment variable, or
     `jax.config.update("jax_compilation_cache_dir", ...)` by the caller) is kept: the
     environment and the caller outrank the config file.
  2. An empty path turns the cache off for this run.
  3. Otherwise `~` is expanded and the directory created; a path that cannot be created is a
     ConfigError naming `config.compilation_cache_dir`.
Multi-process CPU runs turn the cache off (distributed.py says why); `enable` then reports None.
Entries are keyed by the program, compile options, devices and JAX/XLA version, so a stale entry
is never used for a different program; deleting the directory only costs a recompile.
"""

from __future__ import annotations

import os

import jax

from turbos_jax.config import ConfigError

CONFIG_KEY = "compilation_cache_dir"


def enable(path: str) -> str | None:
    """Turns on JAX's persistent compilation cache; returns the directory in use, or None if off."""
    if not isinstance(path, str):
        raise ConfigError(f"config.{CONFIG_KEY}={path!r}: expected a directory path or ''")
    if not jax.config.jax_enable_compilation_cache:
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if not path.strip():
        return None
    directory = os.path.abspath(os.path.expanduser(path.strip()))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"config.{CONFIG_KEY}={path!r}: cannot create the directory "
            f"({e.strerror or type(e).__name__}); set another path, or '' to "
            "compile every run"
        ) from None
    if not os.access(directory, os.W_OK):
        raise ConfigError(
            f"config.{CONFIG_KEY}={path!r}: directory is not writable; set another "
            "path, or '' to compile every run"
        )
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory
