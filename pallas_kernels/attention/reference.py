"""Causal, packed-segment, grouped-query attention in pure JAX: a dense version (the ground truth at
small sizes) and a blockwise (flash-style) version whose forward and backward keep O(L x block)
memory. The blockwise version is what `impl="xla"` runs on every platform and what `impl="pallas"`
runs where no kernel applies (CPU).

Shapes: B batch, L sequence, H query heads, K KV heads, G = H // K query heads per KV head (query
head h reads KV head h // G), Dh head dim; segment_ids (B, L) int. Key j is visible to query i iff
segment_ids[i] == segment_ids[j] and j <= i (sequence indices). Scores are q.k * Dh**-0.5 in fp32.
A row with no visible key (not produced by the model, where every query sees itself) gives a zero
output and zero gradients.

Blockwise algorithm (`attention`):
  1. Pad L to a multiple of the block sizes; padded keys come after every real query, so causality
     hides them, and padded query rows are sliced off (their cotangent is zero).
  2. Forward, for each query block (`lax.map`): a `fori_loop` over the key blocks that causality
     allows (0 .. the block holding the block's last query), keeping the running row max m, the
     running sum l of exp(s - m) and the fp32 accumulator of exp(s - m) v (online softmax). Out =
     acc / l; the residuals are q, k, v, the segment ids, out and lse = m + log l (B, K, G, L):
     O(L), never L x L.
  3. Backward, one pass over key blocks (`lax.scan`), each a `fori_loop` over the query blocks that
     can see it: p = exp(s - lse) recomputed from the saved lse, dv += p^T do, ds = p (do v^T -
     delta) with delta = rowsum(do * out), dk += ds^T q, and dq (a full fp32 (B, L, H, Dh) buffer
     carried through both loops) += ds k. Live per step: a few (B, K, G, block_q, block_k) fp32
     blocks.

Context parallelism (`attention_local_queries`): the queries are one shard of the sequence (first
query at global index q_offset), the keys the whole gathered sequence with their own segment ids; the
same loops run with query indices shifted by q_offset (in the causal block bounds and the mask).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query and key block lengths of the blockwise attention. A sequence shorter than a block uses
    one block of its own (rounded up to a multiple of 8). Live memory per step is a few
    B * H * block_q * block_k fp32 blocks (4 MiB each at the defaults for B=1, H=4)."""

    block_q: int = 512
    block_k: int = 512

    def __post_init__(self):
        small, big = sorted((self.block_q, self.block_k))
        if small <= 0 or big % small:
            raise ValueError(f"block sizes must be positive and one a multiple of the other, got {self}")


DEFAULT_BLOCK_SIZES = BlockSizes()


def check_shapes(q, k, v, segment_ids) -> None:
    b, l, h, dh = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != l or k.shape[3] != dh:
        raise ValueError(f"k, v must be (B, L, K, Dh) matching q {q.shape}; got {k.shape}, {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"query heads {h} must be a multiple of KV heads {k.shape[2]}")
    if segment_ids.shape != (b, l):
        raise ValueError(f"segment_ids must be (B, L) = {(b, l)}, got {segment_ids.shape}")


def visible(q_seg, q_idx, k_seg, k_idx):
    """(B, Lq), (Lq,), (B, Lk), (Lk,) -> (B, Lq, Lk) bool: same segment and not in the future."""
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return same & (q_idx[:, None] >= k_idx[None, :])


# ------------------------------------------------------------------------------------------- dense
def attention_dense(q, k, v, segment_ids):
    """The ground truth: materialises the (B, K, G, L, L) fp32 scores; autodiff for gradients."""
    check_shapes(q, k, v, segment_ids)
    b, l, h, dh = q.shape
    kv = k.shape[2]
    s = jnp.einsum("blkgd,bskd->bkgls", q.reshape(b, l, kv, h // kv, dh), k, preferred_element_type=F32)
    s = s * dh**-0.5
    idx = jnp.arange(l)
    mask = visible(segment_ids, idx, segment_ids, idx)[:, None, None]  # (B, 1, 1, L, L)
    m = jax.lax.stop_gradient(jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1, keepdims=True))
    e = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(total > 0, total, 1.0)
    out = jnp.einsum("bkgls,bskd->blkgd", p.astype(v.dtype), v, preferred_element_type=F32)
    return out.reshape(b, l, h, dh).astype(q.dtype)


# --------------------------------------------------------------------------------------- blockwise
def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def block_lengths(length: int, block_sizes: BlockSizes) -> tuple[int, int, int]:
    """(block_q, block_k, padded length) for a sequence of `length` tokens: blocks longer than the
    sequence shrink to it (rounded up to 8); if that breaks divisibility, both use the longer one."""
    short = _round_up(length, 8)
    bq, bk = min(block_sizes.block_q, short), min(block_sizes.block_k, short)
    if max(bq, bk) % min(bq, bk):
        bq = bk = max(bq, bk)
    return bq, bk, _round_up(length, max(bq, bk))


def attention(q, k, v, segment_ids, block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES):
    """q (B, L, H, Dh), k/v (B, L, K, Dh), segment_ids (B, L) int -> (B, L, H, Dh) in q.dtype."""
    check_shapes(q, k, v, segment_ids)
    return attention_local_queries(q, k, v, segment_ids, segment_ids, 0, block_sizes)


def attention_local_queries(
    q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES
):
    """Queries at global indices q_offset .. q_offset + Lq - 1 against keys at 0 .. Lk - 1:
    q (B, Lq, H, Dh), k/v (B, Lk, K, Dh), q_segment_ids (B, Lq), kv_segment_ids (B, Lk),
    q_offset int (may be traced) -> (B, Lq, H, Dh) in q.dtype."""
    b, lq, h, dh = q.shape
    lk, kv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != dh or h % kv:
        raise ValueError(f"k, v must be (B, Lk, K, Dh) with K | H for q {q.shape}; got {k.shape}, {v.shape}")
    if q_segment_ids.shape != (b, lq) or kv_segment_ids.shape != (b, lk):
        raise ValueError(
            f"segment ids must be (B, Lq) = {(b, lq)} and (B, Lk) = {(b, lk)}; "
            f"got {q_segment_ids.shape}, {kv_segment_ids.shape}"
        )
    bq, bk, _ = block_lengths(max(lq, lk), block_sizes)
    pad_to = lambda x, lp: jnp.pad(x, [(0, 0), (0, lp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))  # step 1
    lpq, lpk = _round_up(lq, max(bq, bk)), _round_up(lk, max(bq, bk))
    qg = pad_to(q, lpq).reshape(b, lpq, kv, h // kv, dh)
    seg_q = pad_to(q_segment_ids.astype(jnp.int32), lpq)
    seg_k = pad_to(kv_segment_ids.astype(jnp.int32), lpk)
    offset = jnp.asarray(q_offset, jnp.int32)
    out = _blockwise(bq, bk, qg, pad_to(k, lpk), pad_to(v, lpk), seg_q, seg_k, offset)
    return out.reshape(b, lpq, h, dh)[:, :lq]


def _scores(q_blk, k_blk, seg_q, seg_k, i0, j0, scale):
    """s (B, K, G, bq, bk) fp32 and the visibility mask (B, 1, 1, bq, bk) of one block pair whose
    first query / key sit at sequence indices i0 / j0."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=F32) * scale
    q_idx = i0 + jnp.arange(q_blk.shape[1])
    k_idx = j0 + jnp.arange(k_blk.shape[1])
    return s, visible(seg_q, q_idx, seg_k, k_idx)[:, None, None]


def _slice(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _forward(bq, bk, q, k, v, seg_q_all, seg, off):
    """Step 2. q (B, Lpq, K, G, Dh), k/v (B, Lpk, K, Dh) -> out like q in q.dtype, lse (B, K, G, Lpq);
    query i sits at global index off + i."""
    b, lp, kv, g, dh = q.shape
    scale = dh**-0.5
    nk = k.shape[1] // bk

    def query_block(i):
        i0 = i * bq
        q_blk, seg_q = _slice(q, i0, bq), _slice(seg_q_all, i0, bq)

        def key_block(j, carry):
            m, total, acc = carry
            j0 = j * bk
            s, mask = _scores(q_blk, _slice(k, j0, bk), seg_q, _slice(seg, j0, bk), off + i0, j0, scale)
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
            shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all-masked so far: exp(-inf) = 0
            p = jnp.where(mask, jnp.exp(s - shift[..., None]), 0.0)
            alpha = jnp.exp(m - shift)
            pv = jnp.einsum(
                "bkgqs,bskd->bkgqd", p.astype(v.dtype), _slice(v, j0, bk), preferred_element_type=F32
            )
            return m_new, alpha * total + jnp.sum(p, axis=-1), alpha[..., None] * acc + pv

        init = (
            jnp.full((b, kv, g, bq), -jnp.inf, F32),
            jnp.zeros((b, kv, g, bq), F32),
            jnp.zeros((b, kv, g, bq, dh), F32),
        )
        n_visible = jnp.minimum(
            nk, (off + i0 + bq + bk - 1) // bk
        )  # key blocks starting at or before the last query
        m, total, acc = jax.lax.fori_loop(0, n_visible, key_block, init)
        seen = total > 0
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), 0.0)  # any finite value if empty
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(query_block, jnp.arange(lp // bq))  # (nq, B, K, G, bq, Dh), (nq, B, K, G, bq)
    out = jnp.moveaxis(out, 0, 1).transpose(0, 1, 4, 2, 3, 5).reshape(b, lp, kv, g, dh)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, lp)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _blockwise(bq, bk, q, k, v, seg_q, seg_k, off):
    return _forward(bq, bk, q, k, v, seg_q, seg_k, off)[0]


def _blockwise_fwd(bq, bk, q, k, v, seg_q, seg_k, off):
    out, lse = _forward(bq, bk, q, k, v, seg_q, seg_k, off)
    return out, (q, k, v, seg_q, seg_k, off, out, lse)


def _blockwise_bwd(bq, bk, residuals, d_out):
    """Step 3."""
    q, k, v, seg_q, seg, off, out, lse = residuals
    b, lp, kv, g, dh = q.shape
    lpk = k.shape[1]
    scale = dh**-0.5
    nq = lp // bq
    d_out = d_out.astype(q.dtype)
    delta = jnp.einsum("blkgd,blkgd->bkgl", d_out.astype(F32), out.astype(F32))  # (B, K, G, Lp)

    def key_block(dq, j):
        j0 = j * bk
        k_blk, v_blk, seg_k = _slice(k, j0, bk), _slice(v, j0, bk), _slice(seg, j0, bk)

        def query_block(i, carry):
            dq, dk, dv = carry
            i0 = i * bq
            q_blk, do_blk = _slice(q, i0, bq), _slice(d_out, i0, bq)
            s, mask = _scores(q_blk, k_blk, _slice(seg_q, i0, bq), seg_k, off + i0, j0, scale)
            lse_blk = jax.lax.dynamic_slice_in_dim(lse, i0, bq, axis=3)
            delta_blk = jax.lax.dynamic_slice_in_dim(delta, i0, bq, axis=3)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)  # (B, K, G, bq, bk)
            dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), do_blk, preferred_element_type=F32)
            dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=F32)
            ds = (p * (dp - delta_blk[..., None]) * scale).astype(q.dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_blk, preferred_element_type=F32)
            dq_blk = _slice(dq, i0, bq) + jnp.einsum(
                "bkgqs,bskd->bqkgd", ds, k_blk, preferred_element_type=F32
            )
            return jax.lax.dynamic_update_slice_in_dim(dq, dq_blk, i0, axis=1), dk, dv

        zeros = jnp.zeros((b, bk, kv, dh), F32)
        first = jnp.clip((j0 - off) // bq, 0, nq)  # query blocks holding global indices >= j0
        dq, dk, dv = jax.lax.fori_loop(first, nq, query_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, F32), jnp.arange(lpk // bk))
    unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, lpk, kv, dh)  # (nk, B, bk, K, Dh) -> (B, Lpk, K, Dh)
    dk, dv = unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)
    return dq.astype(q.dtype), dk, dv, None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
