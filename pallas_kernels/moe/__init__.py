"""Mixture-of-Experts routing ops (dropless sort/permute/grouped matmul and token-order capacity).

`ops` (re-exported here) is the public API; `kernel` dispatches the Pallas kernels per platform
(`kernel_tpu`: Mosaic, `kernel_gpu`: Triton, megablox / ragged_dot for the grouped matmul).
"""

from pallas_kernels.moe import kernel, kernel_gpu, kernel_tpu, reference
from pallas_kernels.moe.ops import (
    capacity_combine,
    capacity_dispatch,
    capacity_positions,
    grouped_matmul,
    permute,
    sort_by_expert,
    unpermute,
)

__all__ = [
    "capacity_combine",
    "capacity_dispatch",
    "capacity_positions",
    "grouped_matmul",
    "kernel",
    "kernel_gpu",
    "kernel_tpu",
    "permute",
    "reference",
    "sort_by_expert",
    "unpermute",
]
