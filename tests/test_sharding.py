"""Multi-device sharding on the 8 fake CPU devices: mesh config checks, equivalence of loss and
gradients across meshes, the specified parameter / optimizer-state shardings, and the expert-parallel
(all-to-all) MoE path against the single-device one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, training_batch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny, turbos
from turbos_jax import optim, sharding
from turbos_jax.config import ConfigError, ModelConfig
from turbos_jax.layers.moe import MoEFFN
from turbos_jax.model import TurbosModel
from turbos_jax.train import loss_fn


def _mesh(data, expert, model):
    return sharding.make_mesh(
        {"data": data, "expert": expert, "model": model, "context": 1},
        devices=jax.devices()[: data * expert * model],
    )


def _allclose(a, b, tol=5e-5):
    """Every leaf within `tol` of its max |ref|: measured <= 6.5e-6 for the gradients over the 4
    meshes, <= 6e-7 for the MoE layer's outputs, aux and gradients (reductions in another order)."""
    jax.tree.map(lambda x, y: assert_close(x, y, tol), a, b)


# ------------------------------------------------------------------------------------ mesh config
def test_make_mesh_fills_minus_one_and_orders_axes():
    mesh = sharding.make_mesh({"data": -1, "expert": 2, "model": 2, "context": 1})
    assert mesh.axis_names == ("data", "expert", "model", "context")
    assert dict(mesh.shape) == {"data": 2, "expert": 2, "model": 2, "context": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    mesh = sharding.make_mesh(tiny.get_config().mesh, devices=jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "expert": 1, "model": 1, "context": 1}


@pytest.mark.parametrize(
    "mesh_cfg, match",
    [
        (
            {"data": 2, "expert": 2, "model": 1, "context": 1},
            r"^config\.mesh\.data=2: mesh .* = 4 "
            r"devices, but 8 are present",
        ),
        ({"data": -1, "expert": -1, "model": 1, "context": 1}, r"^config\.mesh\.expert=-1: at most one"),
        (
            {"data": -1, "expert": 0, "model": 1, "context": 1},
            r"^config\.mesh\.expert=0: must be a "
            "positive integer",
        ),
        ({"data": -1, "expert": 3, "model": 1, "context": 1}, r"^config\.mesh\.data=-1: the other axes"),
        ({"data": -1, "expert": 1, "model": 1, "context": 3}, r"^config\.mesh\.data=-1: the other axes"),
        ({"data": -1, "expert": 1, "model": 1}, r"^config\.mesh\.context: required key is missing"),
        ({"data": -1, "expert": 1, "model": 1, "context": 1, "seq": 1}, r"^config\.mesh\.seq: unknown"),
    ],
)
def test_mesh_config_errors_name_the_key(mesh_cfg, match):
    with pytest.raises(ConfigError, match=match):
        sharding.make_mesh(mesh_cfg)


@pytest.mark.parametrize(
    "sizes, batch, match",
    [
        ((2, 1, 4), 8, r"^config\.model\.num_kv_heads=2: must be divisible by config\.mesh\.model=4$"),
        ((2, 4, 1), 4, r"^config\.batch_size=4: must be divisible by mesh data x expert = 2 x 4 = 8$"),
        ((1, 8, 1), 8, None),
    ],
)
def test_mesh_checked_against_model_and_batch(sizes, batch, match):
    cfg = ModelConfig.from_config(tiny.get_config().model)
    mesh_cfg = dict(zip(("data", "expert", "model"), sizes, strict=True), context=1)
    if match is not None:
        with pytest.raises(ConfigError, match=match):
            sharding.make_mesh(mesh_cfg, model_cfg=cfg, batch_size=batch)
        return
    sharding.make_mesh(mesh_cfg, model_cfg=cfg, batch_size=batch)
    with pytest.raises(
        ConfigError,
        match=r"^config\.model\.num_experts=4: must be divisible "
        r"by config\.mesh\.expert=8$",
    ):
        sharding.make_mesh(mesh_cfg, model_cfg=dataclasses.replace(cfg, num_experts=4), batch_size=batch)


def test_shipped_turbos_mesh_fits_the_model():
    config = turbos.get_config()
    shape = sharding.mesh_shape(config.mesh, 512)
    assert shape == {"data": 8, "expert": 8, "model": 8, "context": 1}
    sharding.check_mesh(shape, ModelConfig.from_config(config.model), config.batch_size)


# ------------------------------------------------------------------------------------ whole model
# 4 KV heads and 4 Mamba2 groups so that model=4 meshes divide them (tiny has 2 of each).
# (8, 1, 1) and (2, 1, 4) add no new code path to (2, 2, 2) / (1, 4, 2): slow-marked.
MESHES = [
    pytest.param((8, 1, 1), marks=pytest.mark.slow),
    (2, 2, 2),
    (1, 4, 2),
    pytest.param((2, 1, 4), marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def model_setup():
    cfg = ModelConfig.from_config(tiny.get_config().model)
    cfg = dataclasses.replace(cfg, num_kv_heads=4, mamba_groups=4, layout="AFMF" * 2, capacity_factor=1.0)
    model = TurbosModel(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (8, 33)).astype(np.int32)
    seg = np.ones((8, 32), np.int32)
    seg[1, 20:] = 2  # two documents in row 1
    seg[3, 28:] = 0  # padding at the end of row 3
    batch = training_batch(tokens, seg)
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, graphdef, b), has_aux=True)
    (loss, (ce, aux)), grads = jax.jit(grad_fn)(params, batch)
    return cfg, graphdef, params, batch, grad_fn, (loss, grads)


def _sharded_loss_and_grads(model_setup, sizes):
    cfg, graphdef, params, batch, grad_fn, _ = model_setup
    mesh = _mesh(*sizes)
    sharding.check_mesh(mesh.shape, cfg, batch["inputs"].shape[0])
    shardings = sharding.named_shardings(params, mesh)
    batch_sh = NamedSharding(mesh, P(("data", "expert")))
    with jax.set_mesh(mesh):
        p = jax.device_put(params, shardings)
        b = jax.device_put(batch, batch_sh)
        (loss, _), grads = jax.jit(grad_fn, out_shardings=(None, shardings))(p, b)
    return mesh, loss, grads


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_grads_match_single_device(model_setup, sizes):
    ref_loss, ref_grads = model_setup[-1]
    mesh, loss, grads = _sharded_loss_and_grads(model_setup, sizes)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)  # measured <= 1.7e-7
    _allclose(grads, ref_grads)
    wi = grads["period"][1]["layer"]["wi_gate"]
    assert wi.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "expert", "data", "model")), wi.ndim)


def test_param_and_optimizer_shardings_on_2x2x2():
    cfg = dataclasses.replace(ModelConfig.from_config(tiny.get_config().model), layout="AFMF")
    mesh = _mesh(2, 2, 2)
    tx = optim.make_optimizer(tiny.get_config().optim)

    def init():
        params = nnx.split(TurbosModel(cfg, rngs=nnx.Rngs(0)))[1]
        return {"params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init)
    shardings = sharding.named_shardings(abstract, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    moe = state["params"]["period"][1]["layer"]
    expected = {
        "wi_gate": P(None, "expert", "data", "model"),
        "wo": P(None, "expert", "model", "data"),
        "router": P(None, "data", None),
    }
    for name, spec in expected.items():
        arr = moe[name][...]
        assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), name
    attn = state["params"]["period"][0]["layer"]
    # d_model is FSDP-sharded over data x context (context has size 1 on this mesh).
    assert attn["k_proj"][...].sharding.spec == P(None, ("data", "context"), "model", None)
    assert state["params"]["embed"]["embedding"][...].sharding.spec == P("model", ("data", "context"))
    # Adam moments are sharded like their parameters (ZeRO): find mu / nu for wi_gate.
    moments = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
        if "wi_gate" in jax.tree_util.keystr(path)
    ]
    assert len(moments) >= 2
    for m in moments:
        assert m.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "expert", "data", "model")), m.ndim)
    # Each device holds 1/8 of the expert weights.
    wi = moe["wi_gate"][...]
    assert wi.addressable_shards[0].data.size * 8 == wi.size


# ------------------------------------------------------------------------------------ expert parallel
def _moe_setup(capacity_factor):
    cfg = ModelConfig.from_config(tiny.get_config().model)
    cfg = dataclasses.replace(cfg, capacity_factor=capacity_factor)
    layer = MoEFFN(cfg, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(layer)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 32, cfg.d_model)), jnp.float32)
    valid = np.ones((8, 32), bool)
    valid[2, 25:] = False
    cot = jnp.asarray(rng.normal(size=(8, 32, cfg.d_model)), jnp.float32)

    def f(params, x, valid):
        y, aux = nnx.merge(graphdef, params)(x, valid)
        return jnp.sum(y * cot) + aux["moe_lb_loss"], (y, aux)

    return cfg, graphdef, params, x, jnp.asarray(valid), jax.value_and_grad(f, argnums=(0, 1), has_aux=True)


@pytest.mark.parametrize("capacity_factor", [1.0, 0.5, 0.0])
@pytest.mark.parametrize(
    "sizes",
    [(2, 2, 2), (1, 4, 2), pytest.param((1, 8, 1), marks=pytest.mark.slow)],
    ids=lambda s: "x".join(map(str, s)),
)
def test_expert_parallel_matches_single_device(sizes, capacity_factor):
    cfg, graphdef, params, x, valid, vg = _moe_setup(capacity_factor)
    (ref_val, (ref_y, ref_aux)), ref_grads = jax.jit(vg)(params, x, valid)
    if 0 < capacity_factor < 1:
        assert float(ref_aux["moe_dropped_fraction"]) > 0  # the drop path is exercised
    mesh = _mesh(*sizes)
    shardings = sharding.named_shardings(params, mesh)
    tok = NamedSharding(mesh, P(("data", "expert")))
    with jax.set_mesh(mesh):
        p = jax.device_put(params, shardings)
        xs, vs = jax.device_put(x, tok), jax.device_put(valid, tok)
        jaxpr = str(jax.make_jaxpr(vg)(p, xs, vs))
        (val, (y, aux)), grads = jax.jit(vg)(p, xs, vs)
    assert "shard_map" in jaxpr
    assert ("all_to_all" if capacity_factor else "all_gather") in jaxpr
    _allclose(y, ref_y)
    _allclose(aux, ref_aux)
    _allclose(grads, ref_grads)


@pytest.mark.parametrize("capacity_factor", [1.0, 0.0])
def test_expert_parallel_none_uses_gspmd(capacity_factor):
    mode = "none"
    cfg, *_ = _moe_setup(capacity_factor)
    _, graphdef, params, x, valid, _ = _moe_setup(capacity_factor)
    graphdef, params = nnx.split(MoEFFN(dataclasses.replace(cfg, expert_parallel=mode), rngs=nnx.Rngs(1)))
    apply = lambda p: nnx.merge(graphdef, p)(x, valid)[0]
    with jax.set_mesh(_mesh(2, 2, 2)):
        y = jax.jit(apply)(params)
        jaxpr = str(jax.make_jaxpr(apply)(params))
    assert "all_to_all" not in jaxpr
    _allclose(y, apply(params))


def test_dropless_expert_parallel_compiles_for_tpu_with_ragged_all_to_all():
    """On TPU the dropless path uses the real ragged all-to-all (XLA:CPU has none, so the CPU tests
    above run its emulation): the MoE layer's forward and gradient compile for v5p:2x2x1 on
    (data 1, expert 2, model 2) with ragged-all-to-all in the program."""
    from tpu_aot import tpu_devices

    cfg, graphdef, params, x, valid, vg = _moe_setup(0.0)
    mesh = sharding.make_mesh(
        {"data": 1, "expert": 2, "model": 2, "context": 1}, devices=tpu_devices("v5p:2x2x1")
    )
    tok = NamedSharding(mesh, P(("data", "expert")))
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=tok)
    with jax.set_mesh(mesh):
        p = sharding.sharded_abstract(params, mesh)
        hlo = jax.jit(vg).lower(p, abstract(x), abstract(valid)).compile().as_text()
    assert hlo.count("ragged-all-to-all(") >= 4  # 2 forward, 2 in the backward
