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
  2. `capacity_dispatch`: copy tokens into expert-major (E, G, C, d) buffers, dropping slots >= C.
     Expert-major keeps the expert axis leading, so the expert matmuls are plain batched dots over
     E with (G*C, d) rows each (XLA would otherwise transpose (G, E, ...) operands in the backward).
  3. `capacity_combine`: gather expert outputs back, weighted by the gates; dropped choices give 0.
  Both are row gathers in the forward and the backward pass (custom VJPs over one int32 scatter of
  slot -> choice indices): no (E, G, C, d) zero buffer is copied and scattered into.

Expert ids outside [0, E) mean "no expert" (the MoE layer uses E for padding tokens): they are not
counted in `group_sizes` and sort after every real expert, so the rows they occupy lie beyond
`sum(group_sizes)` and `grouped_matmul` leaves them zero; they get position -1 on the capacity path
and are never dispatched. Everything here is differentiable (autodiff, or the custom VJPs above).
"""

from __future__ import annotations

import functools

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
        (positions >= 0) & (positions < capacity) & (expert_ids >= 0) & (expert_ids < num_experts)
    )  # [G, S, K]


def _slot_sources(expert_ids, positions, capacity: int, num_experts: int) -> jax.Array:
    """(E, G, C) int32: the flat choice index s * k + j that fills each slot; S * k if empty.

    The capacity path's only scatter, and it moves int32 indices (G * S * k of them), not rows:
    with it, dispatch, combine and both their backward passes are row gathers.
    """
    g, s, k = expert_ids.shape
    kept = _kept(expert_ids, positions, capacity, num_experts)  # [G, S, K]
    # Dropped choices go to an out-of-bounds (E, C) index, which mode="drop" skips; negative
    # indices would wrap.
    e_idx = jnp.where(kept, expert_ids, num_experts)  # [G, S, K]
    c_idx = jnp.where(kept, positions, capacity)  # [G, S, K]
    g_idx = jnp.broadcast_to(jnp.arange(g)[:, None, None], (g, s, k))  # [G, S, K]
    flat = jnp.broadcast_to(jnp.arange(s * k, dtype=jnp.int32).reshape(1, s, k), (g, s, k))
    empty = jnp.full((num_experts, g, capacity), s * k, jnp.int32)  # [E, G, C]
    return empty.at[e_idx, g_idx, c_idx].set(flat, mode="drop")


def _slot_rows(v: jax.Array, src: jax.Array, top_k: int) -> jax.Array:
    """(G, S, d) -> (E, G, C, d): slot (e, g, c) takes row src // k of group g; 0 if empty."""
    g = v.shape[0]
    tok = src // top_k  # [E, G, C]; S (out of bounds) for an empty slot
    return v.at[jnp.arange(g)[None, :, None], tok].get(mode="fill", fill_value=0)


def _choice_rows(y: jax.Array, expert_ids, positions) -> jax.Array:
    """(E, G, C, d) -> (G, S, k, d): the slot row of every choice (clipped in range; callers mask
    dropped and "no expert" choices)."""
    num_experts, g, capacity, _ = y.shape
    e_idx = jnp.clip(expert_ids, 0, num_experts - 1)  # [G, S, K]
    c_idx = jnp.clip(positions, 0, capacity - 1)  # [G, S, K]
    return y[e_idx, jnp.arange(g)[:, None, None], c_idx]  # [G, S, K, d]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def capacity_dispatch(
    x: jax.Array, expert_ids: jax.Array, positions: jax.Array, capacity: int, num_experts: int
) -> jax.Array:
    """Copies tokens into per-expert buffers.

    Algorithm:
      1. A (token, choice) is kept iff its id is in [0, E) and 0 <= position < capacity; kept
         choices have unique (e, g, pos) slots.
      2. `_slot_sources`: for every slot, the choice that fills it (an int32 scatter).
      3. Gather buf[e, g, c] = x[g, source token], zero for empty slots.
      Backward (custom VJP): dx[g, s] = sum over kept choices j of dbuf[e_j, g, pos_j], a gather.
      Autodiff of a row scatter would instead copy a zero (E, G, C, d) buffer and scatter into it
      (measured on XLA:CPU, tiny config: those copies alone ~0.5 ms per MoE layer and pass).

    Args:
      x: (G, S, d) tokens.
      expert_ids: (G, S, k) int.
      positions: (G, S, k) int from `capacity_positions`.
      capacity: C, slots per expert and group.
      num_experts: E.

    Returns:
      (E, G, C, d) in x's dtype; empty slots are zero.
    """
    src = _slot_sources(expert_ids, positions, capacity, num_experts)  # [E, G, C]
    return _slot_rows(x, src, expert_ids.shape[-1])  # [E, G, C, d]


def _dispatch_fwd(x, expert_ids, positions, capacity, num_experts):
    return capacity_dispatch(x, expert_ids, positions, capacity, num_experts), (expert_ids, positions)


def _dispatch_bwd(capacity, num_experts, res, dbuf):
    expert_ids, positions = res
    kept = _kept(expert_ids, positions, capacity, num_experts)  # [G, S, K]
    rows = _choice_rows(dbuf, expert_ids, positions)  # [G, S, K, d]
    dx = jnp.sum(jnp.where(kept[..., None], rows, 0).astype(jnp.float32), axis=2)
    return dx.astype(dbuf.dtype), None, None


capacity_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def capacity_combine(
    y: jax.Array,
    expert_ids: jax.Array,
    positions: jax.Array,
    weights: jax.Array,
    capacity: int,
) -> jax.Array:
    """Gathers expert outputs back to tokens, weighted by the gates.

    Algorithm:
      1. Gather y[e, g, pos] for every (token, choice), indices clipped into range: (G, S, k, d).
      2. Zero the weights of dropped / "no expert" choices, sum weight * row over k in float32.
      Backward (custom VJP): dy[e, g, c] = weight of the slot's choice * dout[g, its token], a
      gather through `_slot_sources` (autodiff would scatter-add into a zero (E, G, C, d) buffer);
      dweights[g, s, j] = <dout[g, s], row j> for kept choices.

    Args:
      y: (E, G, C, d) expert outputs.
      expert_ids: (G, S, k) int.
      positions: (G, S, k) int from `capacity_positions`.
      weights: (G, S, k) gate weights.
      capacity: C (must equal y.shape[2]).

    Returns:
      (G, S, d) in y's dtype.
    """
    c = y.shape[2]
    if c != capacity:
        raise ValueError(f"capacity_combine: y has {c} slots per expert, capacity={capacity}")
    return _combine(y, expert_ids, positions, weights, capacity, y.shape[0])


def _combine_parts(y, expert_ids, positions, weights, capacity, num_experts):
    kept = _kept(expert_ids, positions, capacity, num_experts)  # [G, S, K]
    rows = _choice_rows(y, expert_ids, positions)  # [G, S, K, d]
    w = jnp.where(kept, weights.astype(jnp.float32), 0.0)  # [G, S, K]
    out = jnp.einsum("gskd,gsk->gsd", rows.astype(jnp.float32), w)
    return out.astype(y.dtype), rows, w


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _combine(y, expert_ids, positions, weights, capacity, num_experts):
    return _combine_parts(y, expert_ids, positions, weights, capacity, num_experts)[0]


def _combine_fwd(y, expert_ids, positions, weights, capacity, num_experts):
    out, rows, w = _combine_parts(y, expert_ids, positions, weights, capacity, num_experts)
    # A zero-size array carries the weights' dtype into the backward pass.
    return out, (rows, w, expert_ids, positions, jnp.zeros((0,), weights.dtype))


def _combine_bwd(capacity, num_experts, res, dout):
    rows, w, expert_ids, positions, w_like = res
    g, s, k, _ = rows.shape
    src = _slot_sources(expert_ids, positions, capacity, num_experts)  # [E, G, C]
    w_slot = (
        w.reshape(g, s * k).at[jnp.arange(g)[None, :, None], src].get(mode="fill", fill_value=0)
    )  # [E, G, C]; 0 for empty slots
    d32 = dout.astype(jnp.float32)  # [G, S, d]
    dy = _slot_rows(d32, src, k) * w_slot[..., None]  # [E, G, C, d]
    kept = _kept(expert_ids, positions, capacity, num_experts)  # [G, S, K]
    dw = jnp.where(kept, jnp.einsum("gskd,gsd->gsk", rows.astype(jnp.float32), d32), 0.0)
    return dy.astype(rows.dtype), None, None, dw.astype(w_like.dtype)


_combine.defvjp(_combine_fwd, _combine_bwd)
