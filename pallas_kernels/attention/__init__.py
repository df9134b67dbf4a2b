"""Causal packed-segment grouped-query attention without L x L memory (training and prefill)."""

from pallas_kernels.attention.ops import attention
from pallas_kernels.attention.reference import DEFAULT_BLOCK_SIZES, BlockSizes, attention_dense

__all__ = ["DEFAULT_BLOCK_SIZES", "BlockSizes", "attention", "attention_dense"]
