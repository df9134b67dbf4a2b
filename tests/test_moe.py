"""The MoEFFN layer (turbos_jax/layers/moe.py) against numpy loops: routing, dropless (sorted and
slotted) and capacity modes, auxiliary losses, padding, gradients. Its routing ops are
tests/test_moe_ops.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.tiny
from pallas_kernels import moe as ops
from turbos_jax.config import ConfigError, ModelConfig
from turbos_jax.layers.moe import AUX_KEYS, MoEFFN


def _rng(seed):
    return np.random.default_rng(seed)


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
