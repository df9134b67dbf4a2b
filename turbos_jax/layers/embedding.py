"""Token embedding and the language-model head (untied, or tied to the embedding table).

Both use `cfg.padded_vocab` rows/columns (vocab_size rounded up to vocab_multiple); the logits of
the padding columns are set to the most negative fp32 value, so they are never sampled and add
nothing to a softmax (and, unlike -inf, never make 0 * logit a NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.layers import context_parallel


def finish_logits(logits: jax.Array, cfg: ModelConfig) -> jax.Array:
    """fp32 logits (..., padded_vocab) x cfg.logits_scale, padding columns masked."""
    if cfg.logits_scale != 1.0:
        logits = logits * cfg.logits_scale
    if cfg.padded_vocab != cfg.vocab_size:
        real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
        logits = jnp.where(real, logits, jnp.finfo(jnp.float32).min)
    return sharding.constrain(logits, ("batch", "seq", "vocab"))


class Embed(nnx.Module):
    """tokens (B, L) int32 -> (B, L, d_model) in cfg.dtype, times cfg.embedding_scale; table
    `embedding` (padded_vocab, d_model). `attend` is the tied LM head."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = cfg.dtype
        init = nnx.initializers.truncated_normal(stddev=cfg.init_std)
        self.embedding = sharding.param(
            init, rngs.params(), (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"), cfg.param_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = self.embedding[...]
        if context_parallel.context_size() > 1:
            # The FSDP gather of the table, explicitly: from a table sharded over d_model on
            # (data, context), GSPMD cannot move the looked-up rows to their (batch, seq) shards
            # except by replicating them ("involuntary full rematerialization", measured on tiny
            # with context 2, forward and backward).
            table = sharding.constrain(table, ("vocab", None))
        x = jnp.take(table, tokens, axis=0)
        if self.cfg.embedding_scale != 1.0:
            x = x.astype(jnp.float32) * self.cfg.embedding_scale
        return sharding.constrain(x.astype(self.dtype), ("batch", "seq", None))

    def attend(self, x: jax.Array) -> jax.Array:
        """Tied LM head: (B, L, d_model) -> logits (B, L, vocab) fp32 = x @ embedding^T."""
        logits = jnp.einsum(
            "bld,vd->blv",
            x.astype(self.dtype),
            self.embedding[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return finish_logits(logits, self.cfg)


class LMHead(nnx.Module):
    """(B, L, d_model) -> logits (B, L, vocab) in fp32; kernel `kernel` (d_model, padded_vocab).

    The matmul runs in cfg.dtype with fp32 accumulation, so bf16 models do not round the logits the
    softmax cross-entropy sees.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = cfg.dtype
        init = nnx.initializers.truncated_normal(stddev=cfg.init_std)
        self.kernel = sharding.param(
            init, rngs.params(), (cfg.d_model, cfg.padded_vocab), ("embed", "vocab"), cfg.param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = jnp.einsum(
            "bld,dv->blv",
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return finish_logits(logits, self.cfg)
