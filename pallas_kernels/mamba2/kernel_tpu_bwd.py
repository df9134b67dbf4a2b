"""Backward pass of the Mamba2 SSD scan TPU kernel (`kernel_tpu.forward`): the gradient of
`reference.chunk_scan(..., return_final_states=True)` without D/z w.r.t. x, dt, A, B, C and
initial_states, given dy (b, l, h, p) fp32 and d(final_states) (b, h, p, n) fp32 or None.

Per chunk and head (Q positions; shapes of one grid step's head), the forward is
    u = dt x,  v = wout x  (Q, p)      M = (C B^T) * Lmask  (Q, Q)
    y = M @ u + din * (C @ H^T)        H' = dec H + v^T @ B  (p, n)
with H the state entering the chunk and H' the one leaving it. Recompute rather than store:
  1. Wrapper: the step-1 decay terms (`kernel_tpu.decay_terms`) under `jax.vjp`, and the forward kernel
     once more in `emit_states` mode for every chunk's incoming H (b, h, nc, p, n) fp32 (transient).
  2. Kernel, grid (b, h / heads_per_block, nc) walking chunks last to first, dH' (the cotangent of
     the state leaving the chunk; d(final_states) or 0 at the last chunk) in a VMEM scratch:
       a. state update: dv = B @ dH'^T, dB += v @ dH', d(dec) = <dH', H>;
       b. state output: with dyd = din dy: d(din) = rowsum(dy * (C @ H^T)), dC += dyd @ H,
          dH = dec dH' + dyd^T @ C, which becomes the next (earlier) chunk's dH';
       c. intra-chunk: dM = dy @ u^T, du = M^T @ dy, dC += (dM * Lmask) @ B,
          dB += (dM * Lmask)^T @ C, and since Lmask = exp(cs_i - cs_j), with G = dM * M:
          d(cs)_i = rowsum(G)_i - colsum(G)_i;
       d. dx = dt du + wout dv, d(dt) = rowsum(du * x), d(wout) = rowsum(dv * x);
       e. the first chunk writes dH as d(initial_states).
     dB and dC are summed in-kernel over the step's heads (one group), giving one partial per
     head block; the per-position gradients go out packed like the forward's rows.
  3. Wrapper: sum the dB/dC partials over a group's head blocks, and pull d(cs, dt, din, wout, dec)
     back to d(dt), d(A) through step 1's `jax.vjp` (a reverse cumsum, exps and segment masks).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mamba2 import kernel_tpu as kt

F32 = jnp.float32


def _pack_grads(cols, row_terms, q):
    """cols {row index: (Q, 1)}, row_terms {row index: (1, Q) or (1, 1)} -> (8, Q) fp32 tile laid
    out like the forward's rows (built as (Q, 8) and transposed once)."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (q, kt.N_ROWS), 1)
    packed = sum(jnp.where(lane == i, v, 0.0) for i, v in cols.items()).T
    sub = jax.lax.broadcasted_iota(jnp.int32, (kt.N_ROWS, q), 0)
    return packed + sum(jnp.where(sub == i, v, 0.0) for i, v in row_terms.items())


def _bwd_kernel(*refs, hb, has_seg, has_dfinal, want_dinit, dtype):
    rows_ref, x_ref, b_ref, c_ref, h_ref, dy_ref, *refs = refs
    dfinal_ref = refs.pop(0) if has_dfinal else None
    dx_ref, drows_ref, db_ref, dc_ref, *refs = refs
    dinit_ref = refs.pop(0) if want_dinit else None
    (dh_scr,) = refs
    c = pl.program_id(2)

    @pl.when(c == 0)
    def _():
        dh_scr[...] = dfinal_ref[...] if has_dfinal else jnp.zeros(dh_scr.shape, F32)

    Bm, Cm = b_ref[...], c_ref[...]
    q = Bm.shape[0]
    cb = kt.dot(Cm, Bm, (1, 1), dtype)
    dB = jnp.zeros(Bm.shape, F32)
    dC = jnp.zeros(Cm.shape, F32)
    for k in range(hb):
        view = kt.ChunkView(rows_ref[k])
        x, dy, H, dHo = x_ref[k].astype(F32), dy_ref[k], h_ref[k], dh_scr[k]
        dt_c, din_c, wout_c = view.col(kt.ROW_DT), view.col(kt.ROW_DIN), view.col(kt.ROW_WOUT)

        # 2a. state update
        dv = kt.dot(Bm, dHo, (1, 1), dtype)
        dB += kt.dot(x * wout_c, dHo, (1, 0), dtype)
        ddec = jnp.sum(jnp.sum(dHo * H, axis=1, keepdims=True), axis=0, keepdims=True)

        # 2b. incoming state -> output
        ddin = jnp.sum(dy * kt.dot(Cm, H, (1, 1), dtype), axis=1, keepdims=True)
        dyd = dy * din_c
        dC += kt.dot(dyd, H, (1, 0), dtype)
        dh_scr[k] = view.dec * dHo + kt.dot(dyd, Cm, (0, 0), dtype)

        # 2c. intra-chunk
        Lm = view.decay_matrix(has_seg)
        M = cb * Lm
        dM = kt.dot(dy, x * dt_c, (1, 1), dtype)
        du = kt.dot(M, dy, (0, 0), dtype)
        dcb = dM * Lm
        dC += kt.dot(dcb, Bm, (1, 0), dtype)
        dB += kt.dot(dcb, Cm, (0, 0), dtype)
        G = dM * M

        # 2d.
        dx_ref[k] = (du * dt_c + dv * wout_c).astype(dx_ref.dtype)
        cols = {
            kt.ROW_CS: jnp.sum(G, axis=1, keepdims=True),
            kt.ROW_DT: jnp.sum(du * x, axis=1, keepdims=True),
            kt.ROW_DIN: ddin,
            kt.ROW_WOUT: jnp.sum(dv * x, axis=1, keepdims=True),
        }
        row_terms = {kt.ROW_CS: -jnp.sum(G, axis=0, keepdims=True), kt.ROW_DEC: ddec}
        drows_ref[k] = _pack_grads(cols, row_terms, q)
    db_ref[...] = dB
    dc_ref[...] = dC

    if want_dinit:

        @pl.when(c == pl.num_programs(2) - 1)
        def _():
            dinit_ref[...] = dh_scr[...]  # 2e.


def backward_call(rows, xh, Bh, Ch, states, dyh, dfinal, *, has_seg, want_dinit, block, interpret):
    """Step 2 on prepared operands (see `kernel_tpu.forward_call`), states (b, h, nc, p, n) and
    dyh (b, h, L, p) fp32. Returns dxh (b, h, L, p) in xh.dtype, drows (b, h, nc, 8, Q) fp32,
    dB and dC partials (b, h / heads_per_block, L, n) fp32, and dinit (b, h, p, n) if want_dinit."""
    b, h, nc, _, q = rows.shape
    p, g, n = xh.shape[-1], Bh.shape[1], Bh.shape[-1]
    hb = block.heads(h // g)
    per_group = h // g // hb
    rev = lambda c: nc - 1 - c  # noqa: E731 - chunks last to first
    row_spec = pl.BlockSpec((None, hb, None, kt.N_ROWS, q), lambda i, j, c: (i, j, rev(c), 0, 0))
    seq_spec = pl.BlockSpec((None, hb, q, p), lambda i, j, c: (i, j, rev(c), 0))
    grp_spec = pl.BlockSpec((None, None, q, n), lambda i, j, c: (i, j // per_group, rev(c), 0))
    part_spec = pl.BlockSpec((None, None, q, n), lambda i, j, c: (i, j, rev(c), 0))
    hst_spec = pl.BlockSpec((None, hb, None, p, n), lambda i, j, c: (i, j, rev(c), 0, 0))
    st_spec = pl.BlockSpec((None, hb, p, n), lambda i, j, c: (i, j, 0, 0))
    in_specs = [row_spec, seq_spec, grp_spec, grp_spec, hst_spec, seq_spec]
    args = [rows, xh, Bh, Ch, states, dyh]
    if dfinal is not None:
        in_specs.append(st_spec)
        args.append(dfinal.astype(F32))
    out_specs = [seq_spec, row_spec, part_spec, part_spec]
    out_shape = [
        jax.ShapeDtypeStruct(xh.shape, xh.dtype),
        jax.ShapeDtypeStruct(rows.shape, F32),
        jax.ShapeDtypeStruct((b, h // hb, nc * q, n), F32),
        jax.ShapeDtypeStruct((b, h // hb, nc * q, n), F32),
    ]
    if want_dinit:
        out_specs.append(st_spec)
        out_shape.append(jax.ShapeDtypeStruct((b, h, p, n), F32))
    kernel = functools.partial(
        _bwd_kernel,
        hb=hb,
        has_seg=has_seg,
        has_dfinal=dfinal is not None,
        want_dinit=want_dinit,
        dtype=kt.mm_dtype(xh.dtype, Bh.dtype, Ch.dtype),
    )
    return pl.pallas_call(
        kernel,
        grid=(b, h // hb, nc),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((hb, p, n), F32)],
        compiler_params=kt.compiler_params(block, ("parallel", "parallel", "arbitrary")),
        interpret=interpret,
    )(*args)


def backward(x, dt, A, B, C, initial_states, seq_idx, dy, dfinal, *, chunk_size, block=None, interpret=False):
    """Gradient of `kernel_tpu.forward`: dy (b, l, h, p) fp32, dfinal (b, h, p, n) fp32 or None ->
    (dx in x.dtype, ddt fp32 (b, l, h), dA fp32 (h,), dB in B.dtype, dC in C.dtype,
     dinit fp32 (b, h, p, n), or None when initial_states is None)."""
    block = block or kt.BlockSizes()
    q, total, seg = kt.layout(x, dt, A, B, C, seq_idx, chunk_size)
    b, l = x.shape[:2]
    g, n = B.shape[2:]
    terms, terms_vjp = jax.vjp(lambda dt_, A_: kt.decay_terms(dt_, A_, seg, q), dt, A)  # step 1
    rows = kt.pack_rows(*terms, seg)
    xh, Bh, Ch = (kt.head_major(t, total) for t in (x, B, C))
    has_seg = seg is not None
    states, _ = kt.forward_call(
        rows,
        xh,
        Bh,
        Ch,
        initial_states,
        has_seg=has_seg,
        compute_y=False,
        emit_states=True,
        block=block,
        interpret=interpret,
    )
    want_dinit = initial_states is not None
    outs = backward_call(
        rows,
        xh,
        Bh,
        Ch,
        states,
        kt.head_major(dy.astype(F32), total),
        dfinal,
        has_seg=has_seg,
        want_dinit=want_dinit,
        block=block,
        interpret=interpret,
    )
    dxh, drows, dBp, dCp = outs[:4]

    # Step 3.
    d_terms = tuple(drows[..., i, :] for i in (kt.ROW_CS, kt.ROW_DT, kt.ROW_DIN, kt.ROW_WOUT))
    ddt, dA = terms_vjp(d_terms + (drows[..., kt.ROW_DEC, 0],))
    unpack = lambda t: jnp.swapaxes(t, 1, 2)[:, :l]  # noqa: E731
    group_sum = lambda t: t.reshape(b, g, -1, total, n).sum(axis=2)  # noqa: E731
    dB = unpack(group_sum(dBp)).astype(B.dtype)
    dC = unpack(group_sum(dCp)).astype(C.dtype)
    dinit = outs[4] if want_dinit else None
    return unpack(dxh), ddt, dA, dB, dC, dinit
