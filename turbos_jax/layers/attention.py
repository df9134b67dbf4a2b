"""Grouped-query attention with per-head QK-norm, NTK-scaled RoPE and packed-sequence masking.

Shapes: B batch, L query length, S key length, H query heads, K KV heads, G = H // K query heads per
KV head, Dh head_dim, D d_model.

Algorithm:
  1. q = x Wq (B, L, H, Dh); k, v = x Wk, x Wv (B, S, K, Dh).
  2. RoPE on q and k at each token's position within its own document (positions restart per packed
     segment), with base theta * alpha ** (Dh / (Dh - 2)) -- NTK-aware scaling, alpha = 1 at 4K;
     skipped with position_encoding = "none" (NoPE).
  3. QK-norm: RMSNorm over Dh of every q and k head (one scale vector shared by all heads), after
     RoPE (cfg.qk_norm = "after_rope", as every public Hunyuan model), before it, or not at all.
     With a learned scale the order matters: RMS is rotation-invariant but a per-channel scale does
     not commute with the rotation.
  4. out = softmax(s q k^T) v with fp32 logits, s = cfg.attention_scale (Dh^-1/2 unless
     cfg.attn_scale is set; the kernels scale by Dh^-1/2, so q is pre-multiplied by s * sqrt(Dh)
     when they differ); a key is visible iff it is not in the future
     and belongs to the same segment as the query. Full sequences (training, prefill) run
     `pallas_kernels.attention` (blockwise, no L x S scores; `kernel_impl` picks the reference or the
     platform kernel); decode steps and prefill chunks attend over the filled blocks of the KV
     cache (`pallas_kernels.attention.decode.cache_attention`).
  5. y = out Wo (B, L, D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import attention as attention_ops
from pallas_kernels import resolve_impl
from pallas_kernels.attention.decode import cache_attention
from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.layers import context_parallel
from turbos_jax.layers.norms import RMSNorm


def rope_frequencies(head_dim: int, theta: float, alpha: float) -> jax.Array:
    """Inverse frequencies (head_dim // 2,) with NTK-aware base scaling by `alpha`."""
    base = theta * alpha ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates (B, L, N, Dh) by position (B, L): pairs (i, i + Dh/2) rotate together (GPT-NeoX)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, Dh/2)
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention. Parameters: q_proj (D, H, Dh), k_proj/v_proj (D, K, Dh), o_proj (H, Dh, D),
    q_norm/k_norm scale (Dh,) (absent with qk_norm = "none")."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        init = nnx.initializers.truncated_normal(stddev=cfg.init_std)
        p = lambda shape, names: sharding.param(init, rngs.params(), shape, names, cfg.param_dtype)
        self.q_proj = p((d, h, dh), ("embed", "heads", None))
        self.k_proj = p((d, k, dh), ("embed", "kv_heads", None))
        self.v_proj = p((d, k, dh), ("embed", "kv_heads", None))
        self.o_proj = p((h, dh, d), ("heads", None, "embed"))
        if cfg.qk_norm != "none":
            norm = dict(eps=cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
            self.q_norm = RMSNorm((dh,), (None,), **norm)
            self.k_norm = RMSNorm((dh,), (None,), **norm)

    def _position_and_norm(self, q: jax.Array, k: jax.Array, rope_positions: jax.Array):
        """Steps 2-3 in the configured order, and the q pre-scale of step 4."""
        cfg = self.cfg
        rope = lambda u: u
        if cfg.position_encoding == "rope":
            inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_alpha)
            rope = lambda u: apply_rope(u, rope_positions, inv_freq)
        if cfg.qk_norm == "before_rope":
            q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        elif cfg.qk_norm == "after_rope":
            q, k = self.q_norm(rope(q)), self.k_norm(rope(k))
        else:
            q, k = rope(q), rope(k)
        ratio = cfg.attention_scale * cfg.head_dim**0.5
        if ratio != 1.0:
            q = (q.astype(jnp.float32) * ratio).astype(q.dtype)
        return q, k

    def project_qkv(self, x: jax.Array, rope_positions: jax.Array):
        """Steps 1-3: normalised, rotated q (B, L, H, Dh) (pre-scaled for step 4) and k, v
        (B, L, K, Dh)."""
        dt = self.cfg.dtype
        x = x.astype(dt)
        q = jnp.einsum("bld,dhk->blhk", x, self.q_proj[...].astype(dt))
        k = jnp.einsum("bld,dhk->blhk", x, self.k_proj[...].astype(dt))
        v = jnp.einsum("bld,dhk->blhk", x, self.v_proj[...].astype(dt))
        q = sharding.constrain(q, ("batch", "seq", "heads", None))
        k = sharding.constrain(k, ("batch", "seq", "kv_heads", None))
        v = sharding.constrain(v, ("batch", "seq", "kv_heads", None))
        q, k = self._position_and_norm(q, k, rope_positions)
        return q, k, v

    def attend_sequence(self, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Step 4 over a full sequence without L x L memory: q (B, L, H, Dh), k/v (B, L, K, Dh),
        segment_ids (B, L) -> out (B, L, H, Dh). With kernels on, each device runs the kernel on
        its batch rows and heads (GSPMD cannot split a Pallas call; the sequence is not sharded).
        With context parallelism each device runs the blockwise attention for its query shard
        against the gathered K/V (any kernel_impl; the TPU splash path with q_seq_shards is not
        wired yet)."""
        if context_parallel.context_size() > 1:  # K/V gathered over `context`, queries local
            return context_parallel.attention(q, k, v, segment_ids)
        impl = resolve_impl(self.cfg.kernel_impl)
        fn = lambda q, k, v, seg: attention_ops.attention(q, k, v, seg, impl=impl)
        if impl == "pallas":
            q_names, kv_names = ("batch", "seq", "heads", None), ("batch", "seq", "kv_heads", None)
            fn = sharding.manual_over_mesh(fn, (q_names, kv_names, kv_names, ("batch", "seq")), q_names)
        return fn(q, k, v, segment_ids)

    def output(self, out: jax.Array) -> jax.Array:
        """Step 5: out (B, L, H, Dh) -> y (B, L, D)."""
        dt = self.cfg.dtype
        y = jnp.einsum("blhk,hkd->bld", out.astype(dt), self.o_proj[...].astype(dt))
        return sharding.constrain(y, ("batch", "seq", None))

    def __call__(self, x: jax.Array, segment_ids: jax.Array, rope_positions: jax.Array) -> jax.Array:
        """x (B, L, D); segment_ids, rope_positions (B, L) int32 -> (B, L, D)."""
        q, k, v = self.project_qkv(x, rope_positions)
        return self.output(self.attend_sequence(q, k, v, segment_ids))

    # ------------------------------------------------------------------ generation (KV cache)
    def prefill(self, x: jax.Array, lengths: jax.Array, max_len: int):
        """Right-padded prompts x (B, L, D) with real lengths (B,) -> (y (B, L, D), cache).

        Queries see the causal prefix of their own prompt's real tokens: real tokens are segment 1,
        padding segment 0, so padding keys are hidden from real queries (padding queries attend among
        padding; their outputs are never used: MoE marks them invalid, Mamba2 skips them, decode
        overwrites their cache entries before they become visible, logits are read at real tokens);
        cache = {"k", "v": (B, max_len, K, Dh) in cfg.kv_cache_dtype}, entries past L are zero and
        padding entries are overwritten by decode steps (position = each sequence's length).
        """
        b, l, _ = x.shape
        idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        q, k, v = self.project_qkv(x, idx)
        y = self.output(self.attend_sequence(q, k, v, (idx < lengths[:, None]).astype(jnp.int32)))
        pad = [(0, 0), (0, max_len - l), (0, 0), (0, 0)]
        dt = self.cfg.kv_cache_dtype
        return y, {"k": jnp.pad(k.astype(dt), pad), "v": jnp.pad(v.astype(dt), pad)}

    def decode(self, x: jax.Array, cache: dict, positions: jax.Array, layer: jax.Array | None = None):
        """C new tokens per sequence (1 in a decode step, a chunk in chunked prefill): x (B, C, D),
        the first at positions (B,) (= tokens already cached) -> (y (B, C, D), cache with their K/V
        written at positions .. positions + C - 1; slots past max_len, only ever prefill padding,
        are dropped). Each query attends to the cache slots at or before its position, reading only
        the blocks that hold them (`cache_attention`: cost grows with the filled length, not
        max_len). `layer`: the cache leaves carry a leading stacked-layer axis (the scanned period)
        and this layer's slice is read and written in place at that index."""
        b, c, _ = x.shape
        pos = positions[:, None] + jnp.arange(c, dtype=jnp.int32)  # (B, C)
        q, k, v = self.project_qkv(x, pos)
        at = (jnp.arange(b)[:, None], pos) if layer is None else (layer, jnp.arange(b)[:, None], pos)
        kc = cache["k"].at[at].set(k.astype(cache["k"].dtype), mode="drop")
        vc = cache["v"].at[at].set(v.astype(cache["v"].dtype), mode="drop")
        out = cache_attention(q, kc, vc, pos, layer=layer)
        return self.output(out), {"k": kc, "v": vc}
