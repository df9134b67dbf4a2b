"""Test set-up: 8 fake CPU devices, fast CPU compiles, a shared compilation cache, configs on path.

Set before JAX initialises its backend:
  * 8 fake host devices for the multi-device tests.
  * XLA backend optimisation level 0: test programs are tiny, so compile time dominates; this
    halves it without changing results.
  * An empty YNNPACK fusion type: works around a jaxlib 0.10 CPU crash (segfault inside XLA's
    YNNPACK fusions) on some vmap-of-vjp programs such as the jacobians in the causality tests.
  * A persistent compilation cache, so tests that build the same model compile it once.
  * libtpu may be loaded by several test processes (it only compiles for TPU slices here).
"""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_force_host_platform_device_count=8",
        "--xla_backend_optimization_level=0",
        "--xla_cpu_experimental_ynn_fusion_type=",
    ]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (TPU AOT tests) takes a lock file; xdist workers each load it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("TURBOS_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "turbos_jax_test_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
