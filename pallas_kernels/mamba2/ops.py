"""Public Mamba2 scan ops: `impl="xla"` runs the pure-JAX reference (`reference.py`), `impl="pallas"`
the kernels of the platform being compiled for (`kernel_tpu.py` Mosaic, `kernel_gpu.py` Triton,
`kernel_decode.py`), in Pallas interpret mode on other platforms (CPU: tests).

Layouts (mamba_ssm): x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), state (b, h, p, n).
The ops are jitted with the configuration arguments static; `dt_limit` is normalised to a tuple of
floats so a list works too.

The kernels implement the SSD core only (y = scan output, final state, from processed dt). Around it,
in plain JAX that XLA fuses into neighbouring elementwise work:
  1. dt processing (bias, softplus, clip) before the kernel; autodiff carries its gradient.
  2. The core: `_ssd_core`, a custom_vjp whose forward and backward are each one platform dispatch
     (`pallas_kernels.by_platform`); the backward recomputes chunk states from the saved inputs
     instead of keeping them from the forward.
  3. D skip and z gating after it (`reference.skip_and_gate`), then the cast to x.dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import by_platform, check_impl
from pallas_kernels.mamba2 import reference

_NO_LIMIT = reference.NO_DT_LIMIT
F32 = jnp.float32


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
    dt_limit=_NO_LIMIT,
    return_final_states=False,
    impl="xla",
):
    """Mamba2 chunked scan (`mamba_chunk_scan_combined` semantics).

    x (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n), h % g == 0; D (h,) or (h, p);
    z (b, l, h, p); dt_bias (h,); initial_states (b, h, p, n); seq_idx (b, l) int32 (state resets
    where it changes). Returns y (b, l, h, p) in x.dtype, or (y, final_states (b, h, p, n) fp32).
    """
    check_impl(impl, "chunk_scan")
    fn = _chunk_scan_xla if impl == "xla" else _chunk_scan_pallas
    return fn(
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        initial_states,
        seq_idx,
        chunk_size=int(chunk_size),
        dt_softplus=bool(dt_softplus),
        dt_limit=tuple(float(v) for v in dt_limit),
        return_final_states=bool(return_final_states),
    )


_STATIC = ("chunk_size", "dt_softplus", "dt_limit", "return_final_states")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _chunk_scan_xla(
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    initial_states,
    seq_idx,
    *,
    chunk_size,
    dt_softplus,
    dt_limit,
    return_final_states,
):
    return reference.chunk_scan(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq_idx,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _chunk_scan_pallas(
    x,
    dt,
    A,
    B,
    C,
    D,
    z,
    dt_bias,
    initial_states,
    seq_idx,
    *,
    chunk_size,
    dt_softplus,
    dt_limit,
    return_final_states,
):
    reference.check_shapes(x, dt, A, B, C)
    dtp = reference.process_dt(dt, dt_bias, dt_softplus, dt_limit)  # step 1
    init = None if initial_states is None else initial_states.astype(F32)
    seq = None if seq_idx is None else seq_idx.astype(jnp.int32)
    y, final = _ssd_core(chunk_size, x, dtp, A.astype(F32), B, C, init, seq)  # step 2
    y = reference.skip_and_gate(y, x, D, z).astype(x.dtype)  # step 3
    return (y, final) if return_final_states else y


def _kernels():
    from pallas_kernels.mamba2 import kernel_gpu, kernel_tpu

    return kernel_tpu, kernel_gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd_core(chunk_size, x, dt, A, B, C, initial_states, seq_idx):
    """(y fp32 (b, l, h, p), final_states fp32 (b, h, p, n)) of the SSD scan of processed dt."""
    tpu, gpu = _kernels()
    kw = dict(chunk_size=chunk_size)
    return by_platform(
        x,
        dt,
        A,
        B,
        C,
        initial_states,
        seq_idx,
        tpu=functools.partial(tpu.forward, **kw),
        gpu=functools.partial(gpu.forward, **kw),
        other=functools.partial(tpu.forward, interpret=True, **kw),
    )


def _ssd_core_fwd(chunk_size, x, dt, A, B, C, initial_states, seq_idx):
    out = _ssd_core(chunk_size, x, dt, A, B, C, initial_states, seq_idx)
    return out, (x, dt, A, B, C, initial_states, seq_idx)


def _ssd_core_bwd(chunk_size, residuals, cotangents):
    x, dt, A, B, C, initial_states, seq_idx = residuals
    dy, dfinal = cotangents
    tpu, gpu = _kernels()
    kw = dict(chunk_size=chunk_size)
    dx, ddt, dA, dB, dC, dinit = by_platform(
        x,
        dt,
        A,
        B,
        C,
        initial_states,
        seq_idx,
        dy.astype(F32),
        dfinal.astype(F32),
        tpu=functools.partial(tpu.backward, **kw),
        gpu=functools.partial(gpu.backward, **kw),
        other=functools.partial(tpu.backward, interpret=True, **kw),
    )
    return dx, ddt, dA, dB, dC, dinit, None


_ssd_core.defvjp(_ssd_core_fwd, _ssd_core_bwd)


def state_update(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=_NO_LIMIT, impl="xla"
):
    """One decode step: state (b, h, p, n); x (b, h, p); dt (b, h); A (h,); B, C (b, g, n);
    D (h,) or (h, p); z (b, h, p); dt_bias (h,). Returns (y (b, h, p) in x.dtype,
    new_state (b, h, p, n) in state.dtype). Inference only: the Pallas kernel has no backward.
    With impl="pallas" and an fp32 state, the kernel updates the state buffer in place when the
    caller donates it."""
    check_impl(impl, "state_update")
    fn = _state_update_xla if impl == "xla" else _state_update_pallas
    return fn(
        state,
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        dt_softplus=bool(dt_softplus),
        dt_limit=tuple(float(v) for v in dt_limit),
    )


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def _state_update_xla(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit):
    return reference.state_update(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit
    )


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def _state_update_pallas(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit):
    from pallas_kernels.mamba2 import kernel_decode

    dtp = reference.process_dt(dt, dt_bias, dt_softplus, dt_limit)
    y, new = by_platform(
        state.astype(F32),
        x,
        dtp,
        A.astype(F32),
        B,
        C,
        tpu=kernel_decode.state_update_tpu,
        gpu=kernel_decode.state_update_gpu,
        other=functools.partial(kernel_decode.state_update_tpu, interpret=True),
    )
    y = reference.skip_and_gate(y, x, D, z).astype(x.dtype)
    return y, new.astype(state.dtype)
