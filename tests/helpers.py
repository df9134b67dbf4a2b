"""Helpers shared by the test files: the repository root, the environment of CLI runs in child
processes, and closeness measured relative to the largest reference magnitude.

Import as `from helpers import ...` (pytest puts tests/ on sys.path; so does running a test file as
a script, as tests/test_multihost.py's workers are).
"""

from __future__ import annotations

import os

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA flags conftest.py sets for the in-process tests that child processes do not inherit: the fake
# device count (children get one device unless asked) and the -O0 backend (children that run real
# steps keep XLA's default optimisation level).
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_OPT_LEVEL_FLAG = "--xla_backend_optimization_level"


def subprocess_env(
    *, devices: int | None = None, share_cache: bool = True, fast_compile: bool = False, **overrides: str
) -> dict:
    """The environment for running a CLI (`python -m turbos_jax.train ...`) in a child process.

    * XLA_FLAGS without the test-only flags above (fast_compile keeps conftest's -O0 backend, for
      children whose run time is all compiling); `devices` = N adds N fake CPU devices (and sets
      JAX_PLATFORMS=cpu); other flags (the YNNPACK workaround) are kept.
    * ROOT on PYTHONPATH; no inherited multi-process coordinates (JAX_COORDINATOR_ADDRESS, ...).
    * share_cache: the tests' persistent compilation cache with conftest's thresholds, so runs of
      the same shapes compile once; False removes every JAX_COMPILATION_CACHE* variable (tests of
      the cache itself, multi-process CPU jobs).
    * `overrides`: further variables, set last.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    drop = (_DEVICES_FLAG,) if fast_compile else (_DEVICES_FLAG, _OPT_LEVEL_FLAG)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(drop)]
    if devices is not None:
        flags.append(f"{_DEVICES_FLAG}={devices}")
        env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    if share_cache:
        import jax

        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(overrides)
    return env


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (in float64): robust to entries near zero."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / (np.max(np.abs(expected)) + 1e-30))


def assert_close(actual, expected, tol: float, name: str = "") -> float:
    """Asserts equal shapes, finite `actual` and max_rel_err <= tol; returns the error."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.isfinite(np.asarray(actual, np.float64)).all(), f"{name}: non-finite values"
    err = max_rel_err(actual, expected)
    scale = float(np.max(np.abs(np.asarray(expected, np.float64))))
    assert err <= tol, f"{name}: max error {err:.2e} relative to max |ref| {scale:.2e} > {tol:.1e}"
    return err


def wait_for_checkpoint(workdir: str, step: int, proc, timeout: float = 300) -> None:
    """Waits until `workdir`'s checkpoint `step` is complete (Orbax renames its finished temporary
    directory to exactly checkpoints/<step>); fails if `proc` exits or `timeout` seconds pass."""
    import time

    path = os.path.join(workdir, "checkpoints", str(step))
    end = time.time() + timeout
    while not os.path.isdir(path):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < end, f"no checkpoint {step} appeared in {timeout} s"
        time.sleep(0.02)


def logged_losses(workdir: str) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl."""
    from turbos_jax.metrics import read_jsonl

    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in r}


def gpu_available() -> bool:
    """Whether JAX sees a GPU (tests/conftest.py keeps JAX on the CPU unless JAX_PLATFORMS is set:
    run GPU classes with JAX_PLATFORMS=cuda,cpu, as benchmarks/gpu_check.sh does)."""
    import jax

    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


GPU_SKIP_REASON = (
    "no CUDA GPU visible to JAX (tests/conftest.py sets JAX_PLATFORMS=cpu unless it is set: run with "
    "JAX_PLATFORMS=cuda,cpu on a GPU)"
)


def training_batch(tokens, segment_ids) -> dict:
    """The trainer's batch dict from tokens (B, L + 1) and segment_ids (B, L) (0 = padding): inputs,
    targets, the per-document positions the data pipeline would give, and a loss mask off padding."""
    import jax.numpy as jnp

    from turbos_jax.model import segment_positions

    tokens, segment_ids = np.asarray(tokens, np.int32), np.asarray(segment_ids, np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": segment_ids,
        "positions": np.asarray(segment_positions(jnp.asarray(segment_ids))),
        "loss_mask": (segment_ids != 0).astype(np.float32),
    }
