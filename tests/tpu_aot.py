"""Ahead-of-time compilation of kernels for a TPU slice on this CPU host (shared by kernel tests).

libtpu describes the slice (`jax.experimental.topologies`) and compiles for it; nothing runs. It comes
with the test extra (`jax[tpu]`); a checkout without it can point TURBOS_TEST_LIBTPU_PATH at a
`pip install --target DIR libtpu==<version matching jax>`. Where libtpu is installed (always, with
the test extra) a failure to describe or compile for the slice fails the test; only where it is not
installed at all are these tests skipped, with the reason.

Mosaic kernels compile only inside `shard_map` over a mesh of TPU devices, so `compile_for_tpu`
wraps the function in a one-device `shard_map` and returns the optimised HLO text; tests assert the
`tpu_custom_call` targets are there (forward, and backward when they differentiate).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import jax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # libtpu otherwise queries a TPU VM's metadata
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")

MOSAIC_TARGET = 'custom_call_target="tpu_custom_call"'


def libtpu_installed() -> bool:
    """libtpu is importable here or in TURBOS_TEST_LIBTPU_PATH: TPU compile tests must then pass."""
    extra = os.environ.get("TURBOS_TEST_LIBTPU_PATH")
    if extra and extra not in sys.path:
        sys.path.append(extra)
    return importlib.util.find_spec("libtpu") is not None


def skip_without_libtpu() -> None:
    if not libtpu_installed():
        pytest.skip(
            "libtpu is not installed: pip install -e '.[test]' (jax[tpu]) or set TURBOS_TEST_LIBTPU_PATH"
        )


@functools.cache
def tpu_devices(topology: str = "v5p:2x2x1"):
    skip_without_libtpu()
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology, "tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu failures raise plain RuntimeErrors
        pytest.fail(f"libtpu is installed but could not describe {topology}: {str(e).strip()[:300]}")


def compile_for_tpu(fn, *abstract_args, topology: str = "v5p:2x2x1") -> str:
    """Compiles `fn(*abstract_args)` (ShapeDtypeStructs, replicated) for one chip of `topology`
    inside a one-device shard_map; returns the compiled HLO text."""
    mesh = Mesh(tpu_devices(topology)[:1], ("x",))
    replicated = NamedSharding(mesh, P())
    args = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated) if a is not None else None
        for a in abstract_args
    ]
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    return jax.jit(mapped).lower(*args).compile().as_text()


def count_mosaic_calls(hlo_text: str) -> int:
    return hlo_text.count(MOSAIC_TARGET)
