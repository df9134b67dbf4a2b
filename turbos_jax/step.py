"""The loss and the optimizer step, shared by the trainer (`train.py`) and AOT compilation (`aot.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx


class TrainSetup(NamedTuple):
    """What a train step is built from: the model's graph, the optimizer, its LR schedule, a
    function creating the train state {"params", "opt_state", "step"}, and that state's shapes."""

    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_state: Callable[[], dict]
    abstract_state: Any


def train_setup(config, model_cfg) -> TrainSetup:
    """Abstract model and optimizer for `config` (nothing is allocated)."""
    from turbos_jax import optim
    from turbos_jax.model import TurbosModel

    tx = optim.make_optimizer(config.optim)
    schedule = optim.make_schedule(config.optim.schedule)
    make_model = lambda: TurbosModel(model_cfg, rngs=nnx.Rngs(config.seed))
    graphdef, _ = nnx.split(nnx.eval_shape(make_model))

    def init_state():
        params = nnx.split(make_model())[1]
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    return TrainSetup(graphdef, tx, schedule, init_state, jax.eval_shape(init_state))


def loss_fn(params, graphdef, batch):
    """Next-token cross-entropy over loss_mask (no loss across documents) + weighted MoE losses."""
    logits, aux = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"],
                                              batch["positions"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    ce = jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return ce + aux["aux_loss"], (ce, aux)


def make_train_step(graphdef, tx, schedule, batch_sharding):
    """The (unjitted) optimizer step `(state, batch) -> (state, metrics)`; also lowered by `aot`."""

    def train_step(state, batch):
        batch = {k: jax.lax.with_sharding_constraint(v, batch_sharding) for k, v in batch.items()}
        (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], graphdef, batch)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step never reaches the parameters: skipped, or stopped by the host.
        params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                         (params, opt_state), (state["params"], state["opt_state"]))
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        out = {"loss": loss, "ce_loss": ce, "grad_norm": grad_norm, "finite": finite,
               "learning_rate": schedule(state["step"]), **aux}
        return new_state, out

    return train_step
