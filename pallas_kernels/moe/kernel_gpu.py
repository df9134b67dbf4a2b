"""Triton (NVIDIA GPU) kernel for the MoE row movement; same contract as `kernel_tpu.gather_combine`:

  out[m] = sum_{j<k} w[m, j] * x[idx[m*k + j]]            (M, d), in x's dtype
  dots[m, j] = sum_d x[idx[m*k + j], d] * dot_with[m, d]    (M, k) float32, optional

Algorithm (grid = (cdiv(M, R),), one program per R output rows):
  1. Load the R*k row indices (a strided vector load per choice j) and the (R,) gate column of each j.
  2. Walk the columns in chunks of BD lanes: gather the (R, BD) rows of every choice with one
     pointer-indexed load each (GPU memory has no tiling, so arbitrary rows are plain loads),
     combine them in float32 (or pass them through unchanged for k=1 without weights), store.
  3. With `dot_with`, accumulate the per-choice row dot products over the column chunks in registers
     and store the (R, k) result once at the end.

Rows beyond M and columns beyond d are masked, so neither needs padding. Block sizes are powers of
two (Triton's requirement for tensor shapes). Not tuned: R, BD, num_warps need an H100 to measure.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.moe.kernel_tpu import shape_like


@dataclasses.dataclass(frozen=True)
class GpuRowBlock:
    """rows: R rows per program; cols: BD lanes per column chunk; both powers of two."""

    rows: int = 16
    cols: int = 512
    num_warps: int = 4
    num_stages: int = 2


def _kernel(idx_ref, x_ref, *refs, m, d, top_k, rows, cols, weighted, with_dot):
    # Refs, in order: [weights (M, k) f32], [dot_with (M, d)], out (M, d), [dots (M, k) f32].
    refs = list(refs)
    w_ref = refs.pop(0) if weighted else None
    dw_ref = refs.pop(0) if with_dot else None
    out_ref = refs.pop(0)
    dots_ref = refs.pop(0) if with_dot else None

    row = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)  # [R]
    row_ok = row < m
    # Step 1.
    src = [plgpu.load(idx_ref.at[row * top_k + j], mask=row_ok, other=0) for j in range(top_k)]
    gate = [plgpu.load(w_ref.at[row, j], mask=row_ok, other=0.0) if weighted else None for j in range(top_k)]

    # Step 2.
    def chunk(c, dots):
        col = c * cols + jnp.arange(cols, dtype=jnp.int32)  # [BD]
        ok = row_ok[:, None] & (col < d)[None, :]  # [R, BD]
        # Integer-array indices on both axes (not a pl.ds for the columns): interpret mode only
        # discharges loads whose indices are all arrays or all slices.
        span = col[None, :]
        vals = [plgpu.load(x_ref.at[src[j][:, None], span], mask=ok, other=0) for j in range(top_k)]
        if top_k == 1 and not weighted:
            plgpu.store(out_ref.at[row[:, None], span], vals[0], mask=ok)
        else:
            acc = jnp.zeros((rows, cols), jnp.float32)
            for j in range(top_k):
                v = vals[j].astype(jnp.float32)
                acc += v * gate[j][:, None] if weighted else v
            plgpu.store(out_ref.at[row[:, None], span], acc.astype(out_ref.dtype), mask=ok)
        if not with_dot:
            return dots
        other = plgpu.load(dw_ref.at[row[:, None], span], mask=ok, other=0).astype(jnp.float32)
        return tuple(dots[j] + jnp.sum(vals[j].astype(jnp.float32) * other, axis=1) for j in range(top_k))

    zero = tuple(jnp.zeros((rows,), jnp.float32) for _ in range(top_k)) if with_dot else ()
    dots = jax.lax.fori_loop(0, pl.cdiv(d, cols), chunk, zero)
    # Step 3.
    for j in range(top_k if with_dot else 0):
        plgpu.store(dots_ref.at[row, j], dots[j], mask=row_ok)


@functools.partial(jax.jit, static_argnames=("top_k", "block", "interpret"))
def gather_combine(
    x: jax.Array,
    idx: jax.Array,
    weights: jax.Array | None = None,
    dot_with: jax.Array | None = None,
    *,
    top_k: int = 1,
    block: GpuRowBlock = GpuRowBlock(),
    interpret: bool = False,
):
    """out[m] = sum_j weights[m, j] * x[idx[m*k + j]] on an NVIDIA GPU (see the module docstring).

    Args:
      x: (N, d) source rows, any float dtype.
      idx: (M*k,) int, rows of x; must lie in [0, N).
      weights: (M, k) gates (applied in float32) or None for all-ones.
      dot_with: (M, d) or None; when given, also returns the (M, k) float32 row dot products.
      top_k: k.

    Returns:
      out (M, d) in x's dtype, or (out, dots) with `dot_with`.
    """
    _, d = x.shape
    m = idx.shape[0] // top_k
    rows = block.rows
    cols = min(block.cols, pl.next_power_of_2(d))
    operands = [idx.astype(jnp.int32), x]
    if weights is not None:
        operands.append(weights.astype(jnp.float32).reshape(m, top_k))
    if dot_with is not None:
        operands.append(dot_with)
    out_shape = [shape_like(x, (m, d), x.dtype)]
    if dot_with is not None:
        out_shape.append(shape_like(x, (m, top_k), jnp.float32))
    kernel = functools.partial(
        _kernel,
        m=m,
        d=d,
        top_k=top_k,
        rows=rows,
        cols=cols,
        weighted=weights is not None,
        with_dot=dot_with is not None,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(m, rows),),
        compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
        interpret=interpret,
        name="moe_gather_combine",
    )(*operands)
    return tuple(outs) if dot_with is not None else outs[0]
