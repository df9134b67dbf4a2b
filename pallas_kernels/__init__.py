"""Kernels for TurboS's hot paths, each with a pure-JAX reference that is also the fallback.

Every op takes `impl=`: "xla" runs the reference (any platform). Pallas implementations (TPU Mosaic,
GPU) are added per op; `resolve_impl("auto")` picks the fastest implementation available.
"""

IMPLS = ("xla",)


def resolve_impl(impl: str) -> str:
    """Maps a config's `kernel_impl` to an implementation an op accepts."""
    if impl == "auto":
        return "xla"
    if impl not in IMPLS:
        raise ValueError(f"kernel impl {impl!r} is not available; choose from {IMPLS + ('auto',)}")
    return impl


def check_impl(impl: str, op: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not available; choose from {IMPLS}")
