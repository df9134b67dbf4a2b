"""Mixture-of-Experts routing ops (dropless sort/permute/grouped matmul and token-order capacity)."""

from pallas_kernels.moe import reference
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
    "permute",
    "reference",
    "sort_by_expert",
    "unpermute",
]
