"""Mamba2 reference scan vs a float64 NumPy loop over time, decode-step chains, jnp-scan grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from pallas_kernels.mamba2 import chunk_scan, state_update

INF = float("inf")


# ----------------------------------------------------------------------------- ground truths


def _dt_np(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        dt = np.logaddexp(dt, 0.0)
    if tuple(dt_limit) != (0.0, INF):
        dt = np.clip(dt, *dt_limit)
    return dt


def recurrence_np(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    dt_softplus=False,
    dt_limit=(0.0, INF),
):
    """float64 loop over t of state_t = exp(dt A) state_{t-1} + dt x B^T, y_t = state_t C_t + D x_t,
    the state zeroed before t where seq_idx[t] != seq_idx[t-1]. Returns (y, final_state)."""
    f = lambda a: None if a is None else np.asarray(a, np.float64)
    x, dt, A, B, C, D, z, dt_bias, init = map(f, (x, dt, A, B, C, D, z, dt_bias, initial_states))
    b, l, h, p = x.shape
    r = h // B.shape[2]
    B, C = np.repeat(B, r, axis=2), np.repeat(C, r, axis=2)  # (b, l, h, n)
    dt = _dt_np(dt, dt_bias, dt_softplus, dt_limit)
    state = np.zeros((b, h, p, B.shape[-1])) if init is None else init.copy()
    ys = []
    for t in range(l):
        if seq_idx is not None and t > 0:
            reset = np.asarray(seq_idx)[:, t] != np.asarray(seq_idx)[:, t - 1]
            state = np.where(reset[:, None, None, None], 0.0, state)
        decay = np.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(np.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = np.stack(ys, axis=1)
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y, state


def recurrence_jnp(x, dt, A, B, C, D, dt_bias, initial_states, seq_idx, z, dt_softplus, dt_limit):
    """fp32 lax.scan over time of the same recurrence: the gradient ground truth."""
    f32 = lambda a: a.astype(jnp.float32)
    x, dt, B, C, z = map(f32, (x, dt, B, C, z))
    r = x.shape[2] // B.shape[2]
    B, C = jnp.repeat(B, r, axis=2), jnp.repeat(C, r, axis=2)
    dt = dt + dt_bias
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    if tuple(dt_limit) != (0.0, INF):
        dt = jnp.clip(dt, *dt_limit)
    seq = jnp.zeros(x.shape[:2], jnp.int32) if seq_idx is None else seq_idx
    reset = jnp.concatenate([jnp.zeros_like(seq[:, :1]), seq[:, 1:] != seq[:, :-1]], axis=1)

    def step(state, inp):
        xt, dtt, bt, ct, rt = inp
        state = jnp.where(rt[:, None, None, None], 0.0, state)
        state = (
            jnp.exp(dtt * A)[..., None, None] * state + (dtt[..., None] * xt)[..., None] * bt[:, :, None, :]
        )
        return state, jnp.einsum("bhpn,bhn->bhp", state, ct, precision="highest")

    mv = lambda a: jnp.moveaxis(a, 1, 0)
    final, ys = jax.lax.scan(step, f32(initial_states), tuple(map(mv, (x, dt, B, C, reset))))
    y = mv(ys) + x * (D[:, None] if D.ndim == 1 else D)
    return y * jax.nn.silu(z), final


# ----------------------------------------------------------------------------- inputs


def make_seq_idx(rng, b, l, chunk, nonmonotone=False):
    """Several segments per row, with a boundary on a chunk edge and one right after t=0."""
    rows = []
    for _ in range(b):
        starts = set(rng.choice(np.arange(2, l), size=min(4, l - 2), replace=False).tolist())
        starts |= {1} | ({chunk} if chunk < l else set())
        seg = np.cumsum(np.isin(np.arange(l), sorted(starts)))
        rows.append(seg % 2 if nonmonotone else seg + 3)  # labels need not start at 0
    return np.stack(rows).astype(np.int32)


def make_inputs(
    rng,
    b,
    l,
    h,
    p,
    g,
    n,
    *,
    chunk,
    dtype=np.float32,
    d_shape="h",
    z=True,
    init=True,
    seq="none",
    softplus=True,
    dt_limit=(0.0, INF),
):
    nrm = lambda *s: rng.standard_normal(s).astype(np.float32)
    kw = dict(
        x=nrm(b, l, h, p),
        # raw dt: softplus(N(-2, 1) + bias) ~ 0.05..0.5; without softplus, directly positive
        dt=(nrm(b, l, h) - 2.0) if softplus else rng.uniform(0.02, 0.3, (b, l, h)).astype("f4"),
        A=-rng.uniform(0.5, 3.0, h).astype(np.float32),
        B=nrm(b, l, g, n) / np.sqrt(n),
        C=nrm(b, l, g, n),
        D=nrm(h) if d_shape == "h" else (nrm(h, p) if d_shape == "hp" else None),
        z=nrm(b, l, h, p) if z else None,
        dt_bias=0.5 * nrm(h) if softplus else None,
        initial_states=nrm(b, h, p, n) if init else None,
        seq_idx=None if seq == "none" else make_seq_idx(rng, b, l, chunk, seq == "nonmonotone"),
    )
    # Inputs in `dtype`; A, D, dt_bias, initial_states are parameters/state and stay fp32. NumPy
    # arrays throughout: eager jnp ops would each compile, which dominates this file's runtime.
    for k in ("x", "dt", "B", "C", "z"):
        if kw[k] is not None:
            kw[k] = kw[k].astype(dtype)
    opts = dict(dt_softplus=softplus, dt_limit=dt_limit)
    return kw, opts


# ----------------------------------------------------------------------------- forward

# (b, l, h, p, g, n, chunk) ... options
CASES = {
    "ragged_l": ((2, 37, 4, 8, 2, 16, 16), {}),
    "l_lt_chunk_one_group": ((2, 5, 4, 8, 1, 16, 16), dict(d_shape="hp")),
    "g_eq_h_no_z_no_d": ((2, 40, 3, 4, 3, 8, 8), dict(z=False, d_shape=None)),
    "no_init_no_softplus": ((2, 32, 4, 8, 2, 16, 16), dict(init=False, softplus=False)),
    "seq": ((2, 53, 4, 8, 2, 16, 16), dict(seq="monotone")),
    "seq_no_init_one_group": ((3, 37, 4, 8, 1, 16, 8), dict(seq="monotone", init=False, d_shape="hp")),
    "seq_nonmonotone": ((2, 45, 4, 8, 2, 16, 16), dict(seq="nonmonotone")),
    "seq_short_chunk": ((2, 33, 4, 8, 4, 8, 4), dict(seq="monotone")),
    "dt_limit": ((2, 37, 4, 8, 2, 16, 16), dict(dt_limit=(0.1, 0.3), seq="monotone")),
}
# Each case compiles once (~2 s on CPU): bf16 runs on a subset.
BF16_CASES = ("ragged_l", "seq", "dt_limit")


@pytest.mark.parametrize(
    "case,dtype,rtol",
    [(c, np.float32, 1e-5) for c in CASES] + [(c, jnp.bfloat16, 1e-2) for c in BF16_CASES],
    ids=[f"{c}-f32" for c in CASES] + [f"{c}-bf16" for c in BF16_CASES],
)
def test_chunk_scan_matches_recurrence(case, dtype, rtol):
    (b, l, h, p, g, n, chunk), opts = CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    kw, o = make_inputs(rng, b, l, h, p, g, n, chunk=chunk, dtype=dtype, **opts)
    y, final = chunk_scan(chunk_size=chunk, return_final_states=True, **kw, **o)
    y_ref, final_ref = recurrence_np(**kw, **o)
    assert y.dtype == kw["x"].dtype and final.dtype == jnp.float32
    assert_close(y, y_ref, rtol, "y")
    assert_close(final, final_ref, rtol, "final_states")
    if opts.get("dt_limit"):  # the limit must actually bind on both sides
        dtp = np.logaddexp(np.asarray(kw["dt"], np.float64) + kw["dt_bias"], 0)
        assert (dtp < 0.1).any() and (dtp > 0.3).any()


def test_initial_state_stops_at_first_segment_end():
    rng = np.random.default_rng(1)
    kw, o = make_inputs(rng, 1, 40, 4, 8, 2, 16, chunk=16, init=True)
    kw["seq_idx"] = (np.arange(40) >= 21)[None].astype(np.int32)
    y1 = chunk_scan(chunk_size=16, **kw, **o)
    y2 = chunk_scan(chunk_size=16, **{**kw, "initial_states": 2 * kw["initial_states"]}, **o)
    assert not np.allclose(y1[:, :21], y2[:, :21])
    np.testing.assert_array_equal(np.asarray(y1[:, 21:]), np.asarray(y2[:, 21:]))


def test_turbos_head_shape():
    # TurboS Mamba2 mixer: 64 heads x 64 channels, 16 groups, d_state 128, chunk 128.
    rng = np.random.default_rng(2)
    kw, o = make_inputs(rng, 1, 200, 64, 64, 16, 128, chunk=128, d_shape="h", seq="monotone")
    y, final = chunk_scan(chunk_size=128, return_final_states=True, **kw, **o)
    y_ref, final_ref = recurrence_np(**kw, **o)
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(final, final_ref, 2e-5, "final_states")


# ----------------------------------------------------------------------------- decode step


@pytest.mark.parametrize("d_shape", ["h", "hp"])
def test_state_update_chain_matches_chunk_scan(d_shape):
    b, l, h, p, g, n = 2, 21, 4, 8, 2, 16
    rng = np.random.default_rng(3)
    kw, o = make_inputs(rng, b, l, h, p, g, n, chunk=8, d_shape=d_shape, dt_limit=(0.0, 0.4))
    y_scan, final_scan = chunk_scan(chunk_size=8, return_final_states=True, **kw, **o)
    state, ys = kw["initial_states"], []
    for t in range(l):
        at = lambda k: kw[k][:, t]  # noqa: B023 - used immediately
        y, state = state_update(
            state,
            at("x"),
            at("dt"),
            kw["A"],
            at("B"),
            at("C"),
            D=kw["D"],
            z=at("z"),
            dt_bias=kw["dt_bias"],
            **o,
        )
        ys.append(y)
    assert state.dtype == jnp.float32 and ys[0].dtype == jnp.float32
    assert_close(np.stack(ys, axis=1), y_scan, 1e-5, "y")
    assert_close(state, final_scan, 1e-5, "state")


def test_state_update_dtypes_and_matches_numpy():
    rng = np.random.default_rng(4)
    kw, o = make_inputs(rng, 2, 1, 4, 8, 2, 16, chunk=1, dtype=jnp.bfloat16)
    state = kw["initial_states"].astype(jnp.bfloat16)
    sq = lambda a: a[:, 0]
    y, new = state_update(
        state,
        sq(kw["x"]),
        sq(kw["dt"]),
        kw["A"],
        sq(kw["B"]),
        sq(kw["C"]),
        D=kw["D"],
        z=sq(kw["z"]),
        dt_bias=kw["dt_bias"],
        **o,
    )
    assert y.dtype == jnp.bfloat16 and new.dtype == jnp.bfloat16
    y_ref, new_ref = recurrence_np(**{**kw, "initial_states": state}, **o)
    assert_close(y, y_ref[:, 0], 3e-2, "y")
    assert_close(new, new_ref, 3e-2, "state")


# ----------------------------------------------------------------------------- gradients

GRAD_ARGS = ("x", "dt", "A", "B", "C", "D", "dt_bias", "initial_states")


@pytest.mark.parametrize(
    "dtype,rtol,opts",
    [
        # make_seq_idx puts a reset on a chunk edge: grads must stay finite and exact there.
        (np.float32, 2e-5, dict(seq="monotone", d_shape="hp", dt_limit=(0.05, 0.4))),
        (jnp.bfloat16, 2e-2, dict(seq="none")),
    ],
    ids=["f32_seq_hp_limit", "bf16"],
)
def test_grads_match_sequential_scan(dtype, rtol, opts):
    b, l, h, p, g, n, chunk = 2, 37, 4, 8, 2, 16, 16
    rng = np.random.default_rng(5)
    kw, o = make_inputs(rng, b, l, h, p, g, n, chunk=chunk, dtype=dtype, **opts)
    wy = rng.standard_normal((b, l, h, p)).astype(np.float32)
    ws = rng.standard_normal((b, h, p, n)).astype(np.float32)
    fixed = {k: kw[k] for k in ("seq_idx", "z")}

    def loss_chunked(args):
        y, s = chunk_scan(**args, **fixed, chunk_size=chunk, return_final_states=True, **o)
        return jnp.sum(wy * y.astype(jnp.float32)) + jnp.sum(ws * s)

    def loss_seq(args):
        y, s = recurrence_jnp(**args, **fixed, **o)
        return jnp.sum(wy * y) + jnp.sum(ws * s)

    args = {k: kw[k] for k in GRAD_ARGS}
    g_chunked = jax.jit(jax.grad(loss_chunked))(args)
    # Same (rounded) values in fp32, so both sides differentiate the same function.
    g_seq = jax.jit(jax.grad(loss_seq))({k: v.astype(np.float32) for k, v in args.items()})
    for k in GRAD_ARGS:
        assert g_chunked[k].dtype == args[k].dtype, k
        assert_close(g_chunked[k], g_seq[k], rtol, f"d/d{k}")


# ----------------------------------------------------------------------------- impl


@pytest.mark.parametrize("impl", ["triton", "bogus"])
def test_unknown_impl_raises(impl):
    rng = np.random.default_rng(7)
    kw, o = make_inputs(rng, 1, 8, 2, 4, 1, 8, chunk=4)
    with pytest.raises(ValueError, match="impl"):
        chunk_scan(chunk_size=4, impl=impl, **kw, **o)
    st = {k: (v[:, 0] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    state = st.pop("initial_states")
    st.pop("seq_idx")
    with pytest.raises(ValueError, match="impl"):
        state_update(state, impl=impl, **st, **o)
