"""Public MoE ops. Each data-moving op takes `impl=` and dispatches; only "xla" exists so far.

The integer routing helpers (`sort_by_expert`, `capacity_positions`) are index bookkeeping with no
kernel planned, so they take no `impl`. Kernels (and their custom_vjp) are added here per op;
`reference.py` stays the ground truth they are tested against.
"""

from __future__ import annotations

import jax

from pallas_kernels import check_impl
from pallas_kernels.moe import reference

sort_by_expert = reference.sort_by_expert
capacity_positions = reference.capacity_positions


def permute(x: jax.Array, order: jax.Array, top_k: int, impl: str = "xla") -> jax.Array:
    """(T, d) -> (T*k, d) rows `x[order // top_k]`; see `reference.permute`."""
    check_impl(impl, "moe.permute")
    return reference.permute(x, order, top_k)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    preferred_element_type=None,
    impl: str = "xla",
) -> jax.Array:
    """(M, K) x (E, K, N) -> (M, N) per contiguous row group; see `reference.grouped_matmul`."""
    check_impl(impl, "moe.grouped_matmul")
    return reference.grouped_matmul(lhs, rhs, group_sizes, preferred_element_type)


def unpermute(
    y_sorted: jax.Array, order: jax.Array, weights: jax.Array, impl: str = "xla"
) -> jax.Array:
    """(T*k, d) -> (T, d) gate-weighted sum over choices; see `reference.unpermute`."""
    check_impl(impl, "moe.unpermute")
    return reference.unpermute(y_sorted, order, weights)


def capacity_dispatch(
    x: jax.Array,
    expert_ids: jax.Array,
    positions: jax.Array,
    capacity: int,
    num_experts: int,
    impl: str = "xla",
) -> jax.Array:
    """(G, S, d) -> (G, E, C, d) expert buffers; see `reference.capacity_dispatch`."""
    check_impl(impl, "moe.capacity_dispatch")
    return reference.capacity_dispatch(x, expert_ids, positions, capacity, num_experts)


def capacity_combine(
    y: jax.Array,
    expert_ids: jax.Array,
    positions: jax.Array,
    weights: jax.Array,
    capacity: int,
    impl: str = "xla",
) -> jax.Array:
    """(G, E, C, d) -> (G, S, d) gate-weighted gather; see `reference.capacity_combine`."""
    check_impl(impl, "moe.capacity_combine")
    return reference.capacity_combine(y, expert_ids, positions, weights, capacity)
