"""Public MoE ops. Each data-moving op takes `impl=`: "xla" runs `reference.py`, "pallas" the kernels.

impl="xla" on CPU: `grouped_matmul` runs `tiled.py` (a scan over the row tiles each group touches)
instead of `ragged_dot`, which XLA:CPU computes as a masked product over every group (E times the
FLOPs); same results up to summation order.

The integer routing helpers (`sort_by_expert`, `capacity_positions`) are index bookkeeping with no
kernel planned, so they take no `impl`. `reference.py` stays the ground truth the kernels are tested
against.

impl="pallas", dropless path (kernels and per-platform choices in `kernel.py`):
  * `permute`: a `jax.custom_vjp`. Forward = row gather x[order // k]. Backward = the scatter-add of
    the row cotangents back to their tokens, done as a gather-combine with unit weights through the
    inverse permutation: dx[t] = sum_j dxs[inverse[t*k + j]] (float32 sum); no row scatter runs.
  * `grouped_matmul`: megablox on TPU (with its transposed-gmm / tgmm backward), `ragged_dot` on
    GPU; differentiable as is (no extra custom_vjp needed here).
  * `unpermute`: a `jax.custom_vjp`. Forward = gate-weighted combine through the inverse
    permutation. Backward = one kernel pass over the sorted rows: dy[i] = gate[order[i]] *
    dout[order[i] // k], and in the same pass dots[i] = <dout[order[i] // k], y[i]>, which is the
    gate cotangent of slot order[i] (scattered back by indexing with the inverse permutation).
Capacity ops (`capacity_dispatch`, `capacity_combine`) have no kernel: impl="pallas" runs the
reference (the layer uses them with either impl).
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import check_impl
from pallas_kernels.moe import kernel, reference, tiled

sort_by_expert = reference.sort_by_expert
capacity_positions = reference.capacity_positions


def permute(x: jax.Array, order: jax.Array, top_k: int, impl: str = "xla") -> jax.Array:
    """(T, d) -> (T*k, d) rows `x[order // top_k]`; see `reference.permute`."""
    check_impl(impl, "moe.permute")
    if impl == "pallas":
        return _permute_pallas(x, order, int(top_k))
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
    if impl == "pallas":
        return kernel.grouped_matmul(lhs, rhs, group_sizes, preferred_element_type)
    if jax.default_backend() == "cpu":  # no grouped matmul in XLA:CPU (module docstring)
        return tiled.grouped_matmul(lhs, rhs, group_sizes, preferred_element_type)
    return reference.grouped_matmul(lhs, rhs, group_sizes, preferred_element_type)


def unpermute(y_sorted: jax.Array, order: jax.Array, weights: jax.Array, impl: str = "xla") -> jax.Array:
    """(T*k, d) -> (T, d) gate-weighted sum over choices; see `reference.unpermute`."""
    check_impl(impl, "moe.unpermute")
    if impl == "pallas":
        return _unpermute_pallas(y_sorted, order, weights)
    return reference.unpermute(y_sorted, order, weights)


def capacity_dispatch(
    x: jax.Array,
    expert_ids: jax.Array,
    positions: jax.Array,
    capacity: int,
    num_experts: int,
    impl: str = "xla",
) -> jax.Array:
    """(G, S, d) -> (E, G, C, d) expert buffers; see `reference.capacity_dispatch`. No kernel:
    impl="pallas" runs the reference."""
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
    """(E, G, C, d) -> (G, S, d) gate-weighted gather; see `reference.capacity_combine`. No kernel:
    impl="pallas" runs the reference."""
    check_impl(impl, "moe.capacity_combine")
    return reference.capacity_combine(y, expert_ids, positions, weights, capacity)


# ------------------------------------------------------------------------------ pallas custom VJPs
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _permute_pallas(x, order, top_k):
    return kernel.gather_rows(x, order // top_k)  # [T*K, d]


def _permute_fwd(x, order, top_k):
    return _permute_pallas(x, order, top_k), order


def _permute_bwd(top_k, order, g):
    # Transpose of the gather: every token sums the cotangents of its k sorted rows.
    dx = kernel.weighted_combine(g, kernel.inverse_permutation(order), None, top_k)  # [T, d]
    return dx, None


_permute_pallas.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def _unpermute_pallas(y_sorted, order, weights):
    top_k = weights.shape[1]
    return kernel.weighted_combine(y_sorted, kernel.inverse_permutation(order), weights, top_k)


def _unpermute_fwd(y_sorted, order, weights):
    return _unpermute_pallas(y_sorted, order, weights), (y_sorted, order, weights)


def _unpermute_bwd(res, g):
    y_sorted, order, weights = res
    top_k = weights.shape[1]
    gates = weights.reshape(-1)[order]  # [T*K] gate of each sorted row
    # dy[i] = gates[i] * g[order[i] // k]; dots[i] = <g[order[i] // k], y_sorted[i]>.
    dy, dots = kernel.gather_combine(g, order // top_k, gates[:, None], y_sorted, top_k=1)
    dw = dots[:, 0][kernel.inverse_permutation(order)].reshape(weights.shape)  # [T, K]
    return dy, None, dw.astype(weights.dtype)


_unpermute_pallas.defvjp(_unpermute_fwd, _unpermute_bwd)
