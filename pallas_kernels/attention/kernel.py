"""Platform kernels for causal packed-segment GQA attention, used from JAX (not copied):

* TPU: splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the MQA form (one
  K/V head shared by G query heads) under `vmap` over batch and KV heads, with `CausalMask` for
  every query head of the group and `SegmentIds(q=segment_ids, kv=segment_ids)`. Splash does not
  scale the logits, so q is multiplied by Dh**-0.5 first (in q's dtype). Its own custom_vjp
  (dq and dkv kernels) gives the gradients.
* GPU: JAX's Pallas/Triton flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`),
  which takes one `segment_ids` array for queries and keys and `causal=True`; it needs as many K/V
  heads as query heads, so K/V are repeated G times (O(L) memory; the repeat's transpose sums dk, dv
  over the group). cuDNN through `jax.nn.dot_product_attention` is not used: its public API
  expresses padding (q/kv sequence lengths) and a dense mask, not packed segments without an
  L x L mask.

Both pad L to a multiple of their block (padded keys lie after every real query, so causality hides
them; padded query rows are sliced off). Segment id semantics are the reference's: a key is visible
iff same segment id and not after the query.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.attention.reference import BlockSizes

TPU_LANES = 128  # splash tiles the kv segment ids (8, block_kv): blocks are multiples of 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_seq(l: int, block: int, minimum: int) -> tuple[int, int]:
    """(block, padded length): `block` rounded to `minimum`, capped at the padded sequence."""
    block = _round_up(max(block, minimum), minimum)
    short = _round_up(l, minimum)
    block = min(block, short)
    return block, _round_up(l, block)


def _pad(x, lp):
    return jnp.pad(x, [(0, 0), (0, lp - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def tpu_attention(q, k, v, segment_ids, *, block_sizes: BlockSizes, interpret: bool = False):
    """q (B, L, H, Dh), k/v (B, L, K, Dh), segment_ids (B, L) -> (B, L, H, Dh) by splash attention."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, l, h, dh = q.shape
    kv = k.shape[2]
    g = h // kv
    bq, lp = _pad_seq(l, block_sizes.block_q, TPU_LANES)
    bk, _ = _pad_seq(lp, block_sizes.block_k, TPU_LANES)
    if lp % bk:  # both blocks must divide the padded length
        bk = bq
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((lp, lp)) for _ in range(g)])
    kernel = splash.make_splash_mqa_single_device(mask, block_sizes=blocks, interpret=interpret)

    qs = (q.astype(jnp.float32) * dh**-0.5).astype(q.dtype)
    qs = _pad(qs, lp).reshape(b, lp, kv, g, dh).transpose(0, 2, 3, 1, 4)  # (B, K, G, Lp, Dh)
    ks, vs = (_pad(x, lp).transpose(0, 2, 1, 3) for x in (k, v))  # (B, K, Lp, Dh)
    seg = _pad(segment_ids.astype(jnp.int32), lp)

    def one_group(q1, k1, v1, seg1):  # (G, Lp, Dh), (Lp, Dh), (Lp, Dh), (Lp,)
        return kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=seg1, kv=seg1))

    over_heads = jax.vmap(one_group, in_axes=(0, 0, 0, None))
    out = jax.vmap(over_heads)(qs, ks, vs, seg)  # (B, K, G, Lp, Dh)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, lp, h, dh)[:, :l]


@dataclasses.dataclass(frozen=True)
class GpuBlocks:
    """Block sizes of the Triton kernel (its own defaults; not yet tuned on hardware)."""

    block: int = 128  # forward query and key blocks; L is padded to a multiple of it
    block_dkv: int = 32
    block_dq: int = 32


def gpu_attention(q, k, v, segment_ids, *, blocks: GpuBlocks = GpuBlocks(), interpret: bool = False):
    """q (B, L, H, Dh), k/v (B, L, K, Dh), segment_ids (B, L) -> (B, L, H, Dh) by JAX's Triton
    flash attention."""
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    b, l, h, dh = q.shape
    g = h // k.shape[2]
    lp = _round_up(l, blocks.block)
    triton_blocks = triton_attention.BlockSizes(
        block_q=blocks.block,
        block_k=blocks.block,
        block_q_dkv=blocks.block_dkv,
        block_kv_dkv=blocks.block_dkv,
        block_q_dq=blocks.block_dq,
        block_kv_dq=blocks.block_dq,
    )
    kr, vr = (_pad(jnp.repeat(x, g, axis=2), lp) for x in (k, v))  # (B, Lp, H, Dh), head h -> h // G
    out = triton_attention.mha(
        _pad(q, lp),
        kr,
        vr,
        _pad(segment_ids.astype(jnp.int32), lp),
        sm_scale=dh**-0.5,
        causal=True,
        block_sizes=triton_blocks,
        interpret=interpret,
    )
    return out[:, :l]
