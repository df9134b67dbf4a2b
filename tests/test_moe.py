"""MoE routing ops (pallas_kernels.moe) and the MoEFFN layer against numpy loops."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import configs.tiny
from pallas_kernels import moe as ops
from turbos_jax.config import ConfigError, ModelConfig
from turbos_jax.layers.moe import AUX_KEYS, MoEFFN


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


# ========================================================================================= layer
def _cfg(**kw):
    cfg = ModelConfig.from_config(configs.tiny.get_config().model)
    return dataclasses.replace(cfg, **{"capacity_factor": 0.0, "dtype": jnp.float32, **kw})


def _np_params(m):
    names = ["router", "wi_gate", "wi_up", "wo"]
    if m.cfg.num_shared_experts:
        names += ["shared_gate", "shared_up", "shared_down"]
    return {n: np.asarray(getattr(m, n)[...], np.float64) for n in names}


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _np_moe(m, x, valid=None, capacity=None):
    """Per-token loop: top-k renormalised gates, token-order capacity drops, shared expert.

    Returns (y, kept[B, L, K], aux) in float64.
    """
    cfg, p = m.cfg, _np_params(m)
    b, l, _ = x.shape
    e, k = cfg.num_experts, cfg.top_k
    x = np.asarray(x, np.float64)
    valid = np.ones((b, l), bool) if valid is None else np.asarray(valid)
    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    gates = np.take_along_axis(probs, ids, -1)
    gates /= gates.sum(-1, keepdims=True)
    kept = np.zeros((b, l, k), bool)
    for bi in range(b):
        count = np.zeros(e, int)
        for t in range(l):
            for j in range(k):
                if valid[bi, t]:
                    kept[bi, t, j] = capacity is None or count[ids[bi, t, j]] < capacity
                    count[ids[bi, t, j]] += 1
    y = np.zeros_like(x)
    for bi in range(b):
        for t in range(l):
            xt = x[bi, t]
            if cfg.num_shared_experts:
                h = _silu(xt @ p["shared_gate"]) * (xt @ p["shared_up"])
                y[bi, t] += h @ p["shared_down"]
            for j in range(k):
                if kept[bi, t, j]:
                    ex = ids[bi, t, j]
                    h = _silu(xt @ p["wi_gate"][ex]) * (xt @ p["wi_up"][ex])
                    y[bi, t] += gates[bi, t, j] * (h @ p["wo"][ex])
    n = valid.sum()
    load = np.zeros(e)
    for bi, t in zip(*np.nonzero(valid), strict=True):
        for j in range(k):
            load[ids[bi, t, j]] += 1.0 / (n * k)
    mean_p = probs[valid].mean(0)
    lse = np.log(np.exp(logits).sum(-1))
    aux = {
        "moe_lb_loss": e * np.sum(load * mean_p),
        "moe_z_loss": np.mean(lse[valid] ** 2),
        "moe_dropped_fraction": (valid[..., None] & ~kept).sum() / (n * k),
        "moe_expert_load": load,
    }
    return y, kept, aux


@nnx.jit
def _apply(m, x, valid=None):
    return m(x, valid)


def _x(shape, seed=0, scale=1.0):
    return jnp.asarray(_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _sharpen_router(m, scale=40.0):
    # The init_std router is almost uniform; a sharper one makes the routing (and drops) decisive.
    m.router[...] = m.router[...] * scale


def _assert_aux(aux, want, atol=1e-5):
    assert set(aux) == set(AUX_KEYS)
    for key in AUX_KEYS:
        assert aux[key].dtype == jnp.float32
        np.testing.assert_allclose(aux[key], want[key], rtol=1e-4, atol=atol, err_msg=key)


def test_param_shapes_and_logical_names():
    from turbos_jax.sharding import logical_names

    cfg = _cfg()
    m = MoEFFN(cfg, rngs=nnx.Rngs(0))
    d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_dim
    want = {
        "router": ((d, e), ("embed", None)),
        "wi_gate": ((e, d, f), ("expert", "embed", "mlp")),
        "wi_up": ((e, d, f), ("expert", "embed", "mlp")),
        "wo": ((e, f, d), ("expert", "mlp", "embed")),
        "shared_gate": ((d, f), ("embed", "mlp")),
        "shared_up": ((d, f), ("embed", "mlp")),
        "shared_down": ((f, d), ("mlp", "embed")),
    }
    for name, (shape, names) in want.items():
        v = getattr(m, name)
        assert v[...].shape == shape and v[...].dtype == jnp.float32, name
        assert logical_names(v) == names, name
    assert not hasattr(MoEFFN(_cfg(num_shared_experts=0), rngs=nnx.Rngs(0)), "shared_gate")


def test_dropless_matches_per_token_loop():
    m = MoEFFN(_cfg(), rngs=nnx.Rngs(0))
    _sharpen_router(m, 10.0)
    x = _x((2, 8, m.cfg.d_model))
    y, aux = _apply(m, x)
    want, _, want_aux = _np_moe(m, x)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    _assert_aux(aux, want_aux)
    assert float(aux["moe_dropped_fraction"]) == 0.0


def _skewed_moe(skew):
    """A layer and input whose routing sends every token to expert 0 when `skew` (one of its two
    choices), else a sharp but spread routing; the last 3 tokens of row 1 are padding."""
    m = MoEFFN(_cfg(), rngs=nnx.Rngs(0))
    _sharpen_router(m, 10.0)
    x = _x((2, 16, m.cfg.d_model), seed=4)
    if skew:  # a shared offset in x that only expert 0's router column sees
        x = x + 2.0
        m.router[...] = m.router[...].at[:, 0].add(1.0)
    valid = jnp.ones((2, 16), bool).at[1, -3:].set(False)
    return m, x, valid


def _loss_and_grads(m, x, valid):
    def loss(mod, a):
        y, aux = mod(a, valid)
        return jnp.sum(jnp.sin(y)) + aux["moe_lb_loss"]

    return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(m, x)


@pytest.mark.parametrize("skew", [False, True], ids=["spread", "skewed"])
def test_slotted_dropless_equals_sorted_path(monkeypatch, skew):
    """`_dropless_slotted` (capacity buffers; CPU with few tokens) against the sorted path
    (permute, tiled grouped matmuls, unpermute): outputs and gradients. Skewed routing overfills
    the smallest slot count, so a larger one must be chosen; the negative control keeps the
    smallest (and so drops choices)."""
    import turbos_jax.layers.moe as moe_mod

    m, x, valid = _skewed_moe(skew)
    ids = nnx.jit(lambda mod, a: mod.route(a, valid)[0])(m, x)
    busiest = int(np.bincount(np.asarray(ids).ravel(), minlength=9)[:8].max())
    assert (busiest > moe_mod.slot_buckets(2 * 16 * 2, 8)[0]) == skew, busiest

    calls = []
    monkeypatch.setattr(MoEFFN, "_dropless_slotted", _spy(MoEFFN._dropless_slotted, calls))
    slotted = _loss_and_grads(m, x, valid)
    assert calls, "the slotted path did not run"
    monkeypatch.setattr(moe_mod, "SLOTTED_MAX_CHOICES", 0)
    sorted_ = _loss_and_grads(m, x, valid)
    assert len(calls) == 1, "the sorted path ran the slotted one"
    for got, want in zip(jax.tree.leaves(slotted), jax.tree.leaves(sorted_), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)

    # Negative control: with the smallest slot count always, the skewed routing drops choices.
    monkeypatch.setattr(moe_mod, "SLOTTED_MAX_CHOICES", 10**9)
    monkeypatch.setattr(jax.lax, "switch", lambda index, branches, *a: branches[0](*a))
    y_smallest = nnx.jit(lambda mod, a: mod(a, valid)[0])(m, x)
    monkeypatch.setattr(moe_mod, "SLOTTED_MAX_CHOICES", 0)
    y_want = nnx.jit(lambda mod, a: mod(a, valid)[0])(m, x)
    assert np.allclose(y_smallest, y_want, rtol=2e-5, atol=2e-6) == (not skew)


@pytest.mark.parametrize("choices,experts", [(2, 8), (32, 8), (128, 8), (1024, 8), (64, 2), (100, 3)])
def test_slot_buckets_cover_every_load(choices, experts):
    from turbos_jax.layers.moe import slot_buckets

    buckets = slot_buckets(choices, experts)
    assert list(buckets) == sorted(set(buckets)) and all(c % 8 == 0 for c in buckets)
    assert buckets[0] >= 1.5 * choices / experts  # a balanced router fits the first
    assert buckets[-1] >= choices > (buckets[-2] if len(buckets) > 1 else 0)  # all in one expert


def _spy(fn, calls):
    def wrapped(*args, **kw):
        calls.append(1)
        return fn(*args, **kw)

    return wrapped


def test_capacity_with_huge_factor_equals_dropless():
    x = _x((2, 8, 64), seed=1)
    a = MoEFFN(_cfg(), rngs=nnx.Rngs(3))
    b = MoEFFN(_cfg(capacity_factor=100.0), rngs=nnx.Rngs(3))
    for m in (a, b):
        _sharpen_router(m)
    (ya, auxa), (yb, auxb) = _apply(a, x), _apply(b, x)
    np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-6)
    _assert_aux(auxb, {key: np.asarray(v) for key, v in auxa.items()})


def test_small_capacity_drops_exactly_the_low_priority_choices():
    cfg = _cfg(capacity_factor=0.5)
    b, l = 2, 16
    cap = cfg.capacity(l)  # ceil(0.5 * 16 * 2 / 8) = 2 slots for 32 choices over 8 experts
    assert cap == 2
    m = MoEFFN(cfg, rngs=nnx.Rngs(1))
    _sharpen_router(m)
    x = _x((b, l, cfg.d_model), seed=2)
    y, aux = _apply(m, x)
    want, kept, want_aux = _np_moe(m, x, capacity=cap)
    assert 0 < (~kept).sum() < kept.size
    pos = nnx.jit(
        lambda mod, a: ops.capacity_positions(mod.route(a, jnp.ones((b, l), bool))[0], cfg.num_experts)
    )(m, x)
    np.testing.assert_array_equal((np.asarray(pos) < cap), kept)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    _assert_aux(aux, want_aux)
    np.testing.assert_allclose(aux["moe_dropped_fraction"], (~kept).mean(), rtol=1e-6)


def test_capacity_group_of_whole_sequence_equals_group_0():
    x = _x((2, 16, 64), seed=4)
    whole, group0 = (MoEFFN(_cfg(capacity_factor=0.5, capacity_group=n), rngs=nnx.Rngs(2)) for n in (16, 0))
    for m in (whole, group0):
        _sharpen_router(m)
    (y, aux), (want, want_aux) = _apply(whole, x), _apply(group0, x)
    assert float(want_aux["moe_dropped_fraction"]) > 0
    np.testing.assert_array_equal(y, want)
    for key in AUX_KEYS:
        np.testing.assert_array_equal(aux[key], want_aux[key])


def test_capacity_groups_equal_slices_run_as_sequences():
    """Groups of 8 tokens in 16-token rows route like 8-token sequences: same slots, same drops
    (capacity 0.5 * 8 * 2 / 8 = 1 slot per expert and group). Negative controls: whole-row groups
    and 4-token groups drop other choices."""
    b, l, n, d = 2, 16, 8, 64
    x = _x((b, l, d), seed=5)
    layers = {g: MoEFFN(_cfg(capacity_factor=0.5, capacity_group=g), rngs=nnx.Rngs(6)) for g in (n, 0, 4)}
    for m in layers.values():
        _sharpen_router(m)
    y, aux = _apply(layers[n], x)
    want, want_aux = _apply(layers[0], x.reshape(b * l // n, n, d))  # each slice its own sequence
    assert 0 < float(want_aux["moe_dropped_fraction"]) < 1
    np.testing.assert_allclose(y, want.reshape(b, l, d), rtol=1e-6, atol=1e-6)
    _assert_aux(aux, {key: np.asarray(v) for key, v in want_aux.items()})
    for wrong in (0, 4):
        other, other_aux = _apply(layers[wrong], x)
        assert float(other_aux["moe_dropped_fraction"]) != float(aux["moe_dropped_fraction"])
        assert not np.allclose(other, y, rtol=1e-3, atol=1e-3)


def test_capacity_group_must_divide_the_sequence():
    m = MoEFFN(_cfg(capacity_factor=0.5, capacity_group=6), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity_group 6 must divide the sequence length 16"):
        _apply(m, _x((1, 16, 64)))
    model = configs.tiny.get_config().model
    model.capacity_group = -1
    with pytest.raises(ConfigError, match=r"^config\.model\.capacity_group=-1: must be an integer >= 0"):
        ModelConfig.from_config(model)


def test_aux_losses_on_hand_computed_case():
    cfg = _cfg(num_shared_experts=0)  # E = 8, k = 2
    e, d = cfg.num_experts, cfg.d_model
    m = MoEFFN(cfg, rngs=nnx.Rngs(0))
    # Router = [I_8; 0], so the logits are the first 8 features; the rest are random and ignored.
    m.router[...] = jnp.eye(d, e)
    lg = np.array(
        [
            [2.0, 1.0, 0.0, -1.0, -2.0, -1.5, -0.5, 0.5],  # top-2 {0, 1}
            [0.0, 3.0, 1.0, 0.0, -1.0, 0.2, -0.3, 0.1],  # top-2 {1, 2}
            [-1.0, 0.0, 1.0, 2.0, 0.3, -0.2, 0.4, 0.6],  # top-2 {3, 2}
        ]
    )
    x = np.concatenate([lg, _rng(11).standard_normal((3, d - e))], axis=1)[None]
    x = jnp.asarray(x, jnp.float32)
    # 6 assignments: e0 1, e1 2, e2 2, e3 1, e4..e7 0.
    f = np.array([1, 2, 2, 1, 0, 0, 0, 0]) / 6.0
    probs = np.exp(lg) / np.exp(lg).sum(-1, keepdims=True)
    lb = e * np.sum(f * probs.mean(0))
    z = np.mean(np.log(np.exp(lg).sum(-1)) ** 2)
    want = {"moe_lb_loss": lb, "moe_z_loss": z, "moe_dropped_fraction": 0.0, "moe_expert_load": f}
    _, aux = _apply(m, x)
    _assert_aux(aux, want)
    # Capacity 1 per expert (ceil(2/3 * 3 * 2 / 8) = 1), claimed in token order: t0 takes e0, e1;
    # t1 finds e1 full (dropped), takes e2; t2 takes e3, finds e2 full (dropped): 2 of 6 dropped.
    # f_e counts before dropping.
    mm = MoEFFN(dataclasses.replace(cfg, capacity_factor=2 / 3), rngs=nnx.Rngs(0))
    mm.router[...] = m.router[...]
    assert mm.cfg.capacity(3) == 1
    _, aux = _apply(mm, x)
    _assert_aux(aux, {**want, "moe_dropped_fraction": 2 / 6})


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_padding_excluded_from_capacity_and_aux(factor):
    cfg = _cfg(capacity_factor=factor, num_shared_experts=0)
    b, l = 2, 16
    m = MoEFFN(cfg, rngs=nnx.Rngs(4))
    _sharpen_router(m)
    valid = np.ones((b, l), bool)
    valid[0, 3:9] = False
    valid[1, :5] = False
    x = _x((b, l, cfg.d_model), seed=5)
    x_other = jnp.where(jnp.asarray(valid)[..., None], x, _x(x.shape, seed=6, scale=30.0))
    cap = cfg.capacity(l) if factor else None
    y, aux = _apply(m, x, jnp.asarray(valid))
    y2, aux2 = _apply(m, x_other, jnp.asarray(valid))
    want, kept, want_aux = _np_moe(m, x, valid, capacity=cap)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    _assert_aux(aux, want_aux)
    # Padding content changes nothing: it takes no slot and counts in no statistic.
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-6)
    _assert_aux(aux2, {key: np.asarray(v) for key, v in aux.items()})
    np.testing.assert_array_equal(np.asarray(y)[~valid], 0.0)  # routed output of padding is 0
    if factor:
        assert (~kept[valid]).any()  # capacity really binds, so a padding claim would show


@pytest.mark.parametrize("factor", [0.0, 1.0])
def test_gradients_reach_router_and_experts(factor):
    m = MoEFFN(_cfg(capacity_factor=factor), rngs=nnx.Rngs(0))
    x = _x((2, 8, 64), seed=7)

    def loss(mod):
        y, aux = mod(x)
        return jnp.mean(y**2) + 0.01 * aux["moe_lb_loss"] + 1e-3 * aux["moe_z_loss"]

    grads = nnx.jit(nnx.grad(loss))(m)
    for name in ("router", "wi_gate", "wi_up", "wo", "shared_gate", "shared_up", "shared_down"):
        g = np.asarray(grads[name][...])
        assert np.isfinite(g).all() and np.abs(g).max() > 0, name


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_jit_matches_eager(factor):
    m = MoEFFN(_cfg(capacity_factor=factor), rngs=nnx.Rngs(2))
    _sharpen_router(m)
    x = _x((2, 8, 64), seed=8)
    valid = jnp.asarray(_rng(9).uniform(size=(2, 8)) > 0.2)
    y, aux = m(x, valid)
    yj, auxj = nnx.jit(lambda mod, a, v: mod(a, v))(m, x, valid)
    np.testing.assert_allclose(yj, y, rtol=1e-5, atol=1e-6)
    _assert_aux(auxj, {key: np.asarray(v) for key, v in aux.items()})


def test_bfloat16_compute_keeps_fp32_params_and_aux():
    m = MoEFFN(_cfg(dtype=jnp.bfloat16, capacity_factor=1.5), rngs=nnx.Rngs(0))
    y, aux = _apply(m, _x((2, 8, 64), seed=10).astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y, np.float32)).all()
    assert m.wi_gate[...].dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in aux.values())


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
