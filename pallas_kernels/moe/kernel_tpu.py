"""Mosaic (TPU) kernel for the MoE row movement: gather rows, optionally weight and sum them.

One kernel, `gather_combine`, covers every row movement of the dropless path:

  out[m] = sum_{j<k} w[m, j] * x[idx[m*k + j]]            (M, d), in x's dtype
  dots[m, j] = sum_d x[idx[m*k + j], d] * dot_with[m, d]    (M, k) float32, optional

  * permute forward: k=1, no weights (a pure row gather, bit-exact).
  * permute backward / unpermute forward: k=top_k, idx = inverse permutation, weights = 1 / gates.
  * unpermute backward: k=1, idx = order // top_k, weights = gates in sorted order, and
    dot_with = y_sorted gives the gate cotangents as row dot products in the same pass.

Why not one DMA per row: TPU arrays are tiled (8 or 16 rows x 128 lanes) in HBM and VMEM, and Mosaic
(jax 0.10) rejects DMAs and BlockSpecs that start at a row not aligned to a tile, so a single
arbitrary row cannot be copied. Dynamic single-row *vector loads* from VMEM are legal for 32-bit
types, so the kernel keeps a column panel of x resident in VMEM and picks rows out of it:

Algorithm (grid = (d // td column panels, cdiv(M, R) row blocks); panel outer so it is fetched once):
  1. The index vector is scalar-prefetched into SMEM (`PrefetchScalarGridSpec`); the BlockSpec for x
     is the whole (N, td) panel, whose block index only changes with the outer axis.
  2. For each of the R rows of the block and each choice j: read the row index from SMEM, load that
     row of the panel as float32 and store it to row r of a (k, R, td) float32 scratch. bf16 panels
     are read through a uint32 view (two rows per 32-bit word, the even row in the low half), and the
     wanted half is shifted into the top 16 bits, which is exactly its float32 value.
  3. Dense epilogue on the (R, td) blocks: out = sum_j w[:, j] * rows_j (or rows_0 as is when k=1
     without weights), cast to x's dtype; the pipeline writes the block back.
  4. With `dot_with`: dots for this panel = sum over lanes of rows_j * dot_with block, written to a
     per-panel (ncols, M, k) output that the wrapper sums (panels are not visited consecutively).

M need not be a multiple of R: the index vector is padded with row 0 (always valid) and the
pipeline masks the write-back of the partial last block. td is the widest multiple of 128 dividing d
whose double-buffered panel fits `panel_bytes` (d itself when it is not a multiple of 128).
`fits` says whether a shape can run at all; callers fall back to XLA when it cannot.

Cost model (not measured, no TPU in this project's CI): HBM traffic is the minimum (x read once,
out written once), but every gathered row costs a few single-sublane vector ops, so the kernel is
likely bound by vector load/store slots rather than HBM bandwidth; R, td and this design against
XLA's gather need measuring on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@dataclasses.dataclass(frozen=True)
class TpuRowBlock:
    """rows: R, output rows per grid step (a multiple of 16 keeps bf16 blocks whole);
    panel_bytes: VMEM budget for the double-buffered (N, td) panel of x;
    vmem_limit_bytes: the scoped-VMEM limit asked of Mosaic (v5p/v5e/v6e have >= 95 MiB)."""

    rows: int = 64
    panel_bytes: int = 24 * 1024 * 1024
    vmem_limit_bytes: int = 48 * 1024 * 1024


def shape_like(x: jax.Array, shape, dtype) -> jax.ShapeDtypeStruct:
    """A pallas_call out_shape that varies over the same manual mesh axes as `x`, as shard_map with
    check_vma=True requires (the attribute is `manual_axis_type` in jax 0.10, `vma` before)."""
    aval = jax.typeof(x)
    for attr in ("manual_axis_type", "vma"):
        if hasattr(aval, attr):
            try:
                return jax.ShapeDtypeStruct(shape, dtype, **{attr: getattr(aval, attr)})
            except TypeError:  # this jax's ShapeDtypeStruct spells it differently
                continue
    return jax.ShapeDtypeStruct(shape, dtype)


def column_tile(n: int, d: int, itemsize: int, panel_bytes: int) -> int | None:
    """Widest td dividing d (a multiple of 128, or d itself) with 2 * n * td * itemsize within the
    budget; None when even the narrowest legal panel does not fit."""
    fits = lambda td: 2 * n * td * itemsize <= panel_bytes
    if fits(d):
        return d
    if d % 128:
        return None
    lanes = d // 128
    for width in range(lanes, 0, -1):
        if lanes % width == 0 and fits(width * 128):
            return width * 128
    return None


def fits(x_shape, dtype, block: TpuRowBlock = TpuRowBlock()) -> bool:
    """Whether `gather_combine` can run for source rows of this shape and dtype."""
    n, d = x_shape
    n += n % 2  # bf16 panels are padded to an even number of rows
    return (
        jnp.dtype(dtype) in SUPPORTED_DTYPES
        and column_tile(n, d, jnp.dtype(dtype).itemsize, block.panel_bytes) is not None
    )


def _load_row(panel, src, packed):
    """Row `src` of the panel as a (1, td) float32 vector (step 2)."""
    if not packed:
        return panel[pl.ds(src, 1), :].astype(jnp.float32)
    words = panel.bitcast(jnp.uint32)[pl.ds(src // 2, 1), :]  # [1, td] rows 2i (low), 2i+1 (high)
    bits = jnp.where(src % 2 == 1, words & jnp.uint32(0xFFFF0000), words << 16)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _kernel(idx_ref, *refs, top_k, rows, weighted, with_dot, packed):
    # Refs, in order: x panel (N, td), [weights (R, k) f32], [dot_with (R, td)], out (R, td),
    # [dots (R, k) f32 for this panel], scratch (k, R, td) f32.
    refs = list(refs)
    panel = refs.pop(0)
    w_ref = refs.pop(0) if weighted else None
    dw_ref = refs.pop(0) if with_dot else None
    out_ref = refs.pop(0)
    dots_ref = refs.pop(0) if with_dot else None
    (scratch,) = refs

    base = pl.program_id(1) * rows * top_k

    # Step 2.
    def gather_row(r, carry):
        for j in range(top_k):
            src = idx_ref[base + r * top_k + j]
            scratch[j, pl.ds(r, 1), :] = _load_row(panel, src, packed)
        return carry

    jax.lax.fori_loop(0, rows, gather_row, 0)

    # Step 3.
    if top_k == 1 and not weighted:
        out_ref[...] = scratch[0].astype(out_ref.dtype)
    else:
        acc = None
        for j in range(top_k):
            row = scratch[j]  # [R, td]
            if weighted:
                row = row * w_ref[:, j : j + 1]
            acc = row if acc is None else acc + row
        out_ref[...] = acc.astype(out_ref.dtype)

    # Step 4.
    if with_dot:
        other = dw_ref[...].astype(jnp.float32)  # [R, td]
        dots_ref[...] = jnp.concatenate(
            [jnp.sum(scratch[j] * other, axis=1, keepdims=True) for j in range(top_k)], axis=1
        )  # [R, k]


@functools.partial(jax.jit, static_argnames=("top_k", "block", "interpret"))
def gather_combine(
    x: jax.Array,
    idx: jax.Array,
    weights: jax.Array | None = None,
    dot_with: jax.Array | None = None,
    *,
    top_k: int = 1,
    block: TpuRowBlock = TpuRowBlock(),
    interpret: bool = False,
):
    """out[m] = sum_j weights[m, j] * x[idx[m*k + j]] on a TPU (see the module docstring).

    Args:
      x: (N, d) float32 or bfloat16 source rows (`fits` must hold).
      idx: (M*k,) int, rows of x; must lie in [0, N).
      weights: (M, k) gates (any float dtype, applied in float32) or None for all-ones.
      dot_with: (M, d) or None; when given, also returns the (M, k) float32 row dot products
        dots[m, j] = <x[idx[m*k + j]], dot_with[m]>.
      top_k: k.

    Returns:
      out (M, d) in x's dtype, or (out, dots) with `dot_with`.
    """
    if not fits(x.shape, x.dtype, block):
        raise ValueError(f"gather_combine: no TPU panel fits x {x.shape} {x.dtype}")
    packed = x.dtype == jnp.bfloat16
    if packed and x.shape[0] % 2:
        x = jnp.pad(x, ((0, 1), (0, 0)))  # the uint32 view needs row pairs
    n, d = x.shape
    m = idx.shape[0] // top_k
    rows = block.rows
    nblocks = pl.cdiv(m, rows)
    td = column_tile(n, d, x.dtype.itemsize, block.panel_bytes)
    ncols = d // td
    # Step 1: pad to whole blocks with a valid row so the last block's extra reads stay in bounds.
    idx = jnp.pad(idx.astype(jnp.int32), (0, nblocks * rows * top_k - idx.shape[0]))

    row_block = lambda c, b, idx_ref: (b, c)
    k_block = lambda c, b, idx_ref: (b, 0)
    in_specs = [pl.BlockSpec((n, td), lambda c, b, idx_ref: (0, c))]
    operands = [x]
    if weights is not None:
        in_specs.append(pl.BlockSpec((rows, top_k), k_block))
        operands.append(weights.astype(jnp.float32).reshape(m, top_k))
    if dot_with is not None:
        in_specs.append(pl.BlockSpec((rows, td), row_block))
        operands.append(dot_with)
    out_specs = [pl.BlockSpec((rows, td), row_block)]
    out_shape = [shape_like(x, (m, d), x.dtype)]
    if dot_with is not None:
        out_specs.append(pl.BlockSpec((None, rows, top_k), lambda c, b, idx_ref: (c, b, 0)))
        out_shape.append(shape_like(x, (ncols, m, top_k), jnp.float32))

    kernel = functools.partial(
        _kernel,
        top_k=top_k,
        rows=rows,
        weighted=weights is not None,
        with_dot=dot_with is not None,
        packed=packed,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(ncols, nblocks),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((top_k, rows, td), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel"), vmem_limit_bytes=block.vmem_limit_bytes
        ),
        cost_estimate=pl.CostEstimate(
            flops=2 * m * top_k * d, transcendentals=0, bytes_accessed=(n + 2 * m) * d * x.dtype.itemsize
        ),
        interpret=interpret,
        name="moe_gather_combine",
    )(idx, *operands)
    if dot_with is None:
        return outs[0]
    out, dots = outs
    return out, jnp.sum(dots, axis=0)
