"""Pallas kernels for one Mamba2 decode step, updating the fp32 SSM state in place.

Layouts (mamba_ssm, as `reference.state_update`), h % g == 0, r = h // g heads per B/C group:

    state (b, h, p, n) fp32   x (b, h, p) any float   dt (b, h) fp32   A (h,) fp32   B, C (b, g, n)

`dt` arrives already processed (bias, softplus and clipping are the caller's), and the outputs are
y (b, h, p) fp32 WITHOUT the D skip and the silu(z) gate (the caller adds them) and the new state:

    new[b, h] = exp(dt[b, h] * A[h]) * state[b, h] + dt[b, h] * outer(x[b, h], B[b, h // r])
    y[b, h] = new[b, h] @ C[b, h // r]

i.e. `reference.state_update(..., D=None, z=None, dt_bias=None, dt_softplus=False)` in fp32.

The step is memory bound: it reads and writes the whole state (8 * b*h*p*n bytes) and does ~5 FLOPs
per state element. The state input is aliased to the new-state output (`input_output_aliases`), so
when the caller donates the state buffer (the decode loop's cache), XLA updates it in place instead
of allocating and copying b*h*p*n*4 bytes per layer and token.

Decode is inference only: the kernels define no backward, and differentiating them raises
NotImplementedError (Pallas has no JVP for calls with aliased outputs); training uses the chunked
scan.

Both kernels, per grid step:
  1. load the state block, the x rows, the B/C rows of the block's groups and the dt/A scalars;
  2. decay = exp(dt * A) per head (dt*A <= 0, so the exponent never overflows);
  3. new = decay * state + (dt * x)[:, None] * B[None, :]  (an outer product on the VPU, exact fp32);
  4. store new over the (aliased) state block;
  5. y = sum_n new * C  (a lane reduction, exact fp32, no MXU precision question) and store it.

TPU (Mosaic): grid (b, h // heads), both axes "parallel" (megacore splits them). A step owns
`heads` whole heads, so its state block is (heads, p, n) with (p, n) full dims: ~1 MiB per step at
the TurboS shape, large against the ~0.35 us per-step overhead. dt (b, h) and A (h,) sit whole in
SMEM (b*h*4 bytes; Pallas rejects (1, heads) blocks of them) and are read as scalars; x/y are
(heads, p) blocks and B/C (heads // r, n) blocks of their natural layouts, so XLA inserts no
relayout copies. Heads are unrolled statically, which keeps every group index static
(Mosaic cannot load one dynamically chosen packed bf16 row).

GPU (Triton): grid (b, h, p // block_p), one head (or a p slice of it) per program; B/C/x are 1-D
row blocks, dt and A scalars. Triton arrays must have power-of-2 sizes; other p or n take the same
step in plain JAX (`_xla_step`), as does a batch too large for the TPU kernel's SMEM.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mamba2 import reference

F32 = jnp.float32
# TPU: aim for ~this many bytes of state per grid step (in and out are double-buffered, so VMEM use
# is ~4x this: well inside the default scoped VMEM limit of every TPU generation).
_TPU_TARGET_BLOCK_BYTES = 1 << 20
# TPU: dt (b, h) lives whole in SMEM (1 MiB on v4 and later); cap it (rows padded to 128 lanes,
# conservatively) so b <= 1024 at h = 64; larger batches take the XLA step.
_SMEM_LIMIT_BYTES = 512 << 10
# GPU: below this many programs (b * h * p-blocks) p is split to fill the SMs.
_GPU_MIN_PROGRAMS = 512


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the decode kernels; None picks a default from the shapes.

    heads: TPU, heads per grid step. Must divide h, be a multiple of r = h // g, and give x/y/B/C
      blocks Pallas TPU accepts: heads % 8 == 0 and (heads // r) % 8 == 0, or heads == h.
      Default: the smallest legal count with >= 1 MiB of state per step (32 at the TurboS shape).
    block_p: GPU, rows of p per program (a power of 2 dividing p). Default: p, halved (down to 16)
      while there are fewer than 512 programs (small batches).
    num_warps: GPU, warps per program. Default: one per 1024 state elements of a block, 4 to 16.
    """

    heads: int | None = None
    block_p: int | None = None
    num_warps: int | None = None


def _check(state, x, dt, A, B, C):
    """Validates shapes/dtypes; returns (b, h, p, n, g)."""
    if state.ndim != 4:
        raise ValueError(f"state must be (b, h, p, n); got {state.shape}")
    b, h, p, n = state.shape
    g = B.shape[1] if B.ndim == 3 else 0
    if (
        x.shape != (b, h, p)
        or dt.shape != (b, h)
        or A.shape != (h,)
        or B.shape != (b, g, n)
        or C.shape != B.shape
        or g == 0
        or h % g
    ):
        raise ValueError(
            f"bad shapes: state {state.shape} x {x.shape} dt {dt.shape} A {A.shape} "
            f"B {B.shape} C {C.shape} (need x (b,h,p), dt (b,h), A (h,), B/C (b,g,n), "
            "h % g == 0)"
        )
    if state.dtype != F32:
        raise ValueError(f"state must be float32 (updated in place); got {state.dtype}")
    return b, h, p, n, g


def _tpu_heads_ok(heads, h, r) -> bool:
    """Pallas TPU blocks: the last two block dims are multiples of (8, 128) or the full dims. x/y
    blocks are (heads, p) and B/C blocks (heads // r, n) of (h, p) and (g, n)."""
    if heads <= 0 or h % heads or heads % r:
        return False
    return heads == h or (heads % 8 == 0 and (heads // r) % 8 == 0)


def _tpu_heads(block: BlockSizes | None, h, r, p, n) -> int:
    """Heads per TPU grid step: the requested one (validated) or the smallest legal count whose state
    block reaches the target size (h itself is always legal)."""
    if block is not None and block.heads is not None:
        if not _tpu_heads_ok(block.heads, h, r):
            raise ValueError(f"BlockSizes.heads={block.heads} is not legal for h={h}, r={r} (see BlockSizes)")
        return block.heads
    legal = [k for k in range(1, h + 1) if _tpu_heads_ok(k, h, r)]
    big = [k for k in legal if k * p * n * 4 >= _TPU_TARGET_BLOCK_BYTES]
    return big[0] if big else legal[-1]


# ------------------------------------------------------------------------------------------ TPU
def _tpu_vmem_limit(heads, p, n) -> int | None:
    """Scoped VMEM limit for blocks larger than the defaults allow (16 MiB on v4/v5e/v5p): state in
    and out, double-buffered, plus x/y/B/C. None (the default limit) when they fit easily."""
    need = 4 * heads * p * n * 4 + 4 * heads * (p + n) * 4
    return None if need <= (12 << 20) else need + need // 4 + (4 << 20)


def _tpu_kernel(dt_ref, a_ref, x_ref, b_ref, c_ref, s_ref, y_ref, o_ref, *, heads, r):
    """One (batch, head-block) step. dt_ref (b, h), a_ref (h,) whole arrays in SMEM; x_ref/y_ref
    (heads, p); b_ref/c_ref (heads // r, n); s_ref/o_ref (heads, p, n) (one HBM buffer, aliased)."""
    bi, h0 = pl.program_id(0), pl.program_id(1) * heads
    x = x_ref[...].astype(F32)  # (heads, p)
    rows = []
    for j in range(heads):  # static: group row j // r is a static sublane offset
        dt = dt_ref[bi, h0 + j]
        # Step 2. exp runs on the vector unit, so the scalar is splat into a (1, 1) vector first.
        decay = jnp.exp(jnp.full((1, 1), dt * a_ref[h0 + j], F32))
        bj = b_ref[pl.ds(j // r, 1), :].astype(F32)  # (1, n)
        cj = c_ref[pl.ds(j // r, 1), :].astype(F32)
        # Step 3. x row (p,) -> column (p, 1) so it broadcasts along the lanes (n).
        new = decay * s_ref[j] + (dt * x[j])[:, None] * bj  # (p, n)
        o_ref[j] = new  # step 4
        rows.append(jnp.sum(new * cj, axis=-1)[None, :])  # step 5: (1, p)
    y_ref[...] = jnp.concatenate(rows, axis=0)


def state_update_tpu(state, x, dt, A, B, C, *, block: BlockSizes | None = None, interpret=False):
    """Mosaic TPU kernel: one decode step; returns (y (b, h, p) fp32, new_state (b, h, p, n) fp32).

    state (b, h, p, n) fp32, aliased to new_state (donate it to update in place); x (b, h, p) any
    float; dt (b, h) processed fp32 (bias/softplus/clip done); A (h,) fp32; B, C (b, g, n) any float.
    y has no D skip and no z gate. `interpret` is passed to `pl.pallas_call` (True, or a
    `pltpu.InterpretParams`). Forward only: no backward (decode is inference). A batch whose dt
    does not fit the SMEM budget (b > 1024 at h = 64) falls back to `_xla_step` (not an error,
    since `by_platform` traces this branch on every platform).
    """
    b, h, p, n, g = _check(state, x, dt, A, B, C)
    if b * -(-h // 128) * 128 * 4 > _SMEM_LIMIT_BYTES:
        return _xla_step(state, x, dt, A, B, C)  # dt would not fit SMEM (b > 1024 at h = 64)
    r = h // g
    heads = _tpu_heads(block, h, r, p, n)
    gb = heads // r  # B/C groups per step
    kernel = lambda *refs: _tpu_kernel(*refs, heads=heads, r=r)
    smem = pltpu.SMEM
    in_specs = [
        pl.BlockSpec(memory_space=smem),  # dt: whole (b, h), see _SMEM_LIMIT_BYTES
        pl.BlockSpec(memory_space=smem),  # A: whole (h,)
        pl.BlockSpec((None, heads, p), lambda i, j: (i, j, 0)),  # x
        pl.BlockSpec((None, gb, n), lambda i, j: (i, j, 0)),  # B
        pl.BlockSpec((None, gb, n), lambda i, j: (i, j, 0)),  # C
        pl.BlockSpec((None, heads, p, n), lambda i, j: (i, j, 0, 0)),  # state
    ]
    out_specs = [
        pl.BlockSpec((None, heads, p), lambda i, j: (i, j, 0)),
        pl.BlockSpec((None, heads, p, n), lambda i, j: (i, j, 0, 0)),
    ]
    y, new = pl.pallas_call(
        kernel,
        grid=(b, h // heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, h, p), F32), jax.ShapeDtypeStruct(state.shape, F32)],
        input_output_aliases={5: 1},
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=(pltpu.PARALLEL, pltpu.PARALLEL),
            vmem_limit_bytes=_tpu_vmem_limit(heads, p, n),
        ),
        cost_estimate=_cost(b, h, p, n, g, x.dtype, B.dtype),
        interpret=interpret,
        name="mamba2_state_update",
    )(dt.astype(F32), A.astype(F32), x, B, C, state)
    return y, new


# ------------------------------------------------------------------------------------------ GPU
def _gpu_kernel(dt_ref, a_ref, x_ref, b_ref, c_ref, s_ref, y_ref, o_ref):
    """One (batch, head, p-block) program. dt_ref (b, h), a_ref (h,) whole arrays (scalars are
    read at the program's indices); x_ref/y_ref (block_p,); b_ref/c_ref (n,); s_ref/o_ref
    (block_p, n) (aliased)."""
    bi, hi = pl.program_id(0), pl.program_id(1)
    dt = dt_ref[bi, hi]
    decay = jnp.exp(dt * a_ref[hi])  # step 2
    x = x_ref[...].astype(F32)
    bv = b_ref[...].astype(F32)
    new = decay * s_ref[...] + (dt * x)[:, None] * bv[None, :]  # step 3
    o_ref[...] = new  # step 4
    y_ref[...] = jnp.sum(new * c_ref[...].astype(F32)[None, :], axis=1)  # step 5


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def _gpu_block_p(block: BlockSizes | None, b, h, p) -> int:
    if block is not None and block.block_p is not None:
        bp = block.block_p
        if not (_is_pow2(bp) and p % bp == 0):
            raise ValueError(f"BlockSizes.block_p={bp} must be a power of 2 dividing p={p}")
        return bp
    bp = p
    while bp > 16 and b * h * (p // bp) < _GPU_MIN_PROGRAMS:
        bp //= 2  # small batches: split p so there are enough programs for every SM
    return bp


def state_update_gpu(state, x, dt, A, B, C, *, block: BlockSizes | None = None, interpret=False):
    """Triton GPU kernel: one decode step; returns (y (b, h, p) fp32, new_state (b, h, p, n) fp32).

    Same contract as `state_update_tpu` (state aliased to new_state; y without D/z; no backward).
    Triton arrays must have power-of-2 sizes: for p or n that are not, this falls back to
    `_xla_step` (not an error, since `by_platform` traces this branch on every platform).
    """
    b, h, p, n, g = _check(state, x, dt, A, B, C)
    if not (_is_pow2(p) and _is_pow2(n)):
        return _xla_step(state, x, dt, A, B, C)  # Triton arrays must have power-of-2 sizes
    r = h // g
    bp = _gpu_block_p(block, b, h, p)
    num_warps = None if block is None else block.num_warps
    if num_warps is None:  # ~32 fp32 state elements per thread keeps the block in registers
        num_warps = min(16, max(4, bp * n // 1024))
    in_specs = [
        pl.BlockSpec((b, h), lambda i, j, k: (0, 0)),  # dt: whole (b*h*4 bytes), scalar reads
        pl.BlockSpec((h,), lambda i, j, k: (0,)),  # A
        pl.BlockSpec((None, None, bp), lambda i, j, k: (i, j, k)),  # x
        pl.BlockSpec((None, None, n), lambda i, j, k: (i, j // r, 0)),  # B of head j's group
        pl.BlockSpec((None, None, n), lambda i, j, k: (i, j // r, 0)),  # C
        pl.BlockSpec((None, None, bp, n), lambda i, j, k: (i, j, k, 0)),  # state
    ]
    out_specs = [
        pl.BlockSpec((None, None, bp), lambda i, j, k: (i, j, k)),
        pl.BlockSpec((None, None, bp, n), lambda i, j, k: (i, j, k, 0)),
    ]
    y, new = pl.pallas_call(
        _gpu_kernel,
        grid=(b, h, p // bp),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct((b, h, p), F32), jax.ShapeDtypeStruct(state.shape, F32)],
        input_output_aliases={5: 1},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        cost_estimate=_cost(b, h, p, n, g, x.dtype, B.dtype),
        interpret=interpret,
        name="mamba2_state_update",
    )(dt.astype(F32), A.astype(F32), x, B, C, state)
    return y, new


def _xla_step(state, x, dt, A, B, C):
    """The same step in plain JAX (fp32), for shapes a kernel cannot take: (y fp32, new fp32)."""
    y, new = reference.state_update(
        state, x.astype(F32), dt.astype(F32), A.astype(F32), B.astype(F32), C.astype(F32)
    )
    return y, new


def _cost(b, h, p, n, g, x_dtype, bc_dtype) -> pl.CostEstimate:
    """Minimal traffic and work, so XLA schedules the call as the memory-bound op it is: the state
    read + written (fp32), x read, y written (fp32), B/C read once per group, dt/A read;
    ~5 FLOPs per state element (decay*s, dt*x*B fma, *C, sum) and one exp per head."""
    bytes_ = (
        2 * b * h * p * n * 4
        + b * h * p * (jnp.dtype(x_dtype).itemsize + 4)
        + 2 * b * g * n * jnp.dtype(bc_dtype).itemsize
        + b * h * 4
        + h * 4
    )
    return pl.CostEstimate(flops=5 * b * h * p * n, transcendentals=b * h, bytes_accessed=bytes_)
