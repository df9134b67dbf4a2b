"""The model features added for imported hybrids: validation, and the properties parity tests do
not show (the selection bias gets no gradient, tied embeddings are one parameter, padding logits,
single-group Mamba2 under tensor parallelism)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from turbos_jax import sharding
from turbos_jax.config import ConfigError, ModelConfig
from turbos_jax.layers.embedding import Embed
from turbos_jax.layers.moe import MoEFFN
from turbos_jax.model import TurbosModel


def _model_dict(**overrides):
    d = tiny.get_config().model.to_dict()
    d.update(overrides)
    return d


@pytest.mark.parametrize(
    "key, value",
    [
        ("position_encoding", "alibi"),
        ("qk_norm", "sometimes"),
        ("expert_activation", "gelu"),
        ("mlp_activation", "gelu"),
        ("router_score", "tanh"),
        ("router_bias", 1),
        ("tie_embeddings", "yes"),
        ("vocab_multiple", 0),
        ("shared_expert_dim", -1),
        ("embedding_scale", 0.0),
        ("logits_scale", float("inf")),
        ("attn_scale", -1.0),
    ],
)
def test_new_keys_are_validated_by_name(key, value):
    with pytest.raises(ConfigError, match=rf"config\.model\.{key}="):
        ModelConfig.from_config(_model_dict(**{key: value}))


def test_dense_layers_need_a_width_and_the_bias_needs_sigmoid():
    with pytest.raises(ConfigError, match=r"config\.model\.mlp_dim=0: must be > 0"):
        ModelConfig.from_config(_model_dict(layout="MD"))
    with pytest.raises(ConfigError, match=r"config\.model\.router_bias=True: a selection bias"):
        ModelConfig.from_config(_model_dict(router_bias=True))


def _cfg(**changes):
    cfg = ModelConfig.from_config(tiny.get_config().model)
    return dataclasses.replace(cfg, capacity_factor=0.0, **changes)


def test_selection_bias_steers_choices_but_gets_no_gradient():
    cfg = _cfg(router_score="sigmoid", router_bias=True, expert_activation="relu2", routed_scale=2.5)
    graphdef, state = nnx.split(MoEFFN(cfg, rngs=nnx.Rngs(0)))
    moe = nnx.merge(graphdef, state)
    assert not hasattr(moe, "wi_gate") and not hasattr(moe, "shared_gate")
    x = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] ** 2)

    grads = jax.jit(jax.grad(loss))(state, x)
    assert float(jnp.abs(grads["router_bias"][...]).max()) == 0.0
    assert float(jnp.abs(grads["router"][...]).max()) > 0.0
    # A large bias on expert 0 makes every token choose it.
    state["router_bias"][...] = jnp.zeros(cfg.num_experts).at[0].set(100.0)
    route = jax.jit(lambda state, x: nnx.merge(graphdef, state).route(x, jnp.ones(x.shape[:2], bool))[0])
    ids = route(state, x)
    assert bool(jnp.all(jnp.any(ids == 0, axis=-1)))


def test_tied_embeddings_and_padded_vocabulary():
    cfg = _cfg(vocab_size=250, vocab_multiple=128, tie_embeddings=True, logits_scale=0.5)
    abstract = nnx.eval_shape(lambda: TurbosModel(cfg, rngs=nnx.Rngs(0)))
    assert not hasattr(abstract, "lm_head") and abstract.embed.embedding.shape == (256, cfg.d_model)
    embed = Embed(cfg, rngs=nnx.Rngs(0))
    h = jax.random.normal(jax.random.key(2), (1, 6, cfg.d_model))
    logits = embed.attend(h)
    assert logits.shape[-1] == 256 and float(logits[..., 250:].max()) < -1e30
    want = 0.5 * jnp.einsum("bld,vd->blv", h, embed.embedding[...])[..., :250]
    np.testing.assert_allclose(logits[..., :250], want, rtol=1e-5, atol=1e-5)


def test_single_mamba_group_is_replicated_under_tensor_parallelism():
    shape = {"data": 1, "expert": 1, "model": 4, "context": 1}
    one = _cfg(layout="M", mamba_heads=4, mamba_groups=1, num_heads=4, num_kv_heads=4)
    sharding.check_mesh(shape, one)  # 1 group: accepted with model=4
    with pytest.raises(ConfigError, match=r"config\.model\.mamba_groups=2: must be divisible"):
        sharding.check_mesh(shape, dataclasses.replace(one, mamba_groups=2))
    abstract = nnx.state(nnx.eval_shape(lambda: TurbosModel(one, rngs=nnx.Rngs(0))))
    specs = sharding.param_specs(abstract)
    in_proj = specs["period"][0]["layer"]["in_proj"]
    fsdp = ("data", "context")  # d_model is FSDP-sharded over data x context
    assert in_proj["B"] == jax.sharding.PartitionSpec(None, fsdp, None, None)
    assert in_proj["x"] == jax.sharding.PartitionSpec(None, fsdp, "model", None)


def test_relu2_sigmoid_experts_under_expert_parallelism_match_one_device():
    """Dropless all-to-all dispatch over expert=2 (x data=2 x model=2) with gate-less experts."""
    cfg = _cfg(
        router_score="sigmoid",
        router_bias=True,
        expert_activation="relu2",
        routed_scale=2.5,
        shared_expert_dim=64,
    )
    graphdef, state = nnx.split(MoEFFN(cfg, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
    x = jax.random.normal(jax.random.key(1), (4, 8, cfg.d_model))
    want = forward(state, x)
    mesh = sharding.make_mesh({"data": 2, "expert": 2, "model": 2, "context": 1}, jax.devices()[:8])
    with jax.set_mesh(mesh):
        got = forward(jax.device_put(state, sharding.named_shardings(state, mesh)), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.abs(want).max()))
