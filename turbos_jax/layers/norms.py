"""RMS normalisation: the plain per-vector norm and Mamba2's gated norm grouped per SSM group."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from turbos_jax import sharding


def _rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / rms(x) over the last axis, in fp32 (bf16 sums of squares lose too much)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale over the trailing `len(shape)` axes (flattened), scale initialised to 1.

    `shape` is the normalised block, e.g. (d_model,) for the residual stream or (head_dim,) for
    QK-norm, where one scale vector is shared by every head.
    """

    def __init__(self, shape: Sequence[int], names, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = sharding.param(nnx.initializers.ones, rngs.params(), shape, names, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.scale[...]
        lead = x.shape[: x.ndim - scale.ndim]
        y = _rms_normalize(x.reshape(*lead, -1), self.eps).reshape(x.shape)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class GatedGroupRMSNorm(nnx.Module):
    """Mamba2's output norm: RMSNorm(y * silu(z)), statistics taken per SSM group.

    y, z: (..., heads, head_dim). The heads are split into `groups` contiguous groups (head i belongs
    to group i // (heads // groups)) and each group's heads*head_dim/groups channels are normalised
    together, as mamba_ssm's RMSNormGated with group_size = d_inner / ngroups and
    norm_before_gate=False. Grouping keeps the norm local to a tensor-parallel shard of heads.
    """

    def __init__(self, heads: int, head_dim: int, groups: int, *, eps: float, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.groups = groups
        self.scale = sharding.param(
            nnx.initializers.ones, rngs.params(), (heads, head_dim), ("heads", None), param_dtype
        )

    def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
        *lead, h, p = y.shape
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        normed = _rms_normalize(gated.reshape(*lead, self.groups, (h // self.groups) * p), self.eps)
        out = normed.reshape(*lead, h, p) * self.scale[...].astype(jnp.float32)
        return out.astype(y.dtype)
