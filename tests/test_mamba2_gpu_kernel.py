"""Pallas Triton Mamba2 SSD scan (`kernel_gpu`, `kernel_gpu_bwd`) against the pure-JAX reference.

* Interpret mode on CPU: forward (y, final state) and backward (every cotangent against
  `jax.vjp` of `reference.chunk_scan`) over initial states, segment resets inside chunks and at
  chunk boundaries (with a reappearing label), ragged lengths, padded p / n, p-blocks, fp32/bf16.
* Poisoning: interpret mode fills unwritten output elements with NaN (checked directly), and
  every output element is required finite and compared, so a tile a kernel forgot fails.
* CUDA lowering on this host: the forward and backward export for platforms=["cuda"] at a
  TurboS-like shape and contain the Triton custom calls.
* Real GPU: the same numerics compiled with Triton; skipped when JAX sees no GPU.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import GPU_SKIP_REASON, gpu_available
from jax.experimental import pallas as pl

from pallas_kernels.mamba2 import kernel_gpu, reference

TRITON_CALL = "__gpu$xla.gpu.triton"
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
GRAD_NAMES = ("dx", "ddt", "dA", "dB", "dC", "dinit")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 2
    l: int = 100
    h: int = 4
    p: int = 16
    g: int = 2
    n: int = 16
    chunk: int = 32
    dtype: type = jnp.float32
    init: bool = False
    seq: str | None = None  # None, "inside" (resets inside and at chunk boundaries), "boundary"
    dfinal: bool = True
    dt_shift: float = -1.0  # dt = softplus(N(0, 1) + dt_shift); -4 keeps states alive across chunks
    block: kernel_gpu.BlockSizes | None = None


CASES = [
    Case("fp32_plain", dfinal=False),
    Case("fp32_init_seq_inside", init=True, seq="inside", dt_shift=-4.0),
    Case(
        "fp32_seq_boundary_pblocks",
        p=32,
        seq="boundary",
        block=kernel_gpu.BlockSizes(block_p=16, block_p_bwd=16, block_state=128),
    ),
    Case("bf16_init_seq_inside", dtype=jnp.bfloat16, init=True, seq="inside", dt_shift=-4.0),
    # p, n not powers of two (padded), chunk 48 (the kernel uses 32), a single group.
    Case("bf16_odd_dims", b=1, l=70, p=24, g=1, n=20, chunk=48, dtype=jnp.bfloat16, init=True),
    # TurboS per-head shape family: p = 64, n = 128, h / g = 4, Q = 128 with a ragged tail.
    Case(
        "turbos_heads", b=1, l=200, h=4, p=64, g=1, n=128, chunk=128, init=True, seq="boundary", dt_shift=-3.0
    ),
    # The exact TurboS Mamba2 shape: 64 heads, head_dim 64, 16 groups, d_state 128, chunk 128.
    Case(
        "turbos_full",
        b=1,
        l=256,
        h=64,
        p=64,
        g=16,
        n=128,
        chunk=128,
        dtype=jnp.bfloat16,
        init=True,
        seq="boundary",
        dt_shift=-3.0,
    ),
]


def _seq_idx(case):
    """Change points per batch row; labels alternate so a label reappears after a reset."""
    q = case.chunk
    if case.seq == "boundary":
        points = [[q, 2 * q]] * case.b
    else:
        points = [[5, q, q + 8, q + 9, 2 * q, case.l - 10], [q - 1, q + 1, case.l - 3]][: case.b]
    rows = []
    for pts in points:
        change = np.zeros(case.l, np.int32)
        change[[t for t in pts if 0 < t < case.l]] = 1
        rows.append(np.cumsum(change) % 2)
    return jnp.asarray(np.stack(rows), jnp.int32)


def _inputs(case, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    b, l, h, p, g, n = case.b, case.l, case.h, case.p, case.g, case.n
    x = jax.random.normal(ks[0], (b, l, h, p)).astype(case.dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, h)) + case.dt_shift)  # processed dt
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (h,)))
    B = jax.random.normal(ks[3], (b, l, g, n)).astype(case.dtype)
    C = jax.random.normal(ks[4], (b, l, g, n)).astype(case.dtype)
    init = jax.random.normal(ks[5], (b, h, p, n)) if case.init else None
    seq = _seq_idx(case) if case.seq else None
    # Rounded through x's dtype: the reference returns y in x.dtype, so its vjp takes dy in it.
    dy = jax.random.normal(ks[6], (b, l, h, p)).astype(case.dtype).astype(jnp.float32)
    dfinal = jax.random.normal(ks[7], (b, h, p, n)) if case.dfinal else None
    return (x, dt, A, B, C, init, seq), dy, dfinal


@functools.partial(jax.jit, static_argnames=("chunk", "block", "interpret"))
def _kernel_all(args, dy, dfinal, *, chunk, block, interpret):
    out = kernel_gpu.forward(*args, chunk_size=chunk, block=block, interpret=interpret)
    grads = kernel_gpu.backward(*args, dy, dfinal, chunk_size=chunk, block=block, interpret=interpret)
    return out, grads


@functools.partial(jax.jit, static_argnames=("chunk",))
def _reference_all(args, dy, dfinal, *, chunk):
    *diff_args, seq = args

    def f(x, dt, A, B, C, init):
        return reference.chunk_scan(
            x, dt, A, B, C, chunk, initial_states=init, seq_idx=seq, return_final_states=True
        )

    out, vjp = jax.vjp(f, *diff_args)
    if dfinal is None:
        dfinal = jnp.zeros_like(out[1])
    return out, vjp((dy.astype(out[0].dtype), dfinal))


def _assert_close(name, got, want, tol):
    assert got.shape == want.shape and got.dtype == want.dtype, (
        name,
        got.shape,
        want.shape,
        got.dtype,
        want.dtype,
    )
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{name}: {np.size(got) - np.isfinite(got).sum()} non-finite"
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=name)


def _check(case, interpret):
    args, dy, dfinal = _inputs(case)
    (y, final), grads = _kernel_all(args, dy, dfinal, chunk=case.chunk, block=case.block, interpret=interpret)
    (y_ref, final_ref), grads_ref = _reference_all(args, dy, dfinal, chunk=case.chunk)
    tol = TOL[case.dtype]
    # The reference returns y in x.dtype; the kernel keeps fp32 for the caller's skip and gate.
    _assert_close("y", y.astype(case.dtype), y_ref, tol)
    _assert_close("final_states", final, final_ref, tol)
    for name, got, want in zip(GRAD_NAMES, grads, grads_ref, strict=True):
        if want is None:
            assert got is None, name
        else:
            _assert_close(name, got, want, tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_interpret_matches_reference(case):
    _check(case, interpret=True)


def test_interpret_mode_poisons_unwritten_outputs():
    """What makes the checks above catch unwritten tiles: interpret mode starts outputs as NaN."""

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((16,), lambda i: (i,))
    out = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[spec],
        out_specs=spec,
        out_shape=jax.ShapeDtypeStruct((32,), jnp.float32),
        interpret=True,
    )(jnp.ones((32,), jnp.float32))
    assert np.all(np.asarray(out[:16]) == 1.0) and np.all(np.isnan(np.asarray(out[16:])))


def test_chunk_length_is_a_power_of_two():
    ns = kernel_gpu.prepare(*_inputs(CASES[4])[0][:5], None, 48, kernel_gpu.BlockSizes())
    assert (ns.q, ns.nc, ns.L, ns.bp, ns.p_pad, ns.n_pad) == (32, 3, 96, 32, 32, 32)


# --- CUDA lowering on this host -----------------------------------------------------------------


def _export_cuda(fn, *args):
    disabled = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    return jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)


@pytest.mark.parametrize("with_seq", [False, True], ids=["plain", "seq_init"])
def test_lowers_for_cuda_at_turbos_shape(with_seq):
    """TurboS per device under 8-way tensor parallelism: h = 8, g = 2, p = 64, n = 128, Q = 128."""
    b, l, h, p, g, n = 1, 2048, 8, 64, 2, 128
    sds = jax.ShapeDtypeStruct
    args = [
        sds((b, l, h, p), jnp.bfloat16),
        sds((b, l, h), jnp.float32),
        sds((h,), jnp.float32),
        sds((b, l, g, n), jnp.bfloat16),
        sds((b, l, g, n), jnp.bfloat16),
    ]
    # Optional inputs are passed as pytree leaves (or None), never closed over.
    opt = (sds((b, h, p, n), jnp.float32), sds((b, l), jnp.int32)) if with_seq else (None, None)
    fwd = _export_cuda(lambda a, o: kernel_gpu.forward(*a, *o, chunk_size=128), args, opt)
    fwd = fwd.mlir_module()
    assert fwd.count(TRITON_CALL) == 3, fwd.count(TRITON_CALL)
    for name in ("mamba2_chunk_states", "mamba2_state_passing", "mamba2_chunk_output"):
        assert name in fwd
    cot = (sds((b, l, h, p), jnp.float32), sds((b, h, p, n), jnp.float32))
    bwd = _export_cuda(
        lambda a, o, c: kernel_gpu.backward(*a, *o, *c, chunk_size=128), args, opt, cot
    ).mlir_module()
    # Recomputed states (2 calls), state-gradient source and reverse passing (2), chunk backward.
    assert bwd.count(TRITON_CALL) == 5, bwd.count(TRITON_CALL)
    assert "mamba2_chunk_backward" in bwd


# --- Real GPU ------------------------------------------------------------------------------------


@pytest.mark.skipif(not gpu_available(), reason=GPU_SKIP_REASON)
class TestOnGpu:
    """The interpret-mode cases compiled with Triton, plus a full TurboS-per-device shape."""

    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
    def test_matches_reference(self, case):
        _check(case, interpret=False)

    @pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "fp32"])
    def test_turbos_per_device_shape(self, dtype):
        _check(
            Case(
                "turbos_device",
                b=2,
                l=2048,
                h=8,
                p=64,
                g=2,
                n=128,
                chunk=128,
                dtype=dtype,
                init=True,
                seq="inside",
            ),
            interpret=False,
        )
