"""Host allocator setting for XLA:CPU: keep freed memory in the process rather than unmapping it.

Why. XLA:CPU allocates all temporaries of one execution as a single block: 127 MB for the tiny
config's training step. glibc hands a block that large, requested from one of XLA's worker threads,
a fresh `mmap` (a thread arena's heap is capped at 64 MB, and the main heap's mmap threshold at
32 MB) and `munmap`s it when the execution ends, so every step page-faults its whole temporary
block back in: measured 27,000 minor faults and ~70 ms of kernel time per training step on the
2-core development machine, 30 % of the single-core step (benchmarks/RESULTS.md, "Host allocator").

What. `keep_freed_memory()` asks glibc (`mallopt`) for one malloc arena, no mmap'd chunks and a
1 GiB trim threshold: the block is carved from the main heap once, returned to it on free and
reused by the next step, with no page faults. The cost: memory freed by the process stays resident
(RSS keeps its peak), and threads share one arena lock (XLA's allocations are few and large).

When. Only the command-line entry points apply it: `cli.run` (every `python -m turbos_jax.*`, and
the benchmarks built on it) calls `keep_freed_memory()` before absl parses flags and before JAX
starts a backend and its thread pools, and only when JAX's backend will be the CPU
(`cli.expected_platform`, decided from JAX_PLATFORMS and the accelerator device files without
starting a backend): on a TPU or GPU host the step's temporaries live in device memory and the
setting would only keep host memory resident. The arena limit binds only threads that first
allocate after the call, so a program that started JAX computations first gets it only partly.
Importing `turbos_jax` changes nothing. Linux with glibc only; elsewhere nothing happens. Opt out
by setting the environment variable TURBOS_JAX_HOST_MALLOC=system; any other value than keep /
system stops the entry points with a one-line error naming the variable (`check_setting`). A
library user (notebook, own script) who wants the setting calls `keep_freed_memory()` first thing.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV_VAR = "TURBOS_JAX_HOST_MALLOC"
_CHOICES = ("keep", "system")

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        return ctypes.CDLL("libc.so.6")
    except (OSError, ValueError):
        return None


def check_setting() -> str:
    """TURBOS_JAX_HOST_MALLOC's value, "keep" (the default) or "system"; raises ValueError (one line,
    naming the variable) for any other."""
    choice = os.environ.get(ENV_VAR, "keep").strip().lower() or "keep"
    if choice not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {_CHOICES}")
    return choice


def keep_freed_memory() -> bool:
    """Applies the setting once per process; returns whether it is in effect.

    Raises ValueError for an unknown TURBOS_JAX_HOST_MALLOC value (one line, naming the variable).
    """
    global _applied
    if _applied is not None:
        return _applied
    libc = _glibc() if check_setting() == "keep" else None
    ok = libc is not None
    if ok:
        # mallopt returns 1 on success; apply all three or report failure.
        ok = all(
            libc.mallopt(p, v) == 1
            for p, v in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES))
        )
    _applied = ok
    return ok


def in_effect() -> bool:
    """Whether `keep_freed_memory` has applied the setting in this process."""
    return bool(_applied)
