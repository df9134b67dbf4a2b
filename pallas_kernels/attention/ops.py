"""Public attention op: causal, packed-segment, grouped-query attention without L x L memory.

`impl="xla"` runs the blockwise pure-JAX attention (`reference.attention`, O(L x block) memory in
forward and backward) on any platform. `impl="pallas"` picks at lowering time
(`pallas_kernels.by_platform`): splash attention on TPU, JAX's Triton flash attention on NVIDIA
GPUs (`kernel.py`), and the blockwise reference elsewhere (CPU). Every branch is differentiable by
its own custom_vjp; none keeps more than O(L) residuals.

Layouts: q (B, L, H, Dh), k/v (B, L, K, Dh), H % K == 0 (query head h reads KV head h // (H // K));
segment_ids (B, L) int. Key j is visible to query i iff same segment id and j <= i. Logits are
scaled by Dh**-0.5. The output has q's dtype.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import by_platform, check_impl
from pallas_kernels.attention import kernel, reference
from pallas_kernels.attention.reference import DEFAULT_BLOCK_SIZES, BlockSizes


def attention(q, k, v, segment_ids, *, impl: str = "xla", block_sizes: BlockSizes = DEFAULT_BLOCK_SIZES):
    """Causal packed-segment GQA attention; see the module docstring for layouts."""
    check_impl(impl, "attention")
    reference.check_shapes(q, k, v, segment_ids)
    fn = _attention_xla if impl == "xla" else _attention_pallas
    return fn(q, k, v, segment_ids, block_sizes=block_sizes)


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def _attention_xla(q, k, v, segment_ids, *, block_sizes):
    return reference.attention(q, k, v, segment_ids, block_sizes)


@functools.partial(jax.jit, static_argnames=("block_sizes",))
def _attention_pallas(q, k, v, segment_ids, *, block_sizes):
    return by_platform(
        q,
        k,
        v,
        segment_ids,
        tpu=functools.partial(kernel.tpu_attention, block_sizes=block_sizes),
        gpu=kernel.gpu_attention,
        other=functools.partial(reference.attention, block_sizes=block_sizes),
    )
