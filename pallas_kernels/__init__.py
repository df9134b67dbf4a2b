"""Kernels for TurboS's hot paths, each with a pure-JAX reference that is also the fallback.

Every op takes `impl=`:
  * "xla": the pure-`jnp` reference (`reference.py` of the op's folder), any platform.
  * "pallas": the Pallas kernel for the platform the program is compiled for, chosen at lowering
    time by `by_platform`: Mosaic on TPU, Triton on NVIDIA GPUs, and the same kernel in Pallas
    interpret mode elsewhere (CPU), which is how the kernels are tested without accelerators.

`resolve_impl("auto")` is what a config's `kernel_impl = "auto"` means: "pallas" when the default
backend is a TPU or GPU, "xla" otherwise (interpret mode is for tests, far too slow to train with).
"""

from __future__ import annotations

import jax

IMPLS = ("xla", "pallas")


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """Maps a config's `kernel_impl` to an implementation an op accepts; `platform` defaults to
    the default backend ("tpu", "gpu", "cpu")."""
    if impl == "auto":
        platform = platform or jax.default_backend()
        return "pallas" if platform in ("tpu", "gpu", "cuda") else "xla"
    if impl not in IMPLS:
        raise ValueError(f"kernel impl {impl!r} is not available; choose from {IMPLS + ('auto',)}")
    return impl


def check_impl(impl: str, op: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not available; choose from {IMPLS}")


def by_platform(*args, tpu, gpu, other):
    """Calls `tpu(*args)`, `gpu(*args)` (CUDA) or `other(*args)` depending on the platform the
    enclosing computation is lowered for; only the chosen branch is lowered, so a Triton kernel is
    never lowered for a TPU and vice versa. Differentiable when the branches are."""
    return jax.lax.platform_dependent(*args, tpu=tpu, cuda=gpu, default=other)
