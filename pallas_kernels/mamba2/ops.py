"""Public Mamba2 scan ops. `impl="xla"` runs the pure-JAX reference (`reference.py`).

Layouts (mamba_ssm): x (b, l, h, p), dt (b, l, h), A (h,), B/C (b, l, g, n), state (b, h, p, n).
Both ops are jitted with the configuration arguments static; `dt_limit` is normalised to a tuple of
floats so a list works too.
"""

from __future__ import annotations

import functools

import jax

from pallas_kernels import check_impl
from pallas_kernels.mamba2 import reference

_NO_LIMIT = reference.NO_DT_LIMIT


def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
               seq_idx=None, dt_softplus=False, dt_limit=_NO_LIMIT, return_final_states=False,
               impl="xla"):
    """Mamba2 chunked scan (`mamba_chunk_scan_combined` semantics).

    x (b, l, h, p); dt (b, l, h); A (h,); B, C (b, l, g, n), h % g == 0; D (h,) or (h, p);
    z (b, l, h, p); dt_bias (h,); initial_states (b, h, p, n); seq_idx (b, l) int32 (state resets
    where it changes). Returns y (b, l, h, p) in x.dtype, or (y, final_states (b, h, p, n) fp32).
    """
    check_impl(impl, "chunk_scan")
    return _chunk_scan_xla(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx,
                           chunk_size=int(chunk_size), dt_softplus=bool(dt_softplus),
                           dt_limit=tuple(float(v) for v in dt_limit),
                           return_final_states=bool(return_final_states))


@functools.partial(jax.jit, static_argnames=("chunk_size", "dt_softplus", "dt_limit",
                                             "return_final_states"))
def _chunk_scan_xla(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *, chunk_size,
                    dt_softplus, dt_limit, return_final_states):
    return reference.chunk_scan(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                initial_states=initial_states, seq_idx=seq_idx,
                                dt_softplus=dt_softplus, dt_limit=dt_limit,
                                return_final_states=return_final_states)


def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                 dt_limit=_NO_LIMIT, impl="xla"):
    """One decode step: state (b, h, p, n); x (b, h, p); dt (b, h); A (h,); B, C (b, g, n);
    D (h,) or (h, p); z (b, h, p); dt_bias (h,). Returns (y (b, h, p) in x.dtype,
    new_state (b, h, p, n) in state.dtype)."""
    check_impl(impl, "state_update")
    return _state_update_xla(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=bool(dt_softplus),
                             dt_limit=tuple(float(v) for v in dt_limit))


@functools.partial(jax.jit, static_argnames=("dt_softplus", "dt_limit"))
def _state_update_xla(state, x, dt, A, B, C, D, z, dt_bias, *, dt_softplus, dt_limit):
    return reference.state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                  dt_softplus=dt_softplus, dt_limit=dt_limit)
