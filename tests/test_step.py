"""The optimizer step: gradient accumulation over microbatches equals the full-batch step."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import training_batch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import tiny
from turbos_jax import optim, sharding
from turbos_jax.config import ConfigError, ModelConfig, check_train_config
from turbos_jax.model import TurbosModel
from turbos_jax.step import _accumulated_grads, loss_fn, make_train_step


@pytest.fixture(scope="module")
def setup():
    # Aux-loss weights 0: the load-balance loss is a batch statistic, defined per microbatch.
    cfg = dataclasses.replace(
        ModelConfig.from_config(tiny.get_config().model),
        layout="AFMF",
        aux_loss_weight=0.0,
        z_loss_weight=0.0,
    )
    graphdef, params = nnx.split(TurbosModel(cfg, rngs=nnx.Rngs(1)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (8, 25)).astype(np.int32)
    seg = np.ones((8, 24), np.int32)
    seg[2, 10:] = 2
    seg[5, 17:] = 0  # padding: microbatches hold different numbers of targets
    seg[6, 3:] = 0
    batch = training_batch(tokens, seg)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, graphdef, b), has_aux=True))
    return cfg, graphdef, params, batch, grad_fn(params, batch)


def _close(a, b):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-4, atol=1e-6), a, b
    )


@pytest.mark.parametrize("sizes, accum", [((1, 1, 1), 2), ((1, 1, 1), 4), ((2, 2, 1), 2)])
def test_accumulated_grads_equal_full_batch(setup, sizes, accum):
    cfg, graphdef, params, batch, ((ref_loss, (ref_ce, _)), ref_grads) = setup
    n = int(np.prod(sizes))
    mesh = sharding.make_mesh(
        dict(zip(("data", "expert", "model"), sizes, strict=True), context=1),
        devices=jax.devices()[:n],
        model_cfg=cfg,
        batch_size=8,
        grad_accum_steps=accum,
    )
    batch_sh = NamedSharding(mesh, P(("data", "expert")))
    fn = jax.jit(lambda p, b: _accumulated_grads(p, graphdef, b, accum, batch_sh))
    with jax.set_mesh(mesh):
        (loss, (ce, aux)), grads = fn(
            jax.device_put(params, sharding.named_shardings(params, mesh)), jax.device_put(batch, batch_sh)
        )
    np.testing.assert_allclose(float(ce), float(ref_ce), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert np.isfinite(float(aux["moe_lb_loss"]))
    _close(grads, ref_grads)


def test_train_step_with_accumulation_matches_one_batch(setup):
    cfg, graphdef, params, batch, _ = setup
    tx = optim.make_optimizer(tiny.get_config().optim)
    schedule = optim.make_schedule(tiny.get_config().optim.schedule)
    mesh = sharding.make_mesh({"data": 1, "expert": 1, "model": 1, "context": 1}, devices=jax.devices()[:1])
    batch_sh = NamedSharding(mesh, P(("data", "expert")))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    outs = []
    with jax.set_mesh(mesh):
        for accum in (1, 2):
            step = jax.jit(make_train_step(graphdef, tx, schedule, batch_sh, accum))
            outs.append(step(state, batch))
    (s1, m1), (s2, m2) = outs
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
    _close(s2["params"], s1["params"])


def test_grad_accum_steps_is_checked():
    config = tiny.get_config()
    with config.unlocked():
        config.grad_accum_steps = 3
    with pytest.raises(
        ConfigError,
        match=r"^config\.grad_accum_steps=3: must divide "
        r"config\.batch_size=8$",
    ):
        check_train_config(config)
    with pytest.raises(
        ConfigError,
        match=r"^config\.batch_size=8: must be divisible by mesh data x "
        r"expert = 4 x 2 x grad_accum_steps 2 = 16$",
    ):
        sharding.check_mesh(
            {"data": 4, "expert": 2, "model": 1, "context": 1}, batch_size=8, grad_accum_steps=2
        )
    bad = ml_collections.ConfigDict(tiny.get_config().to_dict())
    del bad["grad_accum_steps"]
    with pytest.raises(ConfigError, match=r"^config\.grad_accum_steps: required key is missing"):
        check_train_config(bad)
