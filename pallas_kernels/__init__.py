"""Kernels for TurboS's hot paths, each with a pure-JAX reference that is also the fallback.

Every op takes `impl=`:
  * "xla": the pure-`jnp` reference (`reference.py` of the op's folder), any platform.
  * "pallas": the Pallas kernel for the platform the program is compiled for, chosen at lowering
    time by `by_platform`: Mosaic on TPU, Triton on NVIDIA GPUs, and the same kernel in Pallas
    interpret mode elsewhere (CPU), which is how the kernels are tested without accelerators.

`resolve_impl("auto")` is what a config's `kernel_impl = "auto"` means: "pallas" when the default
backend is a TPU or an NVIDIA GPU of compute capability 8.0 or later (Ampere on: the Triton kernels'
bf16 dots need it), "xla" otherwise, with a one-line warning on an older GPU such as Colab's T4
(interpret mode on CPU is for tests, far too slow to train with).
"""

from __future__ import annotations

import functools
import warnings

import jax

IMPLS = ("xla", "pallas")
MIN_GPU_COMPUTE_CAPABILITY = (8, 0)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """Maps a config's `kernel_impl` to an implementation an op accepts; `platform` defaults to
    the default backend ("tpu", "gpu", "cpu")."""
    if impl == "auto":
        platform = platform or jax.default_backend()
        if platform in ("gpu", "cuda"):
            return "pallas" if _gpu_runs_pallas() else "xla"
        return "pallas" if platform == "tpu" else "xla"
    if impl not in IMPLS:
        raise ValueError(f"kernel impl {impl!r} is not available; choose from {IMPLS + ('auto',)}")
    return impl


@functools.cache
def _gpu_runs_pallas() -> bool:
    """Whether the first GPU can run the Triton kernels; warns once when it cannot. A device that
    does not report a compute capability (not a GPU, or an unknown kind) is given the kernels."""
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    try:
        major, minor = (int(part) for part in str(capability).split(".")[:2])
    except ValueError:
        return True
    if (major, minor) >= MIN_GPU_COMPUTE_CAPABILITY:
        return True
    warnings.warn(
        f"kernel_impl='auto': {device.device_kind} has compute capability {major}.{minor}; the Pallas "
        f"GPU kernels need {'.'.join(map(str, MIN_GPU_COMPUTE_CAPABILITY))} or later, so the XLA "
        "reference ops run instead",
        stacklevel=3,
    )
    return False


def check_impl(impl: str, op: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not available; choose from {IMPLS}")


def by_platform(*args, tpu, gpu, other):
    """Calls `tpu(*args)`, `gpu(*args)` (CUDA) or `other(*args)` depending on the platform the
    enclosing computation is lowered for; only the chosen branch is lowered, so a Triton kernel is
    never lowered for a TPU and vice versa. Differentiable when the branches are."""
    return jax.lax.platform_dependent(*args, tpu=tpu, cuda=gpu, default=other)
