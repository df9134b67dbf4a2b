"""MoE routing ops (pallas_kernels.moe, impl="xla"): sort / permute / grouped matmul, capacity
positions / dispatch / combine and their custom VJPs, against numpy loops and autodiff. The MoEFFN
layer built on them is tests/test_moe.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from pallas_kernels import moe as ops


def _rng(seed):
    return np.random.default_rng(seed)


def _topk_ids(rng, t, k, e):
    """Distinct experts per token, like top_k."""
    return np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32)


# ================================================================================== dropless ops
def test_sort_by_expert_stable_with_empty_experts_and_no_expert_ids():
    ids = np.array([[3, 0], [0, 3], [5, 0], [3, 5]], np.int32)  # E = 5 -> id 5 is "no expert"
    order, sizes = ops.sort_by_expert(jnp.asarray(ids), 5)
    np.testing.assert_array_equal(order, np.argsort(ids.reshape(-1), kind="stable"))
    np.testing.assert_array_equal(sizes, [3, 0, 0, 3, 0])
    assert order.dtype == jnp.int32 and sizes.dtype == jnp.int32


def test_permute_unpermute_vs_numpy_and_round_trip():
    rng = _rng(0)
    t, k, e, d = 11, 3, 5, 7
    ids = _topk_ids(rng, t, k, e)
    x = rng.standard_normal((t, d)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)
    order, _ = ops.sort_by_expert(jnp.asarray(ids), e)
    xs = ops.permute(jnp.asarray(x), order, k)
    flat = ids.reshape(-1)
    want_xs = np.stack([x[i // k] for i in np.argsort(flat, kind="stable")])
    np.testing.assert_array_equal(xs, want_xs)
    # Each sorted row is tagged with the expert it went to, then combined by hand.
    ys = np.asarray(xs) * (1.0 + np.sort(flat))[:, None]
    out = ops.unpermute(jnp.asarray(ys), order, jnp.asarray(w))
    want = np.zeros((t, d), np.float32)
    for tok in range(t):
        for j in range(k):
            want[tok] += w[tok, j] * x[tok] * (1.0 + ids[tok, j])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    # Gates that sum to 1 make unpermute(permute(x)) the identity.
    w1 = w / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(ops.unpermute(xs, order, jnp.asarray(w1)), x, rtol=1e-5, atol=1e-6)
    assert out.dtype == jnp.float32
    assert ops.unpermute(xs.astype(jnp.bfloat16), order, jnp.asarray(w)).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "sizes,m",
    [
        ([3, 0, 5, 1], 9),  # an empty expert
        ([0, 0, 7, 0], 7),  # one expert takes everything
        ([2, 1, 0, 3], 10),  # trailing rows beyond sum(sizes) are zero
        ([0, 0, 0, 0], 4),  # nothing routed
    ],
)
def test_grouped_matmul_vs_numpy(sizes, m):
    rng = _rng(sum(sizes) + m)
    e, kd, n = len(sizes), 6, 5
    lhs = rng.standard_normal((m, kd)).astype(np.float32)
    rhs = rng.standard_normal((e, kd, n)).astype(np.float32)
    out = ops.grouped_matmul(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32))
    want = np.zeros((m, n), np.float32)
    start = 0
    for g, s in enumerate(sizes):
        want[start : start + s] = lhs[start : start + s] @ rhs[g]
        start += s
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


# ================================================================================== capacity ops
def _np_positions(ids, e):
    """Token-order priority by a plain loop: token by token, each token's choices in order."""
    g, s, k = ids.shape
    pos = np.full(ids.shape, -1, np.int32)
    for gi in range(g):
        count = np.zeros(e, np.int32)
        for t in range(s):
            for j in range(k):
                ex = ids[gi, t, j]
                if 0 <= ex < e:
                    pos[gi, t, j] = count[ex]
                    count[ex] += 1
    return pos


def test_capacity_positions_hand_made_priority():
    ids = np.array([[[0, 1], [0, 2], [1, 0], [0, 1], [3, 0]]], np.int32)  # E = 3; 3 = no expert
    want = np.array([[[0, 0], [1, 0], [1, 2], [3, 2], [-1, 4]]], np.int32)
    np.testing.assert_array_equal(ops.capacity_positions(jnp.asarray(ids), 3), want)
    # With capacity 2 the dropped choices are (t2, second), (t3, both), (t4, second): tokens claim
    # slots in order, so the earliest tokens keep theirs.
    kept = (want >= 0) & (want < 2)
    np.testing.assert_array_equal(
        kept[0], [[True, True], [True, True], [True, False], [False, False], [False, False]]
    )


def test_capacity_positions_random_vs_loop():
    rng = _rng(1)
    g, s, k, e = 3, 13, 2, 4
    ids = np.stack([_topk_ids(rng, s, k, e) for _ in range(g)])
    ids[1, 5] = e  # a padding token
    got = ops.capacity_positions(jnp.asarray(ids), e)
    np.testing.assert_array_equal(got, _np_positions(ids, e))


def test_capacity_dispatch_combine_vs_loop():
    rng = _rng(2)
    g, s, k, e, d, cap = 2, 9, 2, 3, 5, 4
    ids = np.stack([_topk_ids(rng, s, k, e) for _ in range(g)])
    ids[0, 2] = e
    pos = _np_positions(ids, e)
    x = rng.standard_normal((g, s, d)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (g, s, k)).astype(np.float32)
    buf = ops.capacity_dispatch(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(pos), cap, e)
    want_buf = np.zeros((e, g, cap, d), np.float32)  # expert-major
    for gi in range(g):
        for t in range(s):
            for j in range(k):
                if 0 <= pos[gi, t, j] < cap:
                    want_buf[ids[gi, t, j], gi, pos[gi, t, j]] = x[gi, t]
    np.testing.assert_array_equal(buf, want_buf)
    assert ((pos >= cap).any()) and ((pos >= 0) & (pos < cap)).any()  # both kinds present

    y = rng.standard_normal((e, g, cap, d)).astype(np.float32)
    out = ops.capacity_combine(jnp.asarray(y), jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(w), cap)
    want = np.zeros((g, s, d), np.float32)
    for gi in range(g):
        for t in range(s):
            for j in range(k):
                if 0 <= pos[gi, t, j] < cap:
                    want[gi, t] += w[gi, t, j] * y[ids[gi, t, j], gi, pos[gi, t, j]]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_ops_gradients_match_finite_differences():
    rng = _rng(3)
    t, k, e, d, f = 6, 2, 3, 4, 5
    ids = jnp.asarray(_topk_ids(rng, t, k, e))
    order, sizes = ops.sort_by_expert(ids, e)
    x = jnp.asarray(rng.standard_normal((t, d)))
    w = jnp.asarray(rng.uniform(0.1, 1.0, (t, k)))
    rhs = jnp.asarray(rng.standard_normal((e, d, f)))
    proj = jnp.asarray(rng.standard_normal((f, d)))
    ids3, pos = ids[None], ops.capacity_positions(ids[None], e)

    def chain(a, r, g):  # every data-moving op, both paths, in one function
        y = ops.unpermute(ops.grouped_matmul(ops.permute(a, order, k), r, sizes) @ proj, order, g)
        return ops.capacity_combine(
            ops.capacity_dispatch(y[None], ids3, pos, 3, e), ids3, pos, g[None] * 2.0, 3
        )

    check_grads(jax.jit(chain), (x, rhs, w), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_unknown_impl_raises():
    x = jnp.ones((2, 3))
    ids = jnp.zeros((2, 1), jnp.int32)
    order, sizes = ops.sort_by_expert(ids, 2)
    with pytest.raises(ValueError, match="permute"):
        ops.permute(x, order, 1, impl="nope")
    with pytest.raises(ValueError, match="grouped_matmul"):
        ops.grouped_matmul(x, jnp.ones((2, 3, 4)), sizes, impl="nope")
    with pytest.raises(ValueError, match="unpermute"):
        ops.unpermute(x, order, jnp.ones((2, 1)), impl="nope")
    pos = ops.capacity_positions(ids[None], 2)
    with pytest.raises(ValueError, match="capacity_dispatch"):
        ops.capacity_dispatch(x[None], ids[None], pos, 2, 2, impl="nope")
    with pytest.raises(ValueError, match="capacity_combine"):
        ops.capacity_combine(jnp.ones((1, 2, 2, 3)), ids[None], pos, jnp.ones((1, 2, 1)), 2, impl="nope")


# ============================================================================ capacity custom VJPs
def _scatter_dispatch(x, ids, pos, cap, e):
    """The textbook formulation (row scatter), differentiated by autodiff: the VJP's ground truth."""
    g, s, k = ids.shape
    kept = (pos >= 0) & (pos < cap) & (ids >= 0) & (ids < e)
    e_idx, c_idx = jnp.where(kept, ids, e), jnp.where(kept, pos, cap)
    g_idx = jnp.broadcast_to(jnp.arange(g)[:, None, None], (g, s, k))
    upd = jnp.broadcast_to(x[:, :, None, :], (g, s, k, x.shape[-1]))
    buf = jnp.zeros((e, g, cap, x.shape[-1]), x.dtype)
    return buf.at[e_idx, g_idx, c_idx].add(upd, mode="drop")


def _autodiff_combine(y, ids, pos, w, cap):
    e, g = y.shape[:2]
    kept = (pos >= 0) & (pos < cap) & (ids >= 0) & (ids < e)
    rows = y[jnp.clip(ids, 0, e - 1), jnp.arange(g)[:, None, None], jnp.clip(pos, 0, cap - 1)]
    wk = jnp.where(kept, w.astype(jnp.float32), 0.0)
    return jnp.einsum("gskd,gsk->gsd", rows.astype(jnp.float32), wk).astype(y.dtype)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("cap", [2, 4, 7])
def test_capacity_custom_vjps_match_autodiff(dtype, tol, cap):
    """Dispatch and combine (gathers both ways) against autodiff of scatter-based versions:
    outputs, input and gate gradients, with dropped choices (small cap), unused slots (large cap)
    and "no expert" ids present."""
    rng = _rng(7)
    g, s, k, e, d = 3, 11, 2, 4, 6
    ids = np.stack([_topk_ids(rng, s, k, e) for _ in range(g)])
    ids[1, 4] = e  # a padding token
    ids, pos = jnp.asarray(ids), ops.capacity_positions(jnp.asarray(ids), e)
    x = jnp.asarray(rng.standard_normal((g, s, d)), dtype)
    w = jnp.asarray(rng.uniform(0.1, 1.0, (g, s, k)), dtype)
    proj = jnp.asarray(rng.standard_normal((e, d, d)), dtype)  # so the slots' values differ

    def loss(dispatch, combine, x, w):
        buf = dispatch(x, ids, pos, cap, e)
        out = combine(jnp.einsum("egcd,edf->egcf", buf, proj), ids, pos, w, cap)
        return jnp.sum(jnp.sin(out.astype(jnp.float32))), (buf, out)

    got = jax.value_and_grad(
        functools.partial(loss, ops.capacity_dispatch, ops.capacity_combine), argnums=(0, 1), has_aux=True
    )(x, w)
    want = jax.value_and_grad(
        functools.partial(loss, _scatter_dispatch, _autodiff_combine), argnums=(0, 1), has_aux=True
    )(x, w)
    (_, (buf, out)), (gx, gw) = got
    (_, (buf_w, out_w)), (gx_w, gw_w) = want
    np.testing.assert_array_equal(np.asarray(buf, np.float32), np.asarray(buf_w, np.float32))
    for a, b in ((out, out_w), (gx, gx_w), (gw, gw_w)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)
    assert float(jnp.max(jnp.abs(gx.astype(jnp.float32)))) > 0  # non-trivial gradients
    kept = (pos >= 0) & (pos < cap) & (ids < e)
    assert bool(jnp.all(jnp.where(kept, True, gw == 0)))  # dropped choices get no gate gradient
    if cap == 2:
        assert bool((~kept & (ids < e)).any())  # drops are exercised
