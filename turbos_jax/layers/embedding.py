"""Token embedding and the (untied) language-model head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.layers import context_parallel


class Embed(nnx.Module):
    """tokens (B, L) int32 -> (B, L, d_model) in cfg.dtype; table `embedding` (vocab, d_model)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        init = nnx.initializers.truncated_normal(stddev=cfg.init_std)
        self.embedding = sharding.param(
            init, rngs.params(), (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = self.embedding[...]
        if context_parallel.context_size() > 1:
            # The FSDP gather of the table, explicitly: from a table sharded over d_model on
            # (data, context), GSPMD cannot move the looked-up rows to their (batch, seq) shards
            # except by replicating them ("involuntary full rematerialization", measured on tiny
            # with context 2, forward and backward).
            table = sharding.constrain(table, ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        return sharding.constrain(x, ("batch", "seq", None))


class LMHead(nnx.Module):
    """(B, L, d_model) -> logits (B, L, vocab) in fp32; kernel `kernel` (d_model, vocab).

    The matmul runs in cfg.dtype with fp32 accumulation, so bf16 models do not round the logits the
    softmax cross-entropy sees.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.dtype = cfg.dtype
        init = nnx.initializers.truncated_normal(stddev=cfg.init_std)
        self.kernel = sharding.param(
            init, rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        logits = jnp.einsum(
            "bld,dv->blv",
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return sharding.constrain(logits, ("batch", "seq", "vocab"))
