"""Context parallelism on the 8 fake CPU devices: with the sequence sharded over `context`, every
layer and the whole model give the outputs, loss and gradients of the run without CP.

Sequences are 40 tokens with mamba_chunk 8, so shards of 20, 10 and 5 tokens (context 2, 4, 8) are
neither chunk multiples nor is 40 a multiple of context x chunk. Segments cover a document boundary
exactly on every shard edge (row 1, position 20), a 3-token document, documents spanning several
shards (some shards lie wholly inside one document) and a padding tail. Mamba2 layer tests use a
small |A| (0.05) so that the state carried across shard edges is O(1), not decayed below tolerance.
Negative controls (a broken halo, a dropped state correction) must fail the same comparison.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, training_batch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from turbos_jax import sharding
from turbos_jax.config import ConfigError, ModelConfig, check_train_config
from turbos_jax.layers import context_parallel
from turbos_jax.layers.attention import Attention
from turbos_jax.layers.mamba2 import Mamba2
from turbos_jax.layers.moe import MoEFFN
from turbos_jax.model import TurbosModel, segment_positions
from turbos_jax.train import loss_fn

L = 40
TOL = 5e-5  # relative to each leaf's max |ref|; measured <= 1.5e-6 (fp32, reductions reordered)


def _cfg(**kw):
    cfg = ModelConfig.from_config(tiny.get_config().model)
    return dataclasses.replace(cfg, mamba_chunk=8, **kw)


def _mesh(data, expert, model, context):
    return sharding.make_mesh(
        {"data": data, "expert": expert, "model": model, "context": context},
        devices=jax.devices()[: data * expert * model * context],
    )


def _segments(rows):
    seg = np.ones((rows, L), np.int32)
    seg[0, 10:], seg[0, 13:], seg[0, 36:] = 2, 3, 0  # a 3-token document, a padding tail
    seg[1, 20:] = 2  # boundary on every shard edge of context 2, 4, 8
    return jnp.asarray(seg)


def _max_rel_err(a, b):
    errs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))), a, b)
    return max(jax.tree.leaves(errs))


def _layer_setup(layer, rows=2, seed=0):
    """(value_and_grad of sum(y * cot) w.r.t. params and input, params, x)."""
    graphdef, params = nnx.split(layer)
    rng = np.random.default_rng(seed)
    d = layer.cfg.d_model
    x = jnp.asarray(rng.normal(size=(rows, L, d)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(rows, L, d)), jnp.float32)
    seg = _segments(rows)

    def f(params, x):
        out = nnx.merge(graphdef, params)(x, seg)
        y = out[0] if isinstance(out, tuple) else out
        return jnp.sum(y * cot), y

    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True), params, x


def _run(vg, params, x, mesh=None):
    if mesh is None:
        return jax.jit(vg)(params, x)
    with jax.set_mesh(mesh):
        tok = NamedSharding(mesh, sharding.activation_spec(("batch", "seq", None)))
        p = jax.device_put(params, sharding.named_shardings(params, mesh))
        return jax.jit(vg)(p, jax.device_put(x, tok))


# ------------------------------------------------------------------------------------------ Mamba2
def _mamba_setup(scheme, impl="xla"):
    layer = Mamba2(_cfg(mamba_cp_scheme=scheme, kernel_impl=impl), rngs=nnx.Rngs(0))
    layer.A_log[...] = jnp.full_like(layer.A_log[...], np.log(0.05))
    return _layer_setup(layer)


@pytest.mark.parametrize(
    "sizes, scheme, impl",
    [
        ((1, 1, 1, 2), "sequential", "xla"),
        ((2, 1, 1, 4), "parallel", "xla"),
        ((1, 1, 2, 4), "sequential", "xla"),
        ((1, 1, 1, 8), "parallel", "xla"),
        ((1, 1, 1, 8), "sequential", "xla"),
        ((1, 1, 1, 2), "parallel", "pallas"),  # the kernel (interpret mode) per shard, unchanged
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_mamba2_matches_without_context_parallelism(sizes, scheme, impl):
    vg, params, x = _mamba_setup(scheme, impl)
    (_, ref_y), ref_grads = _run(vg, params, x)
    (_, y), grads = _run(vg, params, x, _mesh(*sizes))
    assert_close(y, ref_y, TOL)
    jax.tree.map(lambda a, b: assert_close(a, b, TOL), grads, ref_grads)


def _zero_halo(u, n, cp):
    return jnp.zeros_like(u[:, -n:])


def _no_correction(c, incoming, cs, first):
    return jnp.zeros(c.shape[:2] + incoming.shape[1:3], jnp.float32)


@pytest.mark.parametrize(
    "name, broken", [("previous_rows", _zero_halo), ("first_segment_correction", _no_correction)]
)
def test_mamba2_negative_controls_fail(monkeypatch, name, broken):
    """The comparison above detects a conv halo of zeros and a dropped incoming-state correction
    (measured errors: ~1e-1 and ~1e-2 relative, vs <= 1.5e-6 when intact)."""
    vg, params, x = _mamba_setup("parallel")
    (_, ref_y), ref_grads = _run(vg, params, x)
    monkeypatch.setattr(context_parallel, name, broken)
    (_, y), grads = _run(vg, params, x, _mesh(1, 1, 1, 4))
    assert _max_rel_err(y, ref_y) > 100 * TOL
    assert _max_rel_err(grads, ref_grads) > 100 * TOL


# --------------------------------------------------------------------------------------- attention
def test_attention_matches_without_context_parallelism():
    """K/V gathered over `context`, queries local, RoPE positions computed on whole rows."""
    layer = Attention(_cfg(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    seg = _segments(2)
    positions = segment_positions(seg)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, L, layer.cfg.d_model)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def f(params, x):
        y = nnx.merge(graphdef, params)(x, seg, positions)
        return jnp.sum(y * cot), y

    vg = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
    (_, ref_y), ref_grads = _run(vg, params, x)
    mesh = _mesh(1, 1, 2, 4)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(vg)(params, x))
    assert "shard_map" in jaxpr
    (_, y), grads = _run(vg, params, x, mesh)
    assert_close(y, ref_y, TOL)
    jax.tree.map(lambda a, b: assert_close(a, b, TOL), grads, ref_grads)


# --------------------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize(
    "capacity_factor, mode", [(0.5, "auto"), (0.0, "auto"), (0.5, "none"), (0.0, "none")]
)
def test_moe_matches_without_context_parallelism(capacity_factor, mode):
    """Capacity slots are per whole sequence with and without CP (0.5 drops tokens, so a split of
    the groups by shard would change which); the expert-parallel dispatch keeps the sequence
    sharded (reduce-scatter of the capacity buffers over `context`)."""
    cfg = _cfg(capacity_factor=capacity_factor, expert_parallel=mode)
    vg, params, x = _layer_setup(MoEFFN(cfg, rngs=nnx.Rngs(1)), rows=2)
    (_, ref_y), ref_grads = _run(vg, params, x)
    mesh = _mesh(1, 2, 1, 4)
    if mode == "auto":
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(vg)(params, x))
        assert "shard_map" in jaxpr and "context" in jaxpr
        assert ("reduce_scatter" if capacity_factor else "all_gather") in jaxpr
    (_, y), grads = _run(vg, params, x, mesh)
    assert_close(y, ref_y, TOL)
    jax.tree.map(lambda a, b: assert_close(a, b, TOL), grads, ref_grads)


@pytest.mark.parametrize("context, group, mode", [(2, 10, "auto"), (4, 5, "none")])
def test_moe_capacity_groups_are_shard_local(context, group, mode):
    """Groups of `group` tokens tile each context shard: every shard dispatches its own groups (no
    reduce-scatter of full-sequence buffers) and the result equals the run without CP. Negative
    control: groups over the wrong span (whole sequences, or twice as long) give other drops."""
    cfg = _cfg(capacity_factor=0.5, expert_parallel=mode, capacity_group=group)
    vg, params, x = _layer_setup(MoEFFN(cfg, rngs=nnx.Rngs(1)), rows=2)
    (_, ref_y), ref_grads = _run(vg, params, x)
    mesh = _mesh(1, 2, 1, context)
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(vg)(params, x))
    assert ("shard_map" in jaxpr) == (mode == "auto") and "reduce_scatter" not in jaxpr
    (_, y), grads = _run(vg, params, x, mesh)
    assert_close(y, ref_y, TOL)
    jax.tree.map(lambda a, b: assert_close(a, b, TOL), grads, ref_grads)
    for wrong in (0, 2 * group):
        other = MoEFFN(dataclasses.replace(cfg, capacity_group=wrong), rngs=nnx.Rngs(1))
        (_, wrong_y), _ = _run(_layer_setup(other, rows=2)[0], params, x)
        with pytest.raises(AssertionError):
            assert_close(wrong_y, ref_y, TOL)


# ------------------------------------------------------------------------------------ whole model
@pytest.mark.parametrize(
    "sizes, scheme, capacity_factor, group, remat",
    [
        ((2, 1, 1, 4), "parallel", 1.0, 0, "none"),
        ((1, 2, 1, 4), "sequential", 0.0, 0, "none"),
        ((1, 2, 1, 4), "parallel", 0.5, 5, "none"),  # shard-local capacity groups
        ((1, 1, 1, 8), "parallel", 0.5, 0, "full"),  # collectives re-run in the rematerialised scan
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_model_loss_and_grads_match_without_context_parallelism(sizes, scheme, capacity_factor, group, remat):
    cfg = _cfg(
        layout="AFMF" * 2,
        mamba_cp_scheme=scheme,
        capacity_factor=capacity_factor,
        capacity_group=group,
        remat_policy=remat,
        scan_layers=remat != "none",
    )
    graphdef, params = nnx.split(TurbosModel(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    seg = np.array(_segments(4))
    seg[2:] = seg[:2, ::-1]
    batch = training_batch(rng.integers(0, cfg.vocab_size, (4, L + 1)).astype(np.int32), seg)
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, graphdef, b)[0])
    ref_loss, ref_grads = jax.jit(grad_fn)(params, batch)

    mesh = _mesh(*sizes)
    sharding.check_mesh(mesh.shape, cfg, 4, seq_len=L)
    shardings = sharding.named_shardings(params, mesh)
    assert sharding.process_batch_shard(sharding.batch_sharding(mesh), 4) == (0, 1)  # one process
    with jax.set_mesh(mesh):
        p = jax.device_put(params, shardings)
        b = jax.device_put(batch, sharding.batch_sharding(mesh))
        loss, grads = jax.jit(grad_fn, out_shardings=(None, shardings))(p, b)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    jax.tree.map(lambda a, b: assert_close(a, b, TOL), grads, ref_grads)
    # Parameters (and so optimizer state) are FSDP-sharded over data x context, not replicated.
    wq = grads["period"][0]["layer"]["q_proj"]
    assert wq.sharding.is_equivalent_to(NamedSharding(mesh, P(None, ("data", "context"), "model")), wq.ndim)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "mesh_sizes, seq_len, d_model, match",
    [
        ((1, 1, 1, 8), 36, 64, r"^config\.seq_len=36: must be divisible by config\.mesh\.context=8$"),
        ((1, 1, 1, 8), 16, 64, r"^config\.seq_len=16: each of the config\.mesh\.context=8 sequence shards"),
        ((2, 1, 1, 4), 40, 36, r"^config\.model\.d_model=36: must be divisible by config\.mesh\.data x"),
    ],
)
def test_context_mesh_checked_against_seq_len_and_model(mesh_sizes, seq_len, d_model, match):
    cfg = dataclasses.replace(_cfg(), d_model=d_model)
    mesh_cfg = dict(zip(("data", "expert", "model", "context"), mesh_sizes, strict=True))
    with pytest.raises(ConfigError, match=match):
        sharding.make_mesh(mesh_cfg, model_cfg=cfg, batch_size=8, seq_len=seq_len)


@pytest.mark.parametrize(
    "seq_len, context, match",
    [
        (36, 1, r"^config\.model\.capacity_group=8: must divide config\.seq_len=36$"),
        (48, 4, r"^config\.model\.capacity_group=8: must divide the context shard length config\.seq_len"),
    ],
)
def test_capacity_group_checked_against_seq_len_and_context(seq_len, context, match):
    config = tiny.get_config()
    config.seq_len, config.mesh.context, config.model.capacity_group = seq_len, context, 8
    with pytest.raises(ConfigError, match=match):
        check_train_config(config)
    config.seq_len = 64  # 2 shards of 32 tokens, 4 groups each
    check_train_config(config)


def test_mamba_cp_scheme_is_validated():
    model = tiny.get_config().model
    model.mamba_cp_scheme = "ring"
    with pytest.raises(ConfigError, match=r"^config\.model\.mamba_cp_scheme='ring': expected one of"):
        ModelConfig.from_config(model)
