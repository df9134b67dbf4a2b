"""Int8 weight-only quantisation for sampling: per-output-channel symmetric int8 matmul weights.

`quantize_params(params)` replaces the value of every matmul weight (attention q/k/v/o, Mamba2
in_proj / out_proj, MoE experts and shared expert, dense FFN, LM head) by a `QTensor(q int8, scale fp32)` with

    scale = max |w| over the contracted (input) axes / 127,   q = round(w / scale)  in [-127, 127]

so each output channel (and each stacked layer / expert) has its own scale. Not quantised: norms,
biases, conv taps, A_log, D, dt_bias, the embedding table (a lookup, not a matmul) and the MoE
router (kept exact so quantisation never flips an expert choice; it is d_model x E, tiny).

The decode path stores the QTensors (int8 in memory) and dequantises one layer's weights at a time
inside the compiled step (`dequantize`, called by TurbosModel's generation methods right before a
layer runs), so a full-precision copy of the whole model never exists.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Parameter name -> contracted axes of the unstacked weight, counted from the end (stacked period
# parameters have an extra leading axis, so negative axes work for both).
CONTRACTED = {
    "q_proj": (-3,),
    "k_proj": (-3,),
    "v_proj": (-3,),
    "o_proj": (-3, -2),
    "z": (-3,),
    "x": (-3,),
    "B": (-3,),
    "C": (-3,),
    "dt": (-2,),
    "out_proj": (-3, -2),
    "wi_gate": (-2,),
    "wi_up": (-2,),
    "wo": (-2,),
    "shared_gate": (-2,),
    "shared_up": (-2,),
    "shared_down": (-2,),
    "gate": (-2,),  # dense FFN (layout symbol D, layers/mlp.py)
    "up": (-2,),
    "down": (-2,),
    "kernel": (-2,),
}
_PARENTS = {
    "z": "in_proj",
    "x": "in_proj",
    "B": "in_proj",
    "C": "in_proj",
    "dt": "in_proj",
    "kernel": "lm_head",
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QTensor:
    """int8 values and fp32 scales broadcastable against them: w ~= q * scale."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.q.astype(jnp.float32) * self.scale).astype(dtype)


def quantize_array(w: jax.Array, axes: tuple[int, ...]) -> QTensor:
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return QTensor(q, scale)


def _contracted_axes(path) -> tuple[int, ...] | None:
    keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
    keys = [k for k in keys if k != "value"]
    name = keys[-1]
    if name not in CONTRACTED:
        return None
    parent = _PARENTS.get(name)
    if parent is not None and (len(keys) < 2 or keys[-2] != parent):
        return None  # e.g. conv1d.x / conv1d.B are depthwise taps, not matmuls
    return CONTRACTED[name]


def quantize_params(params):
    """nnx.State (or any pytree of arrays keyed like it) -> same tree with matmul weights as
    QTensor leaves. Works on the stacked (scanned) parameters too."""

    def quantize(path, leaf):
        axes = _contracted_axes(path)
        return leaf if axes is None else quantize_array(leaf, axes)

    return jax.tree_util.tree_map_with_path(quantize, params)


def dequantize(tree, dtype=jnp.float32):
    """Inverse of quantize_params (QTensor -> dtype array); other leaves pass through."""
    is_q = lambda v: isinstance(v, QTensor)
    return jax.tree.map(lambda v: v.dequantize(dtype) if is_q(v) else v, tree, is_leaf=is_q)


def nbytes(tree) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))
