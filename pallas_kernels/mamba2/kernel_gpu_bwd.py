"""Mamba2 chunked (SSD) scan as Pallas Triton kernels for NVIDIA GPUs: backward pass.

Gradient of `kernel_gpu.forward` (= `reference.chunk_scan` with D = z = dt_bias = None) from the
inputs and the cotangents dy (b, l, h, p), dfinal (b, h, p, n); nothing is kept from the forward.
Notation per chunk and head (positions i, j < Q; see `kernel_gpu` for e, v, a and Lmask):

    u_j = dt_j x_j    M = (C B^T) * Lmask    y = M @ u + e * (C @ H_in^T)
    H_out = a * H_in + (v * u)^T @ B

Steps:
  1. Recompute the state entering each chunk, H_in (b, nc, h, p, n) fp32, with the forward's
     chunk-states and state-passing kernels.
  2. State gradient: T_c = (e * dy)^T @ C is the part of dL/dH_in local to chunk c (chunk-states
     kernel again); the reverse state passing dH_in[c] = T_c + a_c dH_out[c] from dH_out[nc-1] =
     dfinal yields dH_out for every chunk and dinit = dH_in[0].
  3. `chunk_backward` kernel, grid (b * nc, h, p / bp), all fp32:
       dM = dy @ u^T;  du = M^T @ dy + v * (B @ dH_out^T);  dx = dt * du;  ddt_direct = sum_p x du
       dCB = dM * Lmask:  dC = dCB @ B + (e * dy) @ H_in;  dB = dCB^T @ C + v * (u @ dH_out)
       dcs = rowsum(G) - colsum(G) + e * de - v * dv  (G = dM * M, de = sum_p dy (C H_in^T),
             dv = sum_p u (B dH_out^T)), and at the chunk's last position also
             + sum(v * dv) + a * sum(dH_out * H_in), through v's and a's dependence on cs_last.
     Sums over p are partial per p-block and dB, dC per head; the wrapper adds them up.
  4. Wrapper (XLA): ddA = per-chunk reverse cumsum of dcs; ddt = ddt_direct + A * ddA;
     dA = sum(dt * ddA); dB, dC summed over the heads of each group; padding sliced off.

The backward chooses its own chunk length and p-block (`BlockSizes.chunk_bwd`, `block_p_bwd`):
the result does not depend on them, and the chunk kernel's ten dots need more shared memory than
the forward's two (smaller tiles by default when the dots take fp32 operands).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.mamba2 import kernel_gpu as fwd
from pallas_kernels.mamba2.kernel_gpu import F32, BlockSizes, dot


def _chunk_backward_kernel(*refs, has_seg, mode):
    if has_seg:
        (
            x_ref,
            dt_ref,
            cs_ref,
            e_ref,
            v_ref,
            alast_ref,
            seg_ref,
            b_ref,
            c_ref,
            dy_ref,
            hin_ref,
            dhout_ref,
            dx_ref,
            ddt_ref,
            dcs_ref,
            db_ref,
            dc_ref,
        ) = refs
        seg = seg_ref[...]
    else:
        (
            x_ref,
            dt_ref,
            cs_ref,
            e_ref,
            v_ref,
            alast_ref,
            b_ref,
            c_ref,
            dy_ref,
            hin_ref,
            dhout_ref,
            dx_ref,
            ddt_ref,
            dcs_ref,
            db_ref,
            dc_ref,
        ) = refs
        seg = None
    bmat, cmat = b_ref[...], c_ref[...]
    dt, e, v = dt_ref[...], e_ref[...], v_ref[...]
    x = x_ref[...].astype(F32)
    dy = dy_ref[...]
    hin, dhout = hin_ref[...], dhout_ref[...]
    q = x.shape[0]
    u = x * dt[:, None]  # (Q, bp)

    # Intra-chunk (diagonal) term.
    lmask = fwd.decay_matrix(cs_ref[...], seg)
    dm = dot(dy, u, (1, 1), mode)  # (Q, Q)
    dcb = dm * lmask
    m = dot(cmat, bmat, (1, 1), mode) * lmask
    g = dm * m
    dcs = jnp.sum(g, axis=1) - jnp.sum(g, axis=0)
    du = dot(m, dy, (0, 0), mode)  # (Q, bp)
    dc = dot(dcb, bmat, (1, 0), mode)  # (Q, n)
    db = dot(dcb, cmat, (0, 0), mode)

    # Incoming-state term y += e * (C @ H_in^T).
    hc = dot(cmat, hin, (1, 1), mode)  # (Q, bp)
    dcs += e * jnp.sum(dy * hc, axis=1)
    dc += dot(dy * e[:, None], hin, (1, 0), mode)

    # Chunk-end state term H_out += (v * u)^T @ B.
    bdh = dot(bmat, dhout, (1, 1), mode)  # (Q, bp)
    du += v[:, None] * bdh
    vdv = v * jnp.sum(u * bdh, axis=1)
    db += v[:, None] * dot(u, dhout, (1, 0), mode)
    last = jax.lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1
    dcs += jnp.where(last, jnp.sum(vdv), 0.0) - vdv
    # Carry term H_out += a * H_in; a sits at the chunk's last position of alast, 0 elsewhere.
    dcs += alast_ref[...] * jnp.sum(jnp.sum(dhout * hin, axis=1))

    dx_ref[...] = (du * dt[:, None]).astype(dx_ref.dtype)
    ddt_ref[...] = jnp.sum(x * du, axis=1)
    dcs_ref[...] = dcs
    db_ref[...] = db
    dc_ref[...] = dc


def chunk_backward(ns, dy, hin, dhout, block, interpret):
    """dy (b, L, h, p_pad) fp32, hin / dhout (b, nc, h, p_pad, n_pad) fp32 ->
    dx (b, L, h, p_pad) in x.dtype; p-block partials ddt_direct, dcs (npb, b, h, L) and
    per-head dB, dC (npb, b, L, h, n_pad), all fp32."""
    sp = fwd.ChunkSpecs(ns)
    has_seg = ns.seg is not None
    alast = jnp.zeros((ns.b, ns.h, ns.nc, ns.q), F32).at[..., -1].set(ns.a).reshape(ns.b, ns.h, ns.L)
    args = [ns.x, ns.dt, ns.cs, ns.e, ns.v, alast] + ([ns.seg] if has_seg else [])
    args += [ns.B, ns.C, dy, hin, dhout]
    in_specs = [sp.seq_hp] + [sp.pos] * 5 + ([sp.seg] if has_seg else [])
    in_specs += [sp.seq_gn, sp.seq_gn, sp.seq_hp, sp.state, sp.state]
    pos_part = jax.ShapeDtypeStruct((ns.npb, ns.b, ns.h, ns.L), F32)
    hn_part = jax.ShapeDtypeStruct((ns.npb, ns.b, ns.L, ns.h, ns.n_pad), F32)
    return pl.pallas_call(
        functools.partial(_chunk_backward_kernel, has_seg=has_seg, mode=ns.dots),
        grid=sp.grid,
        in_specs=in_specs,
        out_specs=[sp.seq_hp, sp.part_pos, sp.part_pos, sp.part_seq_hn, sp.part_seq_hn],
        out_shape=[jax.ShapeDtypeStruct(ns.x.shape, ns.x.dtype), pos_part, pos_part, hn_part, hn_part],
        compiler_params=fwd.compiler_params(block.num_warps_bwd, block.num_stages),
        interpret=interpret,
        name="mamba2_chunk_backward",
    )(*args)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def backward(x, dt, A, B, C, initial_states, seq_idx, dy, dfinal, *, chunk_size, block=None, interpret=False):
    """Cotangents of `kernel_gpu.forward`: dy (b, l, h, p) fp32, dfinal (b, h, p, n) fp32 or None.

    Returns (dx in x.dtype, ddt fp32 (b, l, h), dA fp32 (h,), dB in B.dtype, dC in C.dtype,
    dinit fp32 (b, h, p, n), or None when initial_states is None).
    """
    block = block or BlockSizes()
    ns = fwd.prepare(x, dt, A, B, C, seq_idx, chunk_size, block, backward=True)
    b, h, g, r, nc, q = ns.b, ns.h, ns.g, ns.r, ns.nc, ns.q
    dyp = fwd._pad_axis(fwd._pad_axis(dy.astype(F32), 1, ns.L), 3, ns.p_pad)

    hin, _ = fwd.recompute_states(ns, initial_states, block, interpret)  # step 1
    local = fwd.chunk_states(ns, dyp, ns.e, ns.C, block, interpret)  # step 2
    dhout, dinit = fwd.state_passing(
        ns, local, ns.a, fwd.padded_states(dfinal, ns), block, interpret, reverse=True
    )
    dx, ddt_direct, dcs, db, dc = chunk_backward(ns, dyp, hin, dhout, block, interpret)  # step 3

    # Step 4.
    dcs = dcs.sum(0).reshape(b, h, nc, q)
    dda = jnp.flip(jnp.cumsum(jnp.flip(dcs, -1), axis=-1), -1).reshape(b, h, ns.L)
    ddt = ddt_direct.sum(0) + dda * A.astype(F32)[None, :, None]
    dA = jnp.sum(dda * ns.dt, axis=(0, 2))
    group_sum = lambda t: t.reshape(ns.npb, b, ns.L, g, r, ns.n_pad).sum((0, 4))[:, : ns.l, :, : ns.n]
    dinit = None if initial_states is None else dinit[:, :, : ns.p, : ns.n]
    return (
        dx[:, : ns.l, :, : ns.p],
        jnp.moveaxis(ddt, 1, 2)[:, : ns.l],
        dA,
        group_sum(db).astype(B.dtype),
        group_sum(dc).astype(C.dtype),
        dinit,
    )
