"""Platform dispatch for the MoE kernels: row gather/combine and grouped matmul.

Row movement (`gather_combine`, `gather_rows`, `weighted_combine`), one contract everywhere:

  out[m] = sum_{j<k} w[m, j] * x[idx[m*k + j]]   (M, d) in x's dtype, float32 accumulation
  dots[m, j] = <x[idx[m*k + j]], dot_with[m]>     (M, k) float32, when `dot_with` is given

  * tpu: `kernel_tpu` (Mosaic); shapes/dtypes it cannot hold in VMEM (`kernel_tpu.fits`) use the
    jnp formulation below instead.
  * gpu (CUDA): `kernel_gpu` (Triton).
  * other (CPU): `kernel_tpu` in Pallas interpret mode (the jnp formulation when it does not fit),
    so tests exercise the TPU kernel's indexing; `kernel_gpu` is tested in interpret mode directly.

Grouped matmul (`grouped_matmul`), (M, K) x (E, K, N) -> (M, N) over contiguous row groups:

  * tpu: megablox `gmm` (JAX's Mosaic grouped matmul, `jax.experimental.pallas.ops.tpu.megablox`),
    differentiable through its own custom_vjp (transposed gmm for d lhs, `tgmm` for d rhs). We use
    it rather than writing another: it is the kernel MaxText trains with, and nothing could be
    measured on a TPU in this project to justify replacing it. Its constraints are met here:
      1. dtypes: bf16/f32 only; other dtypes, or lhs/rhs dtypes that differ, use `ragged_dot`.
      2. M is padded to a multiple of the row tile (the padded rows belong to no group); K and N
         are zero-padded to multiples of 128 (no-op for TurboS shapes, otherwise a copy of the
         weights per call) and tiled by the largest divisor <= `GmmTiling`.
      3. megablox leaves rows at or beyond sum(group_sizes) unwritten (garbage), in the forward
         output and in d lhs: the output is masked to zero, and an identity with a masking VJP on
         lhs zeroes those rows of the cotangent, matching `ragged_dot`.
  * gpu: `jax.lax.ragged_dot` (XLA's grouped GEMM on GPU), differentiated by JAX; no Triton grouped
    matmul is written here (XLA's is tuned per GPU; replacing it would need measurements).
  * other (CPU): megablox in interpret mode (slow but small test shapes are fine), so the padding
    and masking above are what the CPU tests check.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import megablox

from pallas_kernels import by_platform
from pallas_kernels.moe import kernel_gpu, kernel_tpu


# ------------------------------------------------------------------------------------ row movement
def gather_combine_xla(x, idx, weights=None, dot_with=None, *, top_k=1):
    """The jnp formulation of the contract (fallback when no kernel applies)."""
    m = idx.shape[0] // top_k
    rows = jnp.take(x, idx, axis=0).reshape(m, top_k, -1)  # [M, k, d]
    if top_k == 1 and weights is None:
        out = rows[:, 0]
    else:
        w = jnp.ones((m, top_k), jnp.float32) if weights is None else weights.astype(jnp.float32)
        out = jnp.einsum("mkd,mk->md", rows.astype(jnp.float32), w.reshape(m, top_k))
        out = out.astype(x.dtype)
    if dot_with is None:
        return out
    dots = jnp.einsum("mkd,md->mk", rows.astype(jnp.float32), dot_with.astype(jnp.float32))
    return out, dots


def _tpu_or_xla(interpret):
    def run(x, idx, weights, dot_with, *, top_k):
        if not kernel_tpu.fits(x.shape, x.dtype):
            return gather_combine_xla(x, idx, weights, dot_with, top_k=top_k)
        return kernel_tpu.gather_combine(x, idx, weights, dot_with, top_k=top_k, interpret=interpret)

    return run


def gather_combine(x, idx, weights=None, dot_with=None, *, top_k=1):
    """out[m] = sum_j weights[m, j] * x[idx[m*k + j]] (and optional row dots), any platform.

    x (N, d); idx (M*k,) int in [0, N); weights (M, k) or None (all ones); dot_with (M, d) or None.
    Returns out (M, d) in x's dtype, or (out, dots (M, k) float32) with `dot_with`. Not
    differentiable by itself: the ops in `ops.py` define the VJPs.
    """
    branch = lambda fn: functools.partial(fn, top_k=top_k)
    return by_platform(
        x,
        idx,
        weights,
        dot_with,
        tpu=branch(_tpu_or_xla(False)),
        gpu=branch(kernel_gpu.gather_combine),
        other=branch(_tpu_or_xla(True)),
    )


def gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """(T, d), (M,) int -> (M, d), row i = x[idx[i]] (bit-exact copy)."""
    return gather_combine(x, idx)


def weighted_combine(y: jax.Array, inverse: jax.Array, weights: jax.Array | None, top_k: int):
    """(T*k, d) -> (T, d), out[t] = sum_j w[t, j] * y[inverse[t*k + j]] in float32, y's dtype;
    weights None means all ones (the scatter-add that is permute's transpose)."""
    return gather_combine(y, inverse, weights, top_k=top_k)


def inverse_permutation(order: jax.Array) -> jax.Array:
    """inverse[order[i]] = i, int32."""
    n = order.shape[0]
    return jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))


# ---------------------------------------------------------------------------------- grouped matmul
@dataclasses.dataclass(frozen=True)
class GmmTiling:
    """Upper bounds on megablox's (tm, tk, tn); each is cut to fit the (padded) problem. Untuned:
    (512, 512, 512) keeps the double-buffered bf16 blocks and the f32 accumulator near 4 MiB."""

    tm: int = 512
    tk: int = 512
    tn: int = 512


_MEGABLOX_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _divisor_tile(size: int, cap: int) -> int:
    """Largest multiple of 128 dividing `size` (a multiple of 128) and <= max(cap, 128)."""
    lanes = size // 128
    return 128 * max(w for w in range(1, lanes + 1) if lanes % w == 0 and 128 * w <= max(cap, 128))


@jax.custom_vjp
def _mask_rows_cotangent(x, limit):
    """Identity whose VJP zeroes cotangent rows >= limit (megablox's d lhs leaves them garbage)."""
    return x


def _mask_fwd(x, limit):
    return x, limit


def _mask_bwd(limit, g):
    rows = jax.lax.broadcasted_iota(jnp.int32, g.shape, 0)
    return jnp.where(rows < limit, g, jnp.zeros_like(g)), None


_mask_rows_cotangent.defvjp(_mask_fwd, _mask_bwd)


def megablox_applies(lhs, rhs) -> bool:
    return lhs.dtype == rhs.dtype and lhs.dtype in _MEGABLOX_DTYPES


def grouped_matmul_megablox(lhs, rhs, group_sizes, out_dtype, *, tiling=GmmTiling(), interpret=False):
    """megablox gmm with the padding and masking of the module docstring (steps 2-3);
    differentiable. lhs (M, K), rhs (E, K, N), group_sizes (E,) int32 -> (M, N) out_dtype."""
    m, k = lhs.shape
    n = rhs.shape[2]
    tm = min(tiling.tm, _round_up(m, 128))
    mp, kp, np_ = _round_up(m, tm), _round_up(k, 128), _round_up(n, 128)
    tiles = (tm, _divisor_tile(kp, tiling.tk), _divisor_tile(np_, tiling.tn))
    total = jnp.sum(group_sizes)
    lhs = jnp.pad(lhs, ((0, mp - m), (0, kp - k))) if (mp, kp) != (m, k) else lhs
    rhs = jnp.pad(rhs, ((0, 0), (0, kp - k), (0, np_ - n))) if (kp, np_) != (k, n) else rhs
    lhs = _mask_rows_cotangent(lhs, total)
    out = megablox.gmm(lhs, rhs, group_sizes, out_dtype, tiles, None, None, False, interpret)
    rows = jax.lax.broadcasted_iota(jnp.int32, out.shape, 0)
    out = jnp.where(rows < total, out, jnp.zeros_like(out))
    return out[:m, :n]


def _ragged_dot(lhs, rhs, group_sizes, out_dtype):
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=out_dtype)


def grouped_matmul(lhs, rhs, group_sizes, out_dtype=None):
    """(M, K) x (E, K, N) -> (M, N) in `out_dtype` (default lhs's), rows >= sum(group_sizes) zero;
    per platform as in the module docstring. Differentiable in lhs and rhs."""
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    if not megablox_applies(lhs, rhs):
        return _ragged_dot(lhs, rhs, group_sizes, out_dtype)
    mb = lambda interpret: functools.partial(
        grouped_matmul_megablox, out_dtype=out_dtype, interpret=interpret
    )
    return by_platform(
        lhs,
        rhs,
        group_sizes,
        tpu=mb(False),
        gpu=functools.partial(_ragged_dot, out_dtype=out_dtype),
        other=mb(True),
    )
