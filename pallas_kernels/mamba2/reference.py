"""Pure-JAX Mamba2 scan: the SSD chunked form for sequences and a one-step decode update.

This is the ground truth the Pallas kernels must match and the fallback on every platform.
Layouts follow mamba_ssm's `mamba_chunk_scan_combined`:

    x (b, l, h, p)   dt (b, l, h)   A (h,)   B, C (b, l, g, n)   state (b, h, p, n)

Head i reads B/C group i // (h // g). Per head, with a_t = dt_t * A (<= 0):

    state_t = exp(a_t) * state_{t-1} + dt_t * outer(x_t, B_t)      y_t = state_t @ C_t + D * x_t

and y is gated by silu(z) when z is given. `seq_idx` (b, l) packs documents: the state is reset to
0 before every t with seq_idx[t] != seq_idx[t-1], so `initial_states` only reach the tokens of the
first segment. Segments are contiguous runs: a label that reappears later starts a new segment.

Chunked algorithm (chunk length Q, everything in fp32; `chunk_scan` wires the steps together):
  1. `process_dt` + `chunk_cumsum`: dt -> bias, softplus, clip; pad l to a multiple of Q with
     dt = 0, x = 0 (no decay, no input); cs = inclusive cumsum of dt*A within each chunk.
  2. `chunk_diag_output`: y_diag[i] = sum_{j<=i} (C_i.B_j) * exp(cs_i - cs_j) * dt_j x_j, the decay
     matrix L = exp(segsum) being zero above the diagonal and between different segments.
  3. `chunk_states`: S_c = sum_j exp(cs_last - cs_j) * dt_j x_j B_j^T, the state a chunk would end
     in from a zero start; only positions in the segment of the chunk's last position count.
  4. `state_passing`: H_c = exp(cs_last) * H_{c-1} + S_c over chunks (lax.scan, fp32 carry) from
     H_{-1} = initial_states; the carry is dropped in a chunk that starts a new segment. Returns the
     state entering each chunk and the final state.
  5. `chunk_state_output`: y_off[i] = exp(cs_i) * C_i . H_{c-1}, for positions still in the segment
     the incoming state belongs to.
  6. `skip_and_gate`: y = (y_diag + y_off + D * x) * silu(z).

Internally heads are split (h) -> (g, r) with r = h // g, so B/C keep their group axis and are never
repeated per head. Chunked tensors are (b, c, Q, g, r, p) for x, (b, c, Q, g, n) for B/C and
(b, c, g, r, Q) for dt-derived decay terms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
NO_DT_LIMIT = (0.0, float("inf"))
# Ground truth for kernels on TPU/GPU too, where the default fp32 matmul precision is bf16/tf32.
_HIGHEST = jax.lax.Precision.HIGHEST


def _einsum(spec, *operands):
    return jnp.einsum(spec, *operands, precision=_HIGHEST, preferred_element_type=F32)


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT):
    """dt (..., h) -> fp32 dt: + dt_bias (h,), softplus, then clip to dt_limit unless (0, inf)."""
    dt = dt.astype(F32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(F32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    if tuple(dt_limit) != NO_DT_LIMIT:
        dt = jnp.clip(dt, dt_limit[0], dt_limit[1])
    return dt


def segment_ids(seq_idx):
    """seq_idx (b, l) -> int32 (b, l): 0, 1, 2, ... counting the changes of seq_idx from t-1 to t.

    Non-decreasing ids make "same segment" an equality test and make a position in the segment of a
    later position imply no reset in between.
    """
    changed = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)
    return jnp.pad(jnp.cumsum(changed, axis=1), ((0, 0), (1, 0)))


def chunk_cumsum(dt, A):
    """dt (b, c, Q, g, r) fp32, A (g, r) -> cs (b, c, g, r, Q): per-chunk inclusive cumsum of dA."""
    dA = dt * A.astype(F32)
    return jnp.cumsum(jnp.moveaxis(dA, 2, -1), axis=-1)


def segsum_decay(cs, seg=None):
    """cs (..., Q) -> L (..., Q, Q) with L[i, j] = exp(cs_i - cs_j) for j <= i, else 0.

    The exponent is replaced by -inf before exp outside the causal triangle (and between segments),
    so exp never sees the large positive upper-triangle differences and grads there are exactly 0.
    seg (b, c, Q) must broadcast against cs's leading (b, c) axes; it is placed accordingly.
    """
    q = cs.shape[-1]
    diff = cs[..., :, None] - cs[..., None, :]
    mask = jnp.tril(jnp.ones((q, q), dtype=bool))
    if seg is not None:
        same = seg[:, :, :, None] == seg[:, :, None, :]  # (b, c, Q, Q)
        mask = mask & same[:, :, None, None]  # broadcast over (g, r)
    return jnp.exp(jnp.where(mask, diff, -jnp.inf))


def chunk_diag_output(x, dt, cs, B, C, seg=None):
    """Intra-chunk outputs, as if every chunk started from a zero state.

    x (b, c, Q, g, r, p), dt (b, c, Q, g, r), cs (b, c, g, r, Q), B/C (b, c, Q, g, n),
    seg (b, c, Q) or None -> y_diag (b, c, Q, g, r, p) fp32.
    """
    cb = _einsum("bcign,bcjgn->bcgij", C, B)  # once per group, shared by its r heads
    scores = cb[:, :, :, None] * segsum_decay(cs, seg)  # (b, c, g, r, i, j)
    dtx = x * dt[..., None]
    return _einsum("bcgrij,bcjgrp->bcigrp", scores, dtx)


def chunk_states(x, dt, cs, B, seg=None):
    """State at each chunk's end from a zero start: x, dt, cs, B as above -> (b, c, g, r, p, n)."""
    decay = jnp.exp(cs[..., -1:] - cs)  # (b, c, g, r, Q), exponents <= 0
    if seg is not None:
        # A reset inside the chunk cuts everything before the last segment off from the chunk end.
        in_last = seg == seg[:, :, -1:]  # (b, c, Q)
        decay = jnp.where(in_last[:, :, None, None], decay, 0.0)
    w = x * (dt * jnp.moveaxis(decay, -1, 2))[..., None]  # (b, c, Q, g, r, p)
    return _einsum("bcjgrp,bcjgn->bcgrpn", w, B)


def _incoming_segment(seg):
    """seg (b, c, Q) -> (b, c): segment id of the state entering each chunk (chunk 0: seg[0])."""
    return jnp.concatenate([seg[:, :1, 0], seg[:, :-1, -1]], axis=1)


def state_passing(states, cs, initial_states=None, seg=None):
    """Carries fp32 states across chunks.

    states (b, c, g, r, p, n), cs (b, c, g, r, Q), initial_states (b, g, r, p, n) or None,
    seg (b, c, Q) or None -> (prev (b, c, g, r, p, n): state entering each chunk,
                              final (b, g, r, p, n): state after the last chunk).
    """
    decay = jnp.exp(cs[..., -1])  # (b, c, g, r): decay across a whole chunk
    if seg is not None:
        # Segment ids are non-decreasing, so the chunk's last position sharing the incoming segment
        # means no reset inside the chunk; otherwise the incoming state reaches nothing past it.
        keep = seg[:, :, -1] == _incoming_segment(seg)
        decay = jnp.where(keep[:, :, None, None], decay, 0.0)
    if initial_states is None:
        init = jnp.zeros(states.shape[:1] + states.shape[2:], F32)
    else:
        init = initial_states.astype(F32)

    def step(h, inp):
        s, d = inp
        return d[..., None, None] * h + s, h

    final, prev = jax.lax.scan(step, init, (jnp.moveaxis(states, 1, 0), jnp.moveaxis(decay, 1, 0)))
    return jnp.moveaxis(prev, 0, 1), final


def chunk_state_output(C, prev, cs, seg=None):
    """Contribution of the incoming state: C (b, c, Q, g, n), prev (b, c, g, r, p, n),
    cs (b, c, g, r, Q), seg (b, c, Q) or None -> y_off (b, c, Q, g, r, p) fp32."""
    decay = jnp.moveaxis(jnp.exp(cs), -1, 2)  # (b, c, Q, g, r): decay from chunk start
    if seg is not None:
        reached = seg == _incoming_segment(seg)[:, :, None]  # (b, c, Q)
        decay = jnp.where(reached[..., None, None], decay, 0.0)
    return _einsum("bcign,bcgrpn->bcigrp", C, prev) * decay[..., None]


def skip_and_gate(y, x, D=None, z=None):
    """y, x (..., h, p), D (h,) or (h, p), z (..., h, p) -> fp32 (y + D x) * silu(z)."""
    y = y.astype(F32)
    if D is not None:
        D = D.astype(F32)
        y = y + x.astype(F32) * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * jax.nn.silu(z.astype(F32))
    return y


def check_shapes(x, dt, A, B, C):
    b, l, h, p = x.shape
    if B.ndim != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(f"B, C must be (b, l, g, n) like x {x.shape}; got {B.shape}, {C.shape}")
    if dt.shape != (b, l, h) or A.shape != (h,):
        raise ValueError(f"dt must be {(b, l, h)} and A {(h,)}; got {dt.shape}, {A.shape}")
    if h % B.shape[2]:
        raise ValueError(f"nheads {h} must be a multiple of ngroups {B.shape[2]}")


def chunk_scan(
    x,
    dt,
    A,
    B,
    C,
    chunk_size,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    dt_softplus=False,
    dt_limit=NO_DT_LIMIT,
    return_final_states=False,
):
    """Mamba2 SSD chunked scan (see the module docstring for layouts and the numbered steps).

    x (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n); D (h,) or (h, p); z (b, l, h, p);
    dt_bias (h,); initial_states (b, h, p, n); seq_idx (b, l) int. Any l; chunk_size is static.
    Returns y (b, l, h, p) in x.dtype, plus final_states (b, h, p, n) fp32 if return_final_states.
    """
    check_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    r = h // g
    q = min(int(chunk_size), l)  # a short sequence needs no padding up to a full chunk
    nc = -(-l // q)
    pad = nc * q - l

    # Step 1. Padding comes after dt processing so that padded dt is exactly 0 (no decay).
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    xf, Bf, Cf = (t.astype(F32) for t in (x, B, C))
    seg = None if seq_idx is None else segment_ids(seq_idx)
    if pad:
        zpad = lambda t: jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        xf, dtp, Bf, Cf = zpad(xf), zpad(dtp), zpad(Bf), zpad(Cf)
        if seg is not None:
            # Padding continues the last segment so the final state includes it.
            seg = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")
    xc = xf.reshape(b, nc, q, g, r, p)
    dtc = dtp.reshape(b, nc, q, g, r)
    Bc = Bf.reshape(b, nc, q, g, n)
    Cc = Cf.reshape(b, nc, q, g, n)
    segc = None if seg is None else seg.reshape(b, nc, q)
    cs = chunk_cumsum(dtc, A.reshape(g, r))

    y_diag = chunk_diag_output(xc, dtc, cs, Bc, Cc, segc)  # step 2
    states = chunk_states(xc, dtc, cs, Bc, segc)  # step 3
    init = None
    if initial_states is not None:
        init = initial_states.astype(F32).reshape(b, g, r, p, n)
    prev, final = state_passing(states, cs, init, segc)  # step 4
    y_off = chunk_state_output(Cc, prev, cs, segc)  # step 5

    y = (y_diag + y_off).reshape(b, nc * q, h, p)[:, :l]
    y = skip_and_gate(y, x, D, z).astype(x.dtype)  # step 6
    if return_final_states:
        return y, final.reshape(b, h, p, n)
    return y


def state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=NO_DT_LIMIT
):
    """One decode step of the recurrence.

    state (b, h, p, n); x (b, h, p); dt (b, h); A (h,); B, C (b, g, n); D (h,) or (h, p);
    z (b, h, p); dt_bias (h,). Computes in fp32; returns y (b, h, p) in x.dtype and the new state
    in state.dtype.
    """
    b, h, p, n = state.shape
    g = B.shape[1]
    if h % g or x.shape != (b, h, p) or dt.shape != (b, h) or B.shape != (b, g, n):
        raise ValueError(f"bad shapes: state {state.shape} x {x.shape} dt {dt.shape} B {B.shape}")
    r = h // g
    dtp = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # (b, h)
    decay = jnp.exp(dtp * A.astype(F32))  # (b, h)
    dtx = x.astype(F32) * dtp[..., None]  # (b, h, p)
    bh, ch = (jnp.repeat(u.astype(F32), r, axis=1) for u in (B, C))  # (b, h, n): head i, group i // r
    # Every array at the state's own (b, h, p, n) shape, no reshape of it: XLA can then write the
    # new state over the old one (a while loop's carried state is updated in place, not copied),
    # and the readout y = C . new is a dot batched over the leading (b, h) that reads that new
    # state. With (b, g, r, ...) views XLA:CPU copied the state every step and fused the update
    # into the readout dot's operand, a slow loop (an M layer's decode at batch 64, small config:
    # 38.7 ms before, 2.9 ms now; benchmarks/RESULTS.md, "Rollout throughput").
    new = decay[..., None, None] * state.astype(F32) + dtx[..., None] * bh[:, :, None, :]
    y = _einsum("bhpn,bhn->bhp", new, ch)
    y = skip_and_gate(y, x, D, z)
    return y.astype(x.dtype), new.astype(state.dtype)
