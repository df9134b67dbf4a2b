"""Pure-jnp MoE routing ops: ground truth for the Pallas kernels and the fallback on any platform.

Two families, one per routing mode of `turbos_jax.layers.moe.MoEFFN`:

Dropless (token-sorted) path, T tokens, k choices each, E experts:
  1. `sort_by_expert`: stable argsort of the flattened (T*k) expert ids -> `order`, plus per-expert
     row counts `group_sizes`.
  2. `permute`: gather token rows into expert-contiguous order, (T, d) -> (T*k, d).
  3. `grouped_matmul`: one matmul per contiguous group of rows with that expert's weight.
  4. `unpermute`: scatter rows back to (token, choice) slots, weight by the gates, sum over choices.

Capacity path, G groups of S tokens, buffers of C slots per expert and group:
  1. `capacity_positions`: slot of every (token, choice) inside its expert's buffer.
  2. `capacity_dispatch`: scatter tokens into expert-major (E, G, C, d) buffers, dropping slots >= C.
     Expert-major keeps the expert axis leading, so the expert matmuls are plain batched dots over
     E with (G*C, d) rows each (XLA would otherwise transpose (G, E, ...) operands in the backward).
  3. `capacity_combine`: gather expert outputs back, weighted by the gates; dropped choices give 0.

Expert ids outside [0, E) mean "no expert" (the MoE layer uses E for padding tokens): they are not
counted in `group_sizes` and sort after every real expert, so the rows they occupy lie beyond
`sum(group_sizes)` and `grouped_matmul` leaves them zero; they get position -1 on the capacity path
and are never dispatched. Everything here is differentiable by autodiff.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


# ---------------------------------------------------------------------------------------- dropless
def sort_by_expert(expert_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Orders the (token, choice) slots by expert.

    Args:
      expert_ids: (T, k) int, the experts chosen by each token.
      num_experts: E.

    Returns:
      order: (T*k,) int32, a stable argsort of `expert_ids.reshape(-1)`; entry i is the flat slot
        `t * k + j` whose row goes to sorted position i.
      group_sizes: (E,) int32 number of slots per expert (0 for unused experts). Ids outside
        [0, E) are not counted.
    """
    flat = expert_ids.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # [T*k]
    # Out-of-range ids are dropped rather than clipped into the last expert.
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat].add(1, mode="drop")  # [E]
    return order, group_sizes


def permute(x: jax.Array, order: jax.Array, top_k: int) -> jax.Array:
    """Gathers token rows into expert-sorted order: (T, d) -> (T*k, d), row i = x[order[i] // k]."""
    return jnp.take(x, order // top_k, axis=0)  # [T*k, d]


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type=None
) -> jax.Array:
    """Per-expert matmul over contiguous row groups.

    Args:
      lhs: (M, K) rows sorted by group; rows [sum(group_sizes[:e]), sum(group_sizes[:e+1])) use
        expert e.
      rhs: (E, K, N) one weight per group.
      group_sizes: (E,) int32, sum <= M.
      preferred_element_type: output/accumulation dtype; default lhs's dtype.

    Returns:
      (M, N); rows at or beyond `sum(group_sizes)` are zero.
    """
    return jax.lax.ragged_dot(
        lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=preferred_element_type
    )


def unpermute(y_sorted: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """Inverse of `permute`, weighted by the gates and summed over each token's choices.

    Args:
      y_sorted: (T*k, d) expert outputs in sorted order.
      order: (T*k,) from `sort_by_expert`.
      weights: (T, k) gate weights.

    Returns:
      (T, d) in y_sorted's dtype: out[t] = sum_j weights[t, j] * y_sorted[inv[t*k + j]], where inv
      is the inverse permutation of `order`; accumulated in float32.
    """
    t, k = weights.shape
    n = order.shape[0]
    # Inverting the permutation lets the combine be a gather (its transpose, a scatter-add, is
    # the only scatter in the backward pass).
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))  # [T*k]
    y = jnp.take(y_sorted, inverse, axis=0).reshape(t, k, -1)  # [T, k, d]
    out = jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weights.astype(jnp.float32))
    return out.astype(y_sorted.dtype)


# ---------------------------------------------------------------------------------------- capacity
def capacity_positions(expert_ids: jax.Array, num_experts: int) -> jax.Array:
    """Slot of every (token, choice) inside its expert's per-group buffer, in token order.

    Priority inside a group: token 0's choices (first, then second, ...), then token 1's, and so on.
    A slot that turns out to be >= capacity is dropped, so under overflow the latest tokens lose
    their choices first. Token-major order keeps routing causal: whether token t keeps a choice
    depends only on tokens <= t (GShard's choice-major order lets a later token's first choice evict
    an earlier token's second choice, which leaks the future in a causal LM).

    Algorithm:
      1. One-hot the ids: mask[g, s, j, e] = (expert_ids[g, s, j] == e); out-of-range ids give an
         all-zero row and so take no slot.
      2. Flatten to priority order (token-major, then choice): (G, S*k, E).
      3. Exclusive cumulative sum along the priority axis: the number of earlier claims on e.
      4. Read it at each slot's own expert, restore (G, S, k); "no expert" slots get -1.

    Args:
      expert_ids: (G, S, k) int.
      num_experts: E.

    Returns:
      positions: (G, S, k) int32, 0-based slot index, -1 for ids outside [0, E).
    """
    g, s, k = expert_ids.shape
    mask = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.int32)  # [G, S, K, E]
    prio = mask.reshape(g, s * k, num_experts)  # [G, S*K, E]
    earlier = jnp.cumsum(prio, axis=1) - prio  # [G, S*K, E] claims before this slot
    pos = jnp.sum(earlier * prio, axis=-1).reshape(g, s, k)  # [G, S, K]
    in_range = (expert_ids >= 0) & (expert_ids < num_experts)
    return jnp.where(in_range, pos, -1).astype(jnp.int32)


def _kept(expert_ids, positions, capacity, num_experts):
    return (
        (positions >= 0)
        & (positions < capacity)
        & (expert_ids >= 0)
        & (expert_ids < num_experts)
    )  # [G, S, K]


def capacity_dispatch(
    x: jax.Array, expert_ids: jax.Array, positions: jax.Array, capacity: int, num_experts: int
) -> jax.Array:
    """Scatters tokens into per-expert buffers.

    Algorithm:
      1. A (token, choice) is kept iff its id is in [0, E) and 0 <= position < capacity.
      2. Dropped slots are redirected to an out-of-bounds index (E, C), which the scatter drops;
         negative indices would wrap, hence the explicit redirect.
      3. Scatter-add x[g, s] into buf[e, g, pos]; kept slots are unique per (e, g, pos), so add is
         a plain write and its transpose is a gather.

    Args:
      x: (G, S, d) tokens.
      expert_ids: (G, S, k) int.
      positions: (G, S, k) int from `capacity_positions`.
      capacity: C, slots per expert and group.
      num_experts: E.

    Returns:
      (E, G, C, d) in x's dtype; empty slots are zero.
    """
    g, s, k = expert_ids.shape
    kept = _kept(expert_ids, positions, capacity, num_experts)  # [G, S, K]
    e_idx = jnp.where(kept, expert_ids, num_experts)  # [G, S, K]
    c_idx = jnp.where(kept, positions, capacity)  # [G, S, K]
    g_idx = jnp.broadcast_to(jnp.arange(g)[:, None, None], (g, s, k))  # [G, S, K]
    updates = jnp.broadcast_to(x[:, :, None, :], (g, s, k, x.shape[-1]))  # [G, S, K, d]
    buf = jnp.zeros((num_experts, g, capacity, x.shape[-1]), x.dtype)  # [E, G, C, d]
    return buf.at[e_idx, g_idx, c_idx].add(updates, mode="drop")


def capacity_combine(
    y: jax.Array,
    expert_ids: jax.Array,
    positions: jax.Array,
    weights: jax.Array,
    capacity: int,
) -> jax.Array:
    """Gathers expert outputs back to tokens, weighted by the gates.

    Algorithm:
      1. Clip (expert, slot) indices into range so the gather is always in bounds.
      2. Gather y[e, g, pos] for every (token, choice): (G, S, k, d).
      3. Zero the weights of dropped / "no expert" choices, sum weight * row over k in float32.

    Args:
      y: (E, G, C, d) expert outputs.
      expert_ids: (G, S, k) int.
      positions: (G, S, k) int from `capacity_positions`.
      weights: (G, S, k) gate weights.
      capacity: C (must equal y.shape[2]).

    Returns:
      (G, S, d) in y's dtype.
    """
    num_experts, g, c, _ = y.shape
    if c != capacity:
        raise ValueError(f"capacity_combine: y has {c} slots per expert, capacity={capacity}")
    kept = _kept(expert_ids, positions, capacity, num_experts)  # [G, S, K]
    e_idx = jnp.clip(expert_ids, 0, num_experts - 1)  # [G, S, K]
    c_idx = jnp.clip(positions, 0, capacity - 1)  # [G, S, K]
    g_idx = jnp.arange(g)[:, None, None]  # [G, 1, 1]
    rows = y[e_idx, g_idx, c_idx]  # [G, S, K, d]
    w = jnp.where(kept, weights.astype(jnp.float32), 0.0)  # [G, S, K]
    out = jnp.einsum("gskd,gsk->gsd", rows.astype(jnp.float32), w)
    return out.astype(y.dtype)
