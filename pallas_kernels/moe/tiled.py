"""Grouped matmul as a scan over (row tile, group) pairs, in plain JAX: the "xla" path on CPU.

XLA:CPU has no grouped (ragged) matmul: `jax.lax.ragged_dot` lowers there to a product of every row
with every group's weight under a mask, E times the FLOPs of the routed rows (14 ms against 1 ms
for one expert's product at (128, 512) x (8, 512, 1536); benchmarks/RESULTS.md, "Rollout
throughput"). This computes only the tiles a group touches, the way megablox schedules its grid:

  1. Pad the M sorted rows to T tiles of `tm` rows. Group g covers rows [start_g, end_g) and so the
     tiles start_g // tm ... (end_g - 1) // tm; a tile shared by two groups appears in two pairs.
     There are at most T + E - 1 pairs (a static bound); pairs past the real count are masked.
  2. Scan over the pairs: pair p multiplies its (tm, K) tile by its group's (K, N) weight, zeroes the
     rows outside the group, and adds the result into the output tile.
Cost: about M * K * N + (E - 1) * tm * K * N multiply-adds, against E * M * K * N. Differentiable by
JAX (gather / dynamic-slice / scatter-add transposes); results equal `ragged_dot`'s up to float
summation order, and rows at or beyond sum(group_sizes) are zero, as there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_tile(m: int, num_groups: int) -> int:
    """Rows per tile: about the mean group size, a power of two in [8, 128] (small tiles waste
    little at group edges when rows are few, as in decode; large ones amortise the scan)."""
    mean = max(1, -(-m // num_groups))
    return min(128, max(8, 1 << (mean - 1).bit_length()))


def grouped_matmul(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, preferred_element_type=None
) -> jax.Array:
    """(M, K) rows sorted by group x (E, K, N) -> (M, N); see `reference.grouped_matmul`."""
    m, k = lhs.shape
    e, _, n = rhs.shape
    out_dtype = preferred_element_type or lhs.dtype
    tm = row_tile(m, e)
    tiles = -(-m // tm)
    x = jnp.pad(lhs, ((0, tiles * tm - m), (0, 0))).reshape(tiles, tm, k)  # [T, tm, K]

    # Step 1: the pairs, group-major (each group's tiles in order).
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    tiles_of_group = jnp.where(sizes > 0, (ends - 1) // tm - starts // tm + 1, 0)  # [E]
    pair_end = jnp.cumsum(tiles_of_group)
    num_pairs = tiles + e - 1
    p = jnp.arange(num_pairs, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(pair_end, p, side="right"), e - 1).astype(jnp.int32)  # [P]
    real = p < pair_end[-1]
    tile = jnp.where(real, starts[group] // tm + p - (pair_end[group] - tiles_of_group[group]), 0)

    # Step 2: one (tm, K) x (K, N) product per pair, masked to the group's rows, added into place.
    def body(out, pair):
        t, g, is_real = pair
        rows = t * tm + jnp.arange(tm)
        inside = is_real & (rows >= starts[g]) & (rows < ends[g])  # [tm]
        y = jnp.dot(x[t], rhs[g], preferred_element_type=jnp.float32)  # [tm, N]
        y = jnp.where(inside[:, None], y, 0.0).astype(out.dtype)
        return out.at[t].add(y), None

    out = jnp.zeros((tiles, tm, n), jnp.promote_types(out_dtype, jnp.float32))
    out, _ = jax.lax.scan(body, out, (tile, group, real))
    return out.reshape(tiles * tm, n)[:m].astype(out_dtype)
