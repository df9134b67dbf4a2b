"""Mamba2 chunked SSD scan as a TPU (Mosaic) Pallas kernel: the forward pass and shared plumbing.

Semantics are `reference.chunk_scan(..., return_final_states=True)` with D, z, dt_bias and softplus
left out (the caller applies them); `kernel_tpu_bwd.backward` is its gradient. Shapes:

    x (b, l, h, p) any float   dt (b, l, h) fp32, already processed   A (h,) fp32
    B, C (b, l, g, n), h % g == 0   initial_states (b, h, p, n) fp32   seq_idx (b, l) int32
    -> y (b, l, h, p) fp32 (no D skip, no gating), final_states (b, h, p, n) fp32

Kernel layouts are head-major so every block's last two dims are tile-aligned or whole: x and y
(b, h, L, p) in (Q, p) tiles, B and C (b, g, L, n) in (Q, n) tiles, and the per-position scalars
packed as `rows` (b, h, nc, 8, Q) fp32 (one (8, Q) tile per head and chunk; see `_ROWS`). One grid
step handles a chunk of `heads_per_block` heads of one B/C group, so C B^T is formed once for them.

Algorithm (Q = chunk length, L = l padded to a multiple of Q, nc = L / Q):
  1. Wrapper (`decay_terms`, plain differentiable JAX): pad with dt = 0 continuing the last segment,
     cs = per-chunk inclusive cumsum of dt*A, and fold the segment masks into three decay terms:
     din_i = exp(cs_i) [i still in the incoming segment]      (reach of the incoming state),
     wout_j = exp(cs_last - cs_j) [j in the last segment] dt_j  (weight into the chunk-end state),
     dec = exp(cs_last) [no reset inside the chunk]             (decay of the carried state).
     Keeping these outside the kernel means the backward gets d(dt), d(A) through them by `jax.vjp`.
  2. Kernel, grid (b, h / heads_per_block, nc), chunks sequential, the running (p, n) fp32 state of
     each head in a VMEM scratch, initialised at chunk 0 from initial_states (or 0):
       a. y_diag = (C B^T * Lmask) @ (dt x), Lmask[i, j] = exp(cs_i - cs_j) for j <= i in the same
          segment, else 0 (the exponent is masked to -inf before exp, so nothing overflows);
       b. y_off = din * (C @ H^T), H the state entering the chunk;
       c. H <- dec * H + (wout x)^T @ B; the last chunk writes H as final_states.
     With `emit_states` it also writes every incoming H, which the backward pass recomputes this way.
  3. Wrapper: drop the padding and go back to (b, l, h, p).

Matmuls take the inputs' dtype (bf16 stays bf16 on the MXU; fp32 at HIGHEST precision) and
accumulate in fp32; states, decays and the cumsum are fp32 throughout.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mamba2 import reference

F32 = jnp.float32

# Row order of the packed per-position tile. Rows are (1, Q) views; the kernel transposes the tile
# once to get (Q, 1) column views. ROW_DEC holds the per-chunk scalar broadcast along the row.
ROW_CS, ROW_DT, ROW_DIN, ROW_WOUT, ROW_SEG, ROW_DEC = range(6)
N_ROWS = 8  # one full fp32 sublane tile


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling knobs.

    heads_per_block: heads handled per grid step; must divide h // g (they share one B/C group, so
      C B^T and the B/C tiles are loaded and formed once for them). None: the largest divisor of
      h // g that is <= 4 -- TurboS has 4 heads per group, so a step covers a whole group with a
      working set of about 3 MiB of VMEM (backward) at Q=128, p=64, n=128 (well under the scoped default)
      while b * g steps remain for the two TensorCores of a v5p chip to share.
    vmem_limit_bytes: Mosaic's scoped VMEM limit; None keeps the compiler default.
    """

    heads_per_block: int | None = None
    vmem_limit_bytes: int | None = None

    def heads(self, r: int) -> int:
        hb = self.heads_per_block or max(d for d in range(1, min(r, 4) + 1) if r % d == 0)
        if r % hb:
            raise ValueError(f"heads_per_block={hb} must divide the heads per group ({r})")
        return hb


def chunk_len(l: int, chunk_size: int) -> int:
    """The chunk actually used: chunk_size, or l rounded up to a sublane multiple when shorter
    (padding with dt = 0 is exact, and an aligned chunk keeps the tiles aligned)."""
    return min(int(chunk_size), -(-l // 16) * 16)


def pad_len(t, total, axis=1):
    """Zero-pads axis `axis` of t to length `total`."""
    extra = total - t.shape[axis]
    if not extra:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, extra)
    return jnp.pad(t, widths)


def padded_segments(seq_idx, total):
    """seq_idx (b, l) -> segment ids (b, total), the padding continuing the last segment."""
    seg = reference.segment_ids(seq_idx)
    return jnp.pad(seg, ((0, 0), (0, total - seg.shape[1])), mode="edge")


def decay_terms(dt, A, seg, q):
    """Step 1: dt (b, l, h) fp32, A (h,), seg (b, L) int or None, chunk q ->
    (cs, dt, din, wout) each (b, h, nc, q) and dec (b, h, nc), all fp32. Differentiable in dt, A."""
    b, l, h = dt.shape
    total = seg.shape[1] if seg is not None else -(-l // q) * q
    nc = total // q
    dtc = jnp.moveaxis(pad_len(dt.astype(F32), total).reshape(b, nc, q, h), 3, 1)
    cs = jnp.cumsum(dtc * A.astype(F32)[:, None, None], axis=-1)
    din = jnp.exp(cs)
    wout = jnp.exp(cs[..., -1:] - cs) * dtc
    dec = jnp.exp(cs[..., -1])
    if seg is not None:
        segc = seg.reshape(b, 1, nc, q)
        # The state entering chunk c belongs to the segment of chunk c-1's last position.
        incoming = jnp.concatenate([segc[:, :, :1, 0], segc[:, :, :-1, -1]], axis=2)  # (b, 1, nc)
        din = jnp.where(segc == incoming[..., None], din, 0.0)
        wout = jnp.where(segc == segc[..., -1:], wout, 0.0)
        # Ids are non-decreasing: the last position sharing the incoming segment means no reset.
        dec = jnp.where(segc[..., -1] == incoming, dec, 0.0)
    return cs, dtc, din, wout, dec


def pack_rows(cs, dtc, din, wout, dec, seg):
    """(b, h, nc, q) terms, dec (b, h, nc), seg (b, L) or None -> rows (b, h, nc, 8, q) fp32."""
    b, h, nc, q = cs.shape
    # Segment ids are position counts (< 2^24), so fp32 holds them exactly for the equality tests.
    segf = jnp.zeros((b, 1, nc, q), F32) if seg is None else seg.reshape(b, 1, nc, q).astype(F32)
    rows = [cs, dtc, din, wout, jnp.broadcast_to(segf, cs.shape), jnp.broadcast_to(dec[..., None], cs.shape)]
    rows += [jnp.zeros_like(cs)] * (N_ROWS - len(rows))
    return jnp.stack(rows, axis=3)


def head_major(t, total):
    """(b, l, k, d) -> (b, k, total, d), zero-padded along l."""
    return jnp.swapaxes(pad_len(t, total), 1, 2)


def mm_dtype(*dtypes):
    """Matmul operand dtype: bf16 (the MXU's native input) when every input is bf16, else fp32."""
    return jnp.bfloat16 if all(jnp.dtype(d) == jnp.bfloat16 for d in dtypes) else F32


def dot(a, b, contract, dtype):
    """a, b cast to `dtype`, contracting dims `contract` = (a_dim, b_dim), fp32 accumulation."""
    prec = jax.lax.Precision.HIGHEST if dtype == F32 else None
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        (((contract[0],), (contract[1],)), ((), ())),
        precision=prec,
        preferred_element_type=F32,
    )


class ChunkView:
    """Column (Q, 1) and row (1, Q) views of one head's (8, Q) packed tile."""

    def __init__(self, rows):
        self.rows = rows
        self.cols = rows.T  # one aligned (8, Q) -> (Q, 8) transpose serves every column view

    def col(self, i):
        return self.cols[:, i : i + 1]

    def row(self, i):
        return self.rows[i : i + 1, :]

    @property
    def dec(self):
        return self.rows[ROW_DEC : ROW_DEC + 1, 0:1]

    def decay_matrix(self, has_seg):
        """Lmask (Q, Q): exp(cs_i - cs_j) for j <= i (same segment when has_seg), else exactly 0."""
        q = self.rows.shape[1]
        keep = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0) >= jax.lax.broadcasted_iota(
            jnp.int32, (q, q), 1
        )
        if has_seg:
            keep = keep & (self.col(ROW_SEG) == self.row(ROW_SEG))
        return jnp.exp(jnp.where(keep, self.col(ROW_CS) - self.row(ROW_CS), -jnp.inf))


def _fwd_kernel(*refs, hb, has_init, has_seg, compute_y, emit_states, dtype):
    rows_ref, x_ref, b_ref, c_ref, *refs = refs
    init_ref = refs.pop(0) if has_init else None
    y_ref = refs.pop(0) if compute_y else None
    states_ref = refs.pop(0) if emit_states else None
    final_ref, h_scr = refs
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        h_scr[...] = init_ref[...] if has_init else jnp.zeros(h_scr.shape, F32)

    Bm, Cm = b_ref[...], c_ref[...]
    cb = dot(Cm, Bm, (1, 1), dtype) if compute_y else None  # shared by the block's heads
    for k in range(hb):
        view = ChunkView(rows_ref[k])
        x = x_ref[k].astype(F32)
        H = h_scr[k]
        if emit_states:
            states_ref[k] = H
        if compute_y:
            scores = cb * view.decay_matrix(has_seg)
            y = dot(scores, x * view.col(ROW_DT), (1, 0), dtype)  # step 2a
            y += view.col(ROW_DIN) * dot(Cm, H, (1, 1), dtype)  # step 2b
            y_ref[k] = y
        h_scr[k] = view.dec * H + dot(x * view.col(ROW_WOUT), Bm, (0, 0), dtype)  # step 2c

    @pl.when(c == pl.num_programs(2) - 1)
    def _():
        final_ref[...] = h_scr[...]


def compiler_params(block, semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=block.vmem_limit_bytes)


def forward_call(rows, xh, Bh, Ch, init, *, has_seg, compute_y, emit_states, block, interpret):
    """Runs the step-2 kernel on prepared operands: rows (b, h, nc, 8, Q), xh (b, h, L, p),
    Bh/Ch (b, g, L, n), init (b, h, p, n) fp32 or None. Returns [y (b, h, L, p)] if compute_y,
    [states (b, h, nc, p, n)] if emit_states, then final (b, h, p, n)."""
    b, h, nc, _, q = rows.shape
    p, g, n = xh.shape[-1], Bh.shape[1], Bh.shape[-1]
    hb = block.heads(h // g)
    per_group = h // g // hb  # head blocks per group
    row_spec = pl.BlockSpec((None, hb, None, N_ROWS, q), lambda i, j, c: (i, j, c, 0, 0))
    seq_spec = pl.BlockSpec((None, hb, q, p), lambda i, j, c: (i, j, c, 0))
    grp_spec = pl.BlockSpec((None, None, q, n), lambda i, j, c: (i, j // per_group, c, 0))
    st_spec = pl.BlockSpec((None, hb, p, n), lambda i, j, c: (i, j, 0, 0))
    in_specs = [row_spec, seq_spec, grp_spec, grp_spec]
    args = [rows, xh, Bh, Ch]
    if init is not None:
        in_specs.append(st_spec)
        args.append(init.astype(F32))
    out_specs, out_shape = [], []
    if compute_y:
        out_specs.append(seq_spec)
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc * q, p), F32))
    if emit_states:
        out_specs.append(pl.BlockSpec((None, hb, None, p, n), lambda i, j, c: (i, j, c, 0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((b, h, nc, p, n), F32))
    out_specs.append(st_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, h, p, n), F32))
    kernel = functools.partial(
        _fwd_kernel,
        hb=hb,
        has_init=init is not None,
        has_seg=has_seg,
        compute_y=compute_y,
        emit_states=emit_states,
        dtype=mm_dtype(xh.dtype, Bh.dtype, Ch.dtype),
    )
    return pl.pallas_call(
        kernel,
        grid=(b, h // hb, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((hb, p, n), F32)],
        compiler_params=compiler_params(block, ("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)


def layout(x, dt, A, B, C, seq_idx, chunk_size):
    """Checks shapes; returns the chunk q, the padded length L and the padded segment ids or None."""
    reference.check_shapes(x, dt, A, B, C)
    l = x.shape[1]
    q = chunk_len(l, chunk_size)
    total = -(-l // q) * q
    return q, total, None if seq_idx is None else padded_segments(seq_idx, total)


def forward(x, dt, A, B, C, initial_states, seq_idx, *, chunk_size, block=None, interpret=False):
    """Mamba2 SSD scan without D/z: x (b, l, h, p), dt (b, l, h) fp32 (processed), A (h,) fp32,
    B/C (b, l, g, n), initial_states (b, h, p, n) fp32 or None, seq_idx (b, l) int32 or None.
    Returns y (b, l, h, p) fp32 and final_states (b, h, p, n) fp32. `interpret` may be a bool or
    a `pltpu.InterpretParams`."""
    block = block or BlockSizes()
    l = x.shape[1]
    q, total, seg = layout(x, dt, A, B, C, seq_idx, chunk_size)
    rows = pack_rows(*decay_terms(dt, A, seg, q), seg)  # step 1
    xh, Bh, Ch = (head_major(t, total) for t in (x, B, C))
    yh, final = forward_call(
        rows,
        xh,
        Bh,
        Ch,
        initial_states,
        has_seg=seg is not None,
        compute_y=True,
        emit_states=False,
        block=block,
        interpret=interpret,
    )
    return jnp.swapaxes(yh, 1, 2)[:, :l], final


def backward(x, dt, A, B, C, initial_states, seq_idx, dy, dfinal, *, chunk_size, block=None, interpret=False):
    """The gradient of `forward`; see `kernel_tpu_bwd.backward` (imported here on first use, as
    that module builds on this one)."""
    from pallas_kernels.mamba2 import kernel_tpu_bwd

    return kernel_tpu_bwd.backward(
        x,
        dt,
        A,
        B,
        C,
        initial_states,
        seq_idx,
        dy,
        dfinal,
        chunk_size=chunk_size,
        block=block,
        interpret=interpret,
    )
