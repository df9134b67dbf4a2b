"""Mamba2 chunked (SSD) scan as Pallas Triton kernels for NVIDIA GPUs: forward pass.

Same semantics as `reference.chunk_scan` with D = z = dt_bias = None and dt already processed;
`backward` (at the end, implemented in `kernel_gpu_bwd`) is its gradient. Layouts (mamba_ssm):

    x (b, l, h, p)   dt (b, l, h) fp32   A (h,)   B, C (b, l, g, n)   states (b, h, p, n) fp32

Why several kernels instead of one loop over chunks: Triton grids have no sequential axis, so a
single fused kernel would need an in-kernel loop over all chunks of a (batch, head) pair and could
only run b * h * (p / block_p) programs. Under TurboS's 8-way tensor parallelism a device holds
8 heads, so that is a few dozen programs on a 132-SM H100. Splitting as mamba_ssm does keeps the
two heavy kernels parallel over chunks as well, and leaves only the cheap, memory-bound carry of
(p, n) states sequential. The price is a round trip of per-chunk states (b, nc, h, p, n) fp32
through HBM, about 2x the bytes of x at p = 64, n = 128, Q = 128.

Forward, with chunk length Q (the largest power of two <= chunk_size, at least 16) and
nc = ceil(l / Q) chunks:
  1. `prepare` (XLA, O(b l h) elementwise): pad l to nc * Q with dt = 0 and the last segment
     continued; cs = per-chunk inclusive cumsum of dt * A; the masked decay weights
     e_t = exp(cs_t) (incoming state -> t), v_t = exp(cs_last - cs_t) (t -> chunk end) and the
     chunk decay a_c = exp(cs_last), each zeroed across a segment reset exactly as the reference
     does. Per-position arrays are stored (b, h, L) so a chunk's slice is contiguous.
  2. `chunk_states` kernel, grid (b * nc, h, p / bp): S_c = (x * dt * v)^T @ B, the state each chunk
     would end in from a zero start, (b, nc, h, p, n) fp32.
  3. `state_passing` kernel, grid (b, h, p * n / bs): H_c = a_c * H_{c-1} + S_c in an in-kernel
     loop over chunks with an fp32 carry; writes the state entering each chunk and the final one.
  4. `chunk_output` kernel, grid (b * nc, h, p / bp): y = (C B^T * Lmask) @ (dt * x)
     + e * (C @ H_{c-1}^T), with Lmask[i, j] = exp(cs_i - cs_j) for j <= i in the same segment.
     C B^T is recomputed per head (cheap on tensor cores) instead of stored per group.
Steps 2 and 3 run with reversed chunk order in the backward pass for the state gradient.

Numerics: all accumulation and elementwise math is fp32. With 16-bit x the dot operands are cast
to x's dtype (tensor cores; as mamba_ssm does); with fp32 x they stay fp32 at full precision
(`BlockSizes.dots` overrides, e.g. "tf32"). Interpret mode runs the same bodies on CPU, casts
included, so its results match the GPU's up to summation order.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mamba2 import reference

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling knobs; defaults aim at TurboS per device on an H100 (p = 64, n = 128, Q = 128).

    block_p: channels of a head per program in the chunk kernels (power of two >= 16); p = 64 in
      one block keeps C B^T from being recomputed per p-block.
    block_state: flattened (p * n) state elements per state-passing program (power of two).
    num_warps / num_stages: for the forward chunk kernels and state passing.
    num_warps_bwd: the backward chunk kernel keeps several (Q, Q) fp32 tiles live.
    dots: operand precision of the in-kernel dots (accumulation is always fp32): "ieee" (full
      fp32, no tensor cores), "tf32", or "input" (operands cast to x's 16-bit dtype, as mamba_ssm
      does; TF32 when x is fp32). None: "ieee" for fp32 x, "input" otherwise.
    chunk: the kernels' chunk length Q if smaller than `chunk_size` (None: chunk_size). The SSD
      result does not depend on Q beyond rounding, so this only trades (Q, Q) tile size (registers,
      shared memory) against per-chunk state traffic.
    chunk_bwd / block_p_bwd: Q and block_p of the whole backward pass. None: chunk / block_p with
      16-bit dots; 32 / 32 with fp32 ("ieee", "tf32") dots, whose fp32 operand tiles otherwise
      exceed the H100's 227 KiB of shared memory per block (Triton 3.9 offline compile for sm_90
      at n = 128: 288 KiB at Q = 128, bp = 64 with TF32; 120 KiB at Q = bp = 32; 112 KiB with
      bf16 dots at Q = 128, bp = 64).
    """

    block_p: int = 64
    block_state: int = 1024
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 8
    dots: str | None = None
    chunk: int | None = None
    chunk_bwd: int | None = None
    block_p_bwd: int | None = None


def _pow2_at_least_16(v: int) -> int:
    return max(16, 1 << (int(v) - 1).bit_length())


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _pad_axis(t, axis, size, mode="constant"):
    extra = size - t.shape[axis]
    if extra == 0:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, extra)
    return jnp.pad(t, widths, mode=mode)


def prepare(x, dt, A, B, C, seq_idx, chunk_size, block, backward=False):
    """Step 1: pads and derives the per-position fp32 terms; returns a namespace of the arrays
    (padded to L = nc * Q, p_pad, n_pad) and the static sizes the kernels are built from.
    `backward` picks the backward pass's tiling (`BlockSizes.chunk_bwd`, `block_p_bwd`)."""
    reference.check_shapes(x, dt, A, B, C)
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    dots = _dot_mode(block.dots, x.dtype)
    chunk, block_p = block.chunk, block.block_p
    if backward:
        fp32_dots = dots in ("ieee", "tf32")
        chunk = block.chunk_bwd or (32 if fp32_dots else chunk)
        block_p = block.block_p_bwd or (32 if fp32_dots else block_p)
    if not _is_pow2(block_p) or block_p < 16 or not _is_pow2(block.block_state):
        raise ValueError(f"block_p must be a power of two >= 16 and block_state a power of two: {block}")
    # The SSD result does not depend on the chunk length, so Triton's power-of-two tiles take the
    # largest power of two within chunk_size (16 at least, for tensor-core dots), and a sequence
    # shorter than that a shorter chunk; padding with dt = 0 leaves the result unchanged.
    q = 1 << (max(16, min(int(chunk_size), chunk or int(chunk_size))).bit_length() - 1)
    q = min(q, _pow2_at_least_16(l))
    nc = -(-l // q)
    L = nc * q
    bp = min(block_p, _pow2_at_least_16(p))
    p_pad = -(-p // bp) * bp
    n_pad = _pow2_at_least_16(n)

    xp = _pad_axis(_pad_axis(x, 1, L), 3, p_pad)
    Bp = _pad_axis(_pad_axis(B, 1, L), 3, n_pad)
    Cp = _pad_axis(_pad_axis(C, 1, L), 3, n_pad)
    dtp = jnp.moveaxis(_pad_axis(dt.astype(F32), 1, L), 2, 1)  # (b, h, L)
    dA = dtp * A.astype(F32)[None, :, None]
    cs = jnp.cumsum(dA.reshape(b, h, nc, q), axis=-1)
    cs_last = cs[..., -1:]
    e = jnp.exp(cs)
    v = jnp.exp(cs_last - cs)
    a = jnp.exp(cs_last[..., 0])  # (b, h, nc)
    seg = None
    if seq_idx is not None:
        seg = _pad_axis(reference.segment_ids(seq_idx), 1, L, mode="edge")  # (b, L)
        segc = seg.reshape(b, 1, nc, q)
        seg_in = jnp.concatenate([segc[:, :, :1, 0], segc[:, :, :-1, -1]], axis=2)  # (b, 1, nc)
        e = jnp.where(segc == seg_in[..., None], e, 0.0)
        v = jnp.where(segc == segc[..., -1:], v, 0.0)
        a = jnp.where(segc[..., -1] == seg_in, a, 0.0)
    flat = lambda t: t.reshape(b, h, L)
    return types.SimpleNamespace(
        x=xp,
        B=Bp,
        C=Cp,
        dt=dtp,
        cs=flat(cs),
        e=flat(e),
        v=flat(v),
        a=a,
        seg=seg,
        b=b,
        l=l,
        h=h,
        p=p,
        g=g,
        n=n,
        r=h // g,
        q=q,
        nc=nc,
        L=L,
        bp=bp,
        p_pad=p_pad,
        n_pad=n_pad,
        npb=p_pad // bp,
        dots=dots,
    )


# ---------------------------------------------------------------------------------------------
# Shared in-kernel helpers and BlockSpecs for the chunk-parallel grid (b * nc, h, p / bp).


def _dot_mode(dots, x_dtype):
    """-> "ieee", "tf32", or the 16-bit dtype that dot operands are cast to."""
    if dots is None:
        dots = "ieee" if x_dtype == F32 else "input"
    if dots not in ("ieee", "tf32", "input"):
        raise ValueError(f"BlockSizes.dots must be 'ieee', 'tf32', 'input' or None; got {dots!r}")
    if dots == "input":
        return "tf32" if jnp.dtype(x_dtype).itemsize >= 4 else jnp.dtype(x_dtype)
    return dots


def dot(a, b, contract, mode):
    """a, b 2-D; contract = (axis of a, axis of b); fp32 accumulation. mode from `_dot_mode`: a
    16-bit dtype casts both operands to it; otherwise two equal 16-bit operands stay as they are
    and the rest go to fp32, at full precision ("ieee") or TF32."""
    if mode not in ("ieee", "tf32"):
        a, b, prec = a.astype(mode), b.astype(mode), None
    elif a.dtype == b.dtype and a.dtype != F32:
        prec = None
    else:
        a, b = a.astype(F32), b.astype(F32)
        prec = jax.lax.Precision.HIGHEST if mode == "ieee" else jax.lax.Precision.DEFAULT
    return jax.lax.dot_general(
        a, b, (((contract[0],), (contract[1],)), ((), ())), precision=prec, preferred_element_type=F32
    )


def decay_matrix(cs, seg):
    """cs (Q,) fp32, seg (Q,) int32 or None -> (Q, Q): exp(cs_i - cs_j) for j <= i in the same
    segment, else 0. Masked entries become -inf before exp so no large positive exponent is hit."""
    q = cs.shape[0]
    row = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    mask = col <= row
    if seg is not None:
        mask = mask & (seg[:, None] == seg[None, :])
    return jnp.exp(jnp.where(mask, cs[:, None] - cs[None, :], -jnp.inf))


class ChunkSpecs:
    """BlockSpecs on the grid (b * nc, h, p / bp); program (i, j, k) is batch i // nc, chunk
    i % nc, head j (B/C group j // r), p-block k."""

    def __init__(self, ns):
        self.ns = ns
        nc, q, bp, r = ns.nc, ns.q, ns.bp, ns.r
        self.seq_hp = pl.BlockSpec((None, q, None, bp), lambda i, j, k: (i // nc, i % nc, j, k))
        self.pos = pl.BlockSpec((None, None, q), lambda i, j, k: (i // nc, j, i % nc))
        self.seg = pl.BlockSpec((None, q), lambda i, j, k: (i // nc, i % nc))
        self.seq_gn = pl.BlockSpec((None, q, None, ns.n_pad), lambda i, j, k: (i // nc, i % nc, j // r, 0))
        self.state = pl.BlockSpec(
            (None, None, None, bp, ns.n_pad), lambda i, j, k: (i // nc, i % nc, j, k, 0)
        )
        # Partial sums over p-blocks, reduced by the wrapper.
        self.part_pos = pl.BlockSpec((None, None, None, q), lambda i, j, k: (k, i // nc, j, i % nc))
        self.part_seq_hn = pl.BlockSpec(
            (None, None, q, None, ns.n_pad), lambda i, j, k: (k, i // nc, i % nc, j, 0)
        )

    @property
    def grid(self):
        return (self.ns.b * self.ns.nc, self.ns.h, self.ns.npb)

    def state_shape(self):
        ns = self.ns
        return jax.ShapeDtypeStruct((ns.b, ns.nc, ns.h, ns.p_pad, ns.n_pad), F32)


def compiler_params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------------------------------------
# Step 2: chunk states. Also the per-chunk state-gradient source in the backward pass.


def _chunk_states_kernel(x_ref, w_ref, b_ref, s_ref, *, mode):
    xw = x_ref[...].astype(F32) * w_ref[...][:, None]  # (Q, bp)
    s_ref[...] = dot(xw, b_ref[...], (0, 0), mode)  # (bp, n)


def chunk_states(ns, xs, w, bs, block, interpret):
    """xs (b, L, h, p_pad), w (b, h, L) fp32, bs (b, L, g, n_pad) ->
    S (b, nc, h, p_pad, n_pad) fp32 with S_c = sum_t w_t xs_t bs_t^T over the chunk."""
    sp = ChunkSpecs(ns)
    return pl.pallas_call(
        functools.partial(_chunk_states_kernel, mode=ns.dots),
        grid=sp.grid,
        in_specs=[sp.seq_hp, sp.pos, sp.seq_gn],
        out_specs=sp.state,
        out_shape=sp.state_shape(),
        compiler_params=compiler_params(block.num_warps, block.num_stages),
        interpret=interpret,
        name="mamba2_chunk_states",
    )(xs, w, bs)


# ---------------------------------------------------------------------------------------------
# Step 3: state passing over chunks (sequential, memory bound).


def _state_passing_kernel(s_ref, a_ref, init_ref, prev_ref, final_ref, *, nc, reverse):
    def step(i, carry):
        c = nc - 1 - i if reverse else i
        prev_ref[c, :] = carry
        return a_ref[c] * carry + s_ref[c, :]

    final_ref[...] = jax.lax.fori_loop(0, nc, step, init_ref[...])


def state_passing(ns, states, a, init, block, interpret, reverse=False):
    """states (b, nc, h, p_pad, n_pad) fp32, a (b, h, nc) fp32, init (b, h, p_pad, n_pad) fp32 ->
    (prev (b, nc, h, p_pad, n_pad): carry entering each chunk, final (b, h, p_pad, n_pad)), with
    carry <- a_c * carry + states_c. `reverse` walks the chunks from last to first, which is the
    adjoint recurrence of the forward one."""
    b, nc, h = states.shape[:3]
    size = ns.p_pad * ns.n_pad
    bs = min(block.block_state, size)
    flat = states.reshape(b, nc, h, size)
    seq_spec = pl.BlockSpec((None, nc, None, bs), lambda i, j, k: (i, 0, j, k))
    one_spec = pl.BlockSpec((None, None, bs), lambda i, j, k: (i, j, k))
    prev, final = pl.pallas_call(
        functools.partial(_state_passing_kernel, nc=nc, reverse=reverse),
        grid=(b, h, size // bs),
        in_specs=[seq_spec, pl.BlockSpec((None, None, nc), lambda i, j, k: (i, j, 0)), one_spec],
        out_specs=[seq_spec, one_spec],
        out_shape=[jax.ShapeDtypeStruct(flat.shape, F32), jax.ShapeDtypeStruct((b, h, size), F32)],
        compiler_params=compiler_params(block.num_warps, block.num_stages),
        interpret=interpret,
        name="mamba2_state_passing",
    )(flat, a, init.reshape(b, h, size))
    return prev.reshape(states.shape), final.reshape(b, h, ns.p_pad, ns.n_pad)


# ---------------------------------------------------------------------------------------------
# Step 4: chunk outputs.


def _chunk_output_kernel(*refs, has_seg, mode):
    if has_seg:
        x_ref, dt_ref, cs_ref, e_ref, seg_ref, b_ref, c_ref, prev_ref, y_ref = refs
        seg = seg_ref[...]
    else:
        x_ref, dt_ref, cs_ref, e_ref, b_ref, c_ref, prev_ref, y_ref = refs
        seg = None
    cmat = c_ref[...]
    scores = dot(cmat, b_ref[...], (1, 1), mode) * decay_matrix(cs_ref[...], seg)  # (Q, Q)
    u = x_ref[...].astype(F32) * dt_ref[...][:, None]  # (Q, bp)
    y = dot(scores, u, (1, 0), mode)
    y += e_ref[...][:, None] * dot(cmat, prev_ref[...], (1, 1), mode)
    y_ref[...] = y


def chunk_output(ns, prev, block, interpret):
    """prev (b, nc, h, p_pad, n_pad) fp32 -> y (b, L, h, p_pad) fp32."""
    sp = ChunkSpecs(ns)
    has_seg = ns.seg is not None
    args = [ns.x, ns.dt, ns.cs, ns.e] + ([ns.seg] if has_seg else []) + [ns.B, ns.C, prev]
    in_specs = [sp.seq_hp, sp.pos, sp.pos, sp.pos] + ([sp.seg] if has_seg else [])
    in_specs += [sp.seq_gn, sp.seq_gn, sp.state]
    return pl.pallas_call(
        functools.partial(_chunk_output_kernel, has_seg=has_seg, mode=ns.dots),
        grid=sp.grid,
        in_specs=in_specs,
        out_specs=sp.seq_hp,
        out_shape=jax.ShapeDtypeStruct((ns.b, ns.L, ns.h, ns.p_pad), F32),
        compiler_params=compiler_params(block.num_warps, block.num_stages),
        interpret=interpret,
        name="mamba2_chunk_output",
    )(*args)


def padded_states(t, ns):
    """(b, h, p, n) fp32 or None -> (b, h, p_pad, n_pad) fp32 (zeros for None)."""
    if t is None:
        return jnp.zeros((ns.b, ns.h, ns.p_pad, ns.n_pad), F32)
    return _pad_axis(_pad_axis(t.astype(F32), 2, ns.p_pad), 3, ns.n_pad)


def recompute_states(ns, initial_states, block, interpret):
    """Steps 2-3: the state entering every chunk and the final state, both fp32 and padded."""
    states = chunk_states(ns, ns.x, ns.dt * ns.v, ns.B, block, interpret)
    return state_passing(ns, states, ns.a, padded_states(initial_states, ns), block, interpret)


@functools.partial(jax.jit, static_argnames=("chunk_size", "block", "interpret"))
def forward(x, dt, A, B, C, initial_states, seq_idx, *, chunk_size, block=None, interpret=False):
    """x (b, l, h, p) any float dtype; dt (b, l, h) fp32, already processed (bias, softplus, clip);
    A (h,) fp32; B, C (b, l, g, n) with h % g == 0; initial_states (b, h, p, n) fp32 or None;
    seq_idx (b, l) int32 or None; any l.

    Returns y (b, l, h, p) fp32, the SSD output without the D skip or z gating, and
    final_states (b, h, p, n) fp32.
    """
    block = block or BlockSizes()
    ns = prepare(x, dt, A, B, C, seq_idx, chunk_size, block)
    prev, final = recompute_states(ns, initial_states, block, interpret)
    y = chunk_output(ns, prev, block, interpret)
    return y[:, : ns.l, :, : ns.p], final[:, :, : ns.p, : ns.n]


def backward(x, dt, A, B, C, initial_states, seq_idx, dy, dfinal, *, chunk_size, block=None, interpret=False):
    """Cotangents of `forward`; implemented in `kernel_gpu_bwd` (imported here lazily because that
    module builds on this one). dy (b, l, h, p) fp32, dfinal (b, h, p, n) fp32 or None.

    Returns (dx in x.dtype, ddt fp32 (b, l, h), dA fp32 (h,), dB in B.dtype, dC in C.dtype,
    dinit fp32 (b, h, p, n), or None when initial_states is None).
    """
    from pallas_kernels.mamba2 import kernel_gpu_bwd

    return kernel_gpu_bwd.backward(
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
