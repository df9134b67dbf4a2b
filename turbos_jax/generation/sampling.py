"""Token sampling: greedy, temperature, top-k, top-p (nucleus) and min-p, seeded with jax.random.

`sample(logits, key, params)` with logits (B, V) fp32:
  1. temperature == 0 -> greedy argmax (the filters are irrelevant).
  2. logits / temperature.
  3. filters, each setting excluded logits to -inf, applied in this order (as HF transformers):
       top_k > 0      keep the k largest logits (ties at the k-th value are all kept)
       top_p < 1      keep the smallest set of most likely tokens whose probability reaches top_p:
                      token i is kept iff the mass of tokens strictly more likely than it (sorted
                      order) is < top_p; the most likely token is always kept
       min_p > 0      keep tokens with prob >= min_p * max prob
  4. one draw from the softmax of the remaining logits by inverse CDF (`categorical`).
Every filter keeps at least the argmax, so the support is never empty.

`categorical` draws one uniform number per row and finds where it falls in the cumulative
probabilities, two-level: blocks of CDF_BLOCK tokens, then the tokens of the chosen block. It draws
from the same distribution as `jax.random.categorical` (Gumbel-max), up to float32 rounding of the
sums (~1e-7 of probability mass), with B instead of B * V random numbers and no V-long cumulative
sum: on XLA:CPU 0.2 ms against 8.7 ms per (64, 8192) step (benchmarks/RESULTS.md, "Rollout
throughput"). A key gives the same draws on every run; they are not the tokens
`jax.random.categorical` picks for that key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
CDF_BLOCK = 128  # tokens per block of the two-level inverse CDF in `categorical`


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static (hashable) sampling settings; defaults = greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 = off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1] (0 = off)")


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    if p >= 1.0:
        return logits
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.maximum(jnp.sum(mass_before < p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, NEG_INF)  # ties with the last kept are kept


def min_p_filter(logits: jax.Array, p: float) -> jax.Array:
    if p <= 0.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, NEG_INF)


def filter_logits(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Steps 2-3: temperature-scaled logits with -inf outside the support."""
    logits = logits.astype(jnp.float32) / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def _count_at_most(cdf: jax.Array, x: jax.Array, weights: jax.Array) -> jax.Array:
    """Index i with cdf[i-1] <= x < cdf[i] (rows of (N, K), x (N,)), never one of zero weight: when
    rounding puts x at or past cdf[-1], the last index of positive weight."""
    idx = jnp.sum(cdf <= x[:, None], axis=-1)
    last = weights.shape[-1] - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)
    return jnp.minimum(idx, last)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits): logits (B, V) fp32, -inf = excluded -> (B,) int32.

    1. p = exp(logits - max) (unnormalised, 0 where excluded), zero-padded to nb blocks of
       CDF_BLOCK tokens: (B, nb, CDF_BLOCK); block masses m (B, nb).
    2. u ~ U[0, 1) per row; x = u * sum(m).
    3. Block j: the first whose cumulative mass exceeds x; r = x - the mass of blocks before j.
    4. Token: the first of block j whose cumulative p within the block exceeds r.
    Token t is drawn with probability p_t / sum(p) (zero-probability tokens never).
    """
    b, v = logits.shape
    nb = -(-v // CDF_BLOCK)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.pad(p, ((0, 0), (0, nb * CDF_BLOCK - v))).reshape(b, nb, CDF_BLOCK)  # step 1
    mass = jnp.sum(p, axis=-1)  # (B, nb)
    cum = jnp.cumsum(mass, axis=-1)
    x = jax.random.uniform(key, (b,), jnp.float32) * cum[:, -1]  # step 2
    j = _count_at_most(cum, x, mass)  # step 3
    r = x - jnp.where(j > 0, jnp.take_along_axis(cum, jnp.maximum(j - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    block = jnp.take_along_axis(p, j[:, None, None], axis=1)[:, 0]  # (B, CDF_BLOCK)
    t = _count_at_most(jnp.cumsum(block, axis=-1), r, block)  # step 4
    return (j * CDF_BLOCK + t).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """logits (B, V) -> tokens (B,) int32."""
    if params.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return categorical(key, filter_logits(logits, params))
