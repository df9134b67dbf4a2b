"""Decode caches: layout, abstract shapes and sizes.

A cache is `{"layers": layers, "lengths": (B,) int32}` where `lengths[b]` counts the tokens of
sequence b already folded into it (its prompt length after prefill, +1 per decode step), and
`layers` follows the model's parameter structure so the scanned period decodes with `lax.scan`:

    {"prefix": [cache per layer], "period": [cache per period position, every leaf stacked with a
     leading `repeats` axis], "suffix": [cache per layer]}

Per layer kind (B batch, S = max_len, K KV heads, Dh head_dim, H/P Mamba2 heads/head_dim,
G groups, N d_state, W conv width):
    A  {"k", "v": (B, S, K, Dh) cfg.kv_cache_dtype}          preallocated, written at `lengths`
    M  {"conv_x": (B, W-1, H, P), "conv_B", "conv_C": (B, W-1, G, N) in cfg.dtype,
        "ssm": (B, H, P, N) cfg.ssm_state_dtype}              fixed size, independent of S
    F  {}                                                   MoE layers keep no state

The conv taps are the pre-conv projections, exactly what the training conv reads, stored in the
compute dtype they are produced in (lossless). `TurbosModel.prefill` builds a cache;
`init_cache` gives an empty one of the same structure (e.g. for abstract sizing).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from turbos_jax.config import ModelConfig


def layer_cache_shapes(symbol: str, cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """ShapeDtypeStructs of one layer's cache (unstacked)."""
    sds = jax.ShapeDtypeStruct
    if symbol == "A":
        kv = sds((batch, max_len, cfg.num_kv_heads, cfg.head_dim), cfg.kv_cache_dtype)
        return {"k": kv, "v": kv}
    if symbol == "M":
        w, h, p = cfg.mamba_conv - 1, cfg.mamba_heads, cfg.mamba_head_dim
        g, n = cfg.mamba_groups, cfg.mamba_d_state
        return {
            "conv_x": sds((batch, w, h, p), cfg.dtype),
            "conv_B": sds((batch, w, g, n), cfg.dtype),
            "conv_C": sds((batch, w, g, n), cfg.dtype),
            "ssm": sds((batch, h, p, n), cfg.ssm_state_dtype),
        }
    return {}


def cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """The whole cache as ShapeDtypeStructs (the structure `TurbosModel.prefill` returns)."""
    split = cfg.layout_split
    one = lambda s: layer_cache_shapes(s, cfg, batch, max_len)
    stack = lambda tree: jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((split.repeats, *a.shape), a.dtype), tree
    )
    layers = {
        "prefix": [one(s) for s in split.prefix],
        "period": [stack(one(s)) for s in split.period],
        "suffix": [one(s) for s in split.suffix],
    }
    return {"layers": layers, "lengths": jax.ShapeDtypeStruct((batch,), jnp.int32)}


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """An all-zero cache (lengths 0)."""
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache_shapes(cfg, batch, max_len))


def cache_nbytes(cfg: ModelConfig, batch: int = 1, max_len: int = 1) -> dict:
    """Measured from the shapes: KV bytes (grow with max_len) and Mamba2 bytes (fixed) for `batch`
    sequences; cf. `turbos_jax.accounting.cache_bytes` (the analytic per-token / per-sequence form)."""
    layers = cache_shapes(cfg, batch, max_len)["layers"]
    kv = mamba = 0
    for leaf_path, a in jax.tree_util.tree_leaves_with_path(layers):
        size = int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
        name = str(getattr(leaf_path[-1], "key", ""))
        if name in ("k", "v"):
            kv += size
        else:
            mamba += size
    return {"kv_bytes": kv, "mamba_bytes": mamba, "total_bytes": kv + mamba}
