"""The Mamba2 SSD scan TPU kernel (`pallas_kernels/mamba2/kernel_tpu*.py`) against the reference.

* Interpret mode on CPU: forward (y, final state) and backward (every cotangent against `jax.vjp`
  of `reference.chunk_scan`) over fp32/bf16, with/without initial states and packed documents,
  a length that is not a chunk multiple, and a TurboS-sized head block.
* Outputs poisoned with NaN (aliased into the kernels' outputs), so an element a kernel never
  writes shows up as NaN.
* AOT compilation for a TPU v5p chip (tests/tpu_aot.py) of the forward and the backward at a
  TurboS-like shape; skipped only without libtpu.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from pallas_kernels.mamba2 import kernel_tpu, kernel_tpu_bwd, reference

# Other processes on this host may hold libtpu's lockfile; AOT compiling needs no exclusive TPU.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {F32: 1e-4, BF16: 2e-2}
NAMES = ("dx", "ddt", "dA", "dB", "dC", "dinit")
PALLAS_CALL = pl.pallas_call  # the unpatched one, for the poisoned test's wrapper


def make_inputs(key, b, l, h, p, g, n, dtype, with_init, with_seq):
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (b, l, h, p)).astype(dtype)
    dt = jax.nn.softplus(jax.random.normal(ks[1], (b, l, h)) - 1.0)  # processed dt, > 0
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (h,)))
    B = jax.random.normal(ks[3], (b, l, g, n)).astype(dtype)
    C = jax.random.normal(ks[4], (b, l, g, n)).astype(dtype)
    init = jax.random.normal(ks[5], (b, h, p, n)) if with_init else None
    seq_idx = None
    if with_seq:
        t = jnp.arange(l)
        # Row 0: resets inside chunks, at chunk boundaries (32, 64), a 1-token document (64) and
        # arbitrary (non-contiguous) labels; row 1: two documents; further rows: one document.
        starts = jnp.array([0, 17, 32, 64, 65, 90])
        labels = jnp.array([7, 3, 9, 2, 5, 1])[(t[:, None] >= starts).sum(-1) - 1]
        seq_idx = jnp.zeros((b, l), jnp.int32).at[0].set(labels)
        if b > 1:
            seq_idx = seq_idx.at[1].set(jnp.where(t < 40, 4, 6))
    return x, dt, A, B, C, init, seq_idx


@functools.partial(jax.jit, static_argnames=("chunk",))
def reference_vjp(x, dt, A, B, C, init, seq_idx, dy, dfinal, *, chunk):
    """Reference outputs on the fp32 values of the inputs and every cotangent of them."""

    def f(x, dt, A, B, C, init):
        return reference.chunk_scan(
            x, dt, A, B, C, chunk, initial_states=init, seq_idx=seq_idx, return_final_states=True
        )

    primals = (x.astype(F32), dt, A, B.astype(F32), C.astype(F32), init)
    out, vjp = jax.vjp(f, *primals)
    return out, vjp((dy, dfinal))


def cotangents(y_shape, final_shape):
    return (
        jax.random.normal(jax.random.PRNGKey(11), y_shape),
        jax.random.normal(jax.random.PRNGKey(12), final_shape),
    )


def rel_err(got, want):
    """Max abs error relative to the reference's max magnitude; NaN anywhere fails."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def check_against_reference(args, chunk, dtype, block=None, interpret=True, with_dfinal=True):
    x, dt, A, B, C, init, seq_idx = args
    kw = dict(chunk_size=chunk, block=block, interpret=interpret)
    # Fresh lambdas, so no trace is reused from another test (the poisoned test patches Pallas).
    fwd = jax.jit(lambda *a: kernel_tpu.forward(*a, **kw))
    bwd = jax.jit(lambda *a: kernel_tpu.backward(*a, **kw))
    y, final = fwd(*args)
    dy, dfinal = cotangents(y.shape, final.shape)
    if not with_dfinal:
        dfinal = jnp.zeros_like(dfinal)  # what the kernel's dfinal=None stands for
    (y_ref, final_ref), grads_ref = reference_vjp(*args, dy, dfinal, chunk=chunk)
    assert y.dtype == final.dtype == F32
    tol = TOL[dtype]
    errs = {"y": rel_err(y, y_ref), "final": rel_err(final, final_ref)}

    grads = bwd(*args, dy, dfinal if with_dfinal else None)
    assert len(grads) == 6
    for name, got, want, primal in zip(NAMES, grads, grads_ref, (x, dt, A, B, C, init), strict=True):
        if primal is None:
            assert got is None, name
            continue
        assert got.dtype == (primal.dtype if name in ("dx", "dB", "dC") else F32), name
        errs[name] = rel_err(got, want)
    assert all(e < tol for e in errs.values()), errs


SMALL = dict(b=2, l=100, h=4, p=16, g=2, n=16)  # l = 3 chunks of 32 + a padded tail


@pytest.mark.parametrize(
    "dtype,with_init,with_seq,heads_per_block,with_dfinal",
    [
        (F32, False, False, None, True),
        (F32, True, True, 1, True),  # one head per step: dB/dC partials summed over a group's blocks
        (BF16, True, False, None, False),
        (BF16, False, True, None, True),
    ],
    ids=["f32", "f32-init-seq-hb1", "bf16-init-no-dfinal", "bf16-seq"],
)
def test_interpret_matches_reference(dtype, with_init, with_seq, heads_per_block, with_dfinal):
    args = make_inputs(jax.random.PRNGKey(0), **SMALL, dtype=dtype, with_init=with_init, with_seq=with_seq)
    check_against_reference(
        args, 32, dtype, block=kernel_tpu.BlockSizes(heads_per_block), with_dfinal=with_dfinal
    )


def test_interpret_sequence_shorter_than_chunk():
    """l < chunk: the reference uses one chunk of l, the kernel one padded to a sublane multiple."""
    args = make_inputs(
        jax.random.PRNGKey(3), b=1, l=20, h=2, p=8, g=1, n=8, dtype=F32, with_init=True, with_seq=True
    )
    check_against_reference(args, 64, F32)


def test_interpret_turbos_heads():
    """TurboS's head shape (64 channels, state 128, 4 heads per B/C group; 16 heads and 4 groups
    stand in for 64 and 16), short l."""
    args = make_inputs(
        jax.random.PRNGKey(1), b=1, l=128, h=16, p=64, g=4, n=128, dtype=BF16, with_init=True, with_seq=True
    )
    check_against_reference(args, 64, BF16)


def test_interpret_full_turbos_shape():
    """The exact TurboS Mamba2 shape: 64 heads, head_dim 64, 16 groups, d_state 128, chunk 128."""
    args = make_inputs(
        jax.random.PRNGKey(2), b=1, l=256, h=64, p=64, g=16, n=128, dtype=BF16, with_init=True, with_seq=True
    )
    check_against_reference(args, 128, BF16)


def _poisoned_pallas_call(kernel, *, in_specs, out_specs, out_shape, **kwargs):
    """pl.pallas_call whose outputs start as NaN buffers aliased in as extra (ignored) inputs."""
    n_in, n_out = len(in_specs), len(out_shape)

    def body(*refs):
        kernel(*refs[:n_in], *refs[n_in + n_out :])

    call = PALLAS_CALL(
        body,
        in_specs=list(in_specs) + list(out_specs),
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases={n_in + i: i for i in range(n_out)},
        **kwargs,
    )
    nan = [jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shape]
    return lambda *args: call(*args, *nan)


def test_outputs_poisoned_with_nan(monkeypatch):
    for module in (kernel_tpu, kernel_tpu_bwd):
        monkeypatch.setattr(module.pl, "pallas_call", _poisoned_pallas_call)
    args = make_inputs(jax.random.PRNGKey(2), **SMALL, dtype=F32, with_init=True, with_seq=True)
    check_against_reference(args, 32, F32)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_lowers_for_tpu(direction):
    from tpu_aot import compile_for_tpu, count_mosaic_calls

    b, l, h, p, g, n = 1, 1024, 64, 64, 16, 128
    S = jax.ShapeDtypeStruct
    ins = [
        S((b, l, h, p), BF16),
        S((b, l, h), F32),
        S((h,), F32),
        S((b, l, g, n), BF16),
        S((b, l, g, n), BF16),
        S((b, h, p, n), F32),
        S((b, l), jnp.int32),
    ]
    if direction == "forward":
        fn = functools.partial(kernel_tpu.forward, chunk_size=128)
    else:
        fn = functools.partial(kernel_tpu.backward, chunk_size=128)
        ins += [S((b, l, h, p), F32), S((b, h, p, n), F32)]
    hlo = compile_for_tpu(fn, *ins)
    # The backward recomputes the chunk states with the forward kernel, then runs its own.
    assert count_mosaic_calls(hlo) >= (1 if direction == "forward" else 2)
