"""Attention of a few new tokens over a preallocated KV cache, with work bounded by the filled part.

Pure JAX (every platform); used by `Attention.decode` for decode steps (C = 1) and prefill chunks.

Shapes: B batch, C new tokens per sequence, S cache slots (max_len), H query heads, K KV heads,
G = H // K (query head h reads KV head h // G), Dh head dim; optionally a leading stacked-layer axis
R on the caches (the scanned period's caches, read in place at index `layer`). Slot s is visible to
the query at position p iff s <= p: the caller writes the new tokens' K/V first, and slots past a
sequence's filled length are never visible to its real queries.

Algorithm:
  1. n = ceil((max over the batch of the positions + 1) / block): the blocks holding a visible slot.
     n is a traced value, so one compiled program serves every filled length, and a step costs
     O(filled * block-rounding), not O(S). Rows with fewer filled slots mask the rest (batch max).
  2. `fori_loop` over the n blocks (a while loop; just the body when one block holds the whole
     cache, S <= block): slice block j's K/V out of the cache (when S is
     not a multiple of the block, the last block is shifted back to end at slot S and its slots
     before j * block, already seen, are masked), fp32 scores q.k * Dh**-0.5, online softmax: the
     running max m, the running sum l of exp(s - m) and the fp32 accumulator of exp(s - m) v.
  3. out = acc / l (every query sees at least slot 0, so l > 0).
Live memory per step: a few (B, K, G, C, block) fp32 blocks, whatever S and the filled length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32

# Cache slots per block. Larger blocks cost fewer loop trips but round the filled length up further;
# on XLA:CPU (tiny config, 1 query) 512 kept a 1K-context step within 10 % of a single dense pass
# while a 64K context runs 128 trips (benchmarks/RESULTS.md, "Decode at long context").
DEFAULT_BLOCK = 512


def _block(cache, layer, start, size):
    """Slots [start, start + size) of (B, S, K, Dh), or of (R, B, S, K, Dh) at index `layer`."""
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(cache, start, size, axis=1)
    _, b, _, kv, dh = cache.shape
    return jax.lax.dynamic_slice(cache, (layer, 0, start, 0, 0), (1, b, size, kv, dh))[0]


def _scores(qg, k):
    """q.k: qg (B, C, K, G, Dh), k (B, block, K, Dh) -> fp32 (B, K, G, C, block).

    One query per sequence (a decode step) on CPU: a multiply and a sum over Dh, reading the block
    where it lies. As a dot, XLA:CPU first transposes every block to put (B, K) in front: a copy
    of the whole cache per layer and step (small config: 4 x 10.5 MB per step)."""
    if qg.shape[1] == 1 and jax.default_backend() == "cpu":
        s = jnp.sum(qg[:, 0, None].astype(F32) * k[:, :, :, None].astype(F32), axis=-1)  # (B, S, K, G)
        return jnp.transpose(s, (0, 2, 3, 1))[:, :, :, None]
    return jnp.einsum("bckgd,bskd->bkgcs", qg, k, preferred_element_type=F32)


def _weighted_values(p, v):
    """sum over slots of p v: p (B, K, G, C, block), v (B, block, K, Dh) -> fp32 (B, K, G, C, Dh);
    as `_scores`, a multiply and a sum for one query per sequence on CPU."""
    if p.shape[3] == 1 and jax.default_backend() == "cpu":
        ps = jnp.transpose(p[:, :, :, 0], (0, 3, 1, 2)).astype(F32)  # (B, S, K, G)
        return jnp.sum(ps[..., None] * v[:, :, :, None].astype(F32), axis=1)[:, :, :, None]
    return jnp.einsum("bkgcs,bskd->bkgcd", p, v, preferred_element_type=F32)


def cache_attention(q, k_cache, v_cache, positions, *, layer=None, block: int = DEFAULT_BLOCK):
    """q (B, C, H, Dh) at positions (B, C) int; k_cache, v_cache (B, S, K, Dh) (or (R, B, S, K, Dh)
    with `layer` a traced index) -> out (B, C, H, Dh) in q.dtype. See the module docstring."""
    b, c, h, dh = q.shape
    slots, kv = k_cache.shape[-3], k_cache.shape[-2]
    block = min(block, slots)
    qg = q.reshape(b, c, kv, h // kv, dh)
    n_blocks = jnp.minimum(jnp.max(positions) // block + 1, -(-slots // block))  # step 1

    def body(j, carry):  # step 2
        m, total, acc = carry
        first = j * block
        start = jnp.minimum(first, slots - block)
        k = _block(k_cache, layer, start, block).astype(q.dtype)
        v = _block(v_cache, layer, start, block).astype(q.dtype)
        s = _scores(qg, k) * dh**-0.5
        slot = start + jnp.arange(block)
        seen = (slot >= first)[None, None, :] & (slot[None, None, :] <= positions[:, :, None])
        seen = seen[:, None, None]  # (B, 1, 1, C, block)
        m_new = jnp.maximum(m, jnp.max(jnp.where(seen, s, -jnp.inf), axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # nothing visible yet: exp(-inf) = 0
        p = jnp.where(seen, jnp.exp(s - shift[..., None]), 0.0)
        alpha = jnp.exp(m - shift)
        pv = _weighted_values(p.astype(q.dtype), v)
        return m_new, alpha * total + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

    g = h // kv
    init = (
        jnp.full((b, kv, g, c), -jnp.inf, F32),
        jnp.zeros((b, kv, g, c), F32),
        jnp.zeros((b, kv, g, c, dh), F32),
    )
    if slots <= block:  # one block holds the whole cache: its body alone, no while loop
        _, total, acc = body(0, init)
    else:
        _, total, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / total[..., None]  # step 3
    return jnp.moveaxis(out, 3, 1).reshape(b, c, h, dh).astype(q.dtype)
