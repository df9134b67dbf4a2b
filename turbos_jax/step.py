"""The loss and the optimizer step, and the one place they are compiled.

`build_train_program(config, model_cfg, mesh)` is what the trainer (`train.py`), AOT compilation
(`aot.py`) and the benchmarks (`benchmarks/train_step_throughput.py`, `benchmarks/matmul_floor.py`)
all run: the same loss, optimizer, shardings, donation and non-finite guard, so a benchmark or a
memory report measures the program users train with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from turbos_jax import sharding
from turbos_jax.data.packing import BATCH_KEYS  # the batch the data pipeline yields


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


def loss_fn(params, graphdef, batch, num_targets=None):
    """Next-token cross-entropy over loss_mask (no loss across documents) + weighted MoE losses.

    The CE is summed over the batch and divided by `num_targets` (default: this batch's
    loss_mask sum), so microbatches divided by the whole batch's count sum to the full-batch CE.
    """
    logits, aux = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    if num_targets is None:
        num_targets = jnp.maximum(jnp.sum(mask), 1.0)
    ce = jnp.sum(ce * mask) / num_targets
    return ce + aux["aux_loss"], (ce, aux)


def _accumulated_grads(params, graphdef, batch, accum_steps: int, batch_sharding):
    """Loss, (CE, aux) and gradients of the whole batch, computed over `accum_steps` microbatches.

    1. Microbatch j takes rows j, j + k, j + 2k, ... (k = accum_steps): each device's contiguous
       block of the (data, expert)-sharded batch holds rows of every microbatch, so splitting moves
       no data between devices.
    2. A `lax.scan` over microbatches sums fp32 gradients; the CE of each microbatch is divided by
       the whole batch's target count, so the summed CE gradient is the full-batch one exactly.
    3. MoE aux losses (and their gradients and metrics) are the mean over microbatches: they are
       batch statistics, and a microbatch is the batch the router sees at once.
    """
    num_targets = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
    spec = batch_sharding.spec

    def split(v):  # [B, ...] -> [k, B/k, ...] with microbatch j = rows j::k
        v = v.reshape(v.shape[0] // accum_steps, accum_steps, *v.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(v, NamedSharding(batch_sharding.mesh, P(None, *spec)))

    def micro_loss(p, mb):
        _, (ce, aux) = loss_fn(p, graphdef, mb, num_targets)
        aux = jax.tree.map(lambda a: a / accum_steps, aux)
        return ce + aux["aux_loss"], (ce, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def body(carry, mb):
        (loss, (ce, aux)), grads = grad_fn(params, mb)
        carry = jax.tree.map(jnp.add, carry, (loss, ce, aux, grads))
        return carry, None

    (loss, (ce, aux)), grads_shape = jax.eval_shape(
        grad_fn,
        params,
        jax.tree.map(
            lambda v: jax.ShapeDtypeStruct((v.shape[0] // accum_steps, *v.shape[1:]), v.dtype), batch
        ),
    )
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss, ce, aux, grads_shape))
    (loss, ce, aux, grads), _ = jax.lax.scan(body, zeros, jax.tree.map(split, batch))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return (loss, (ce, aux)), grads


def make_train_step(graphdef, tx, schedule, batch_sharding, grad_accum_steps: int = 1):
    """The (unjitted) optimizer step `(state, batch) -> (state, metrics)`; also lowered by `aot`.

    With `grad_accum_steps` > 1 the batch is processed in that many sequential microbatches whose
    gradients are summed before the one optimizer update (see `_accumulated_grads`)."""

    def train_step(state, batch):
        batch = {k: jax.lax.with_sharding_constraint(v, batch_sharding) for k, v in batch.items()}
        if grad_accum_steps > 1:
            (loss, (ce, aux)), grads = _accumulated_grads(
                state["params"], graphdef, batch, grad_accum_steps, batch_sharding
            )
        else:
            (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], graphdef, batch
            )
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step never reaches the parameters or Adam's moments: skipped, or stopped by
        # the host. Its step is still counted everywhere (`step`, and optax's `count`s that drive
        # the LR schedule and the bias correction), so step, optimizer count, LR and checkpoint
        # step always agree; a skipped step consumes its batch and its LR like any other.
        kept_params, kept_opt_state = jax.tree.map(
            lambda n, o: jnp.where(finite, n, o),
            (params, opt_state),
            (state["params"], state["opt_state"]),
        )
        new_step = state["step"] + 1
        kept_opt_state = optax.tree_utils.tree_set(kept_opt_state, count=new_step)
        new_state = {"params": kept_params, "opt_state": kept_opt_state, "step": new_step}
        out = {
            "loss": loss,
            "ce_loss": ce,
            "grad_norm": grad_norm,
            "finite": finite,
            "learning_rate": schedule(state["step"]),  # the LR this update used (optax count before it)
            **aux,
        }
        return new_state, out

    return train_step


class TrainProgram(NamedTuple):
    """The compiled-on-first-call training program for one config on one mesh.

    `train_step(state, batch) -> (state, metrics)` is jitted with the state's shardings in and out
    and the state donated; `eval_step(params, batch) -> mean CE` is jitted; `batch_sharding` is the
    batch rows over (data, expert) and its sequence over context."""

    setup: TrainSetup
    state_shardings: Any
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable


def build_train_program(config, model_cfg, mesh) -> TrainProgram:
    """The one train/eval step builder (see the module docstring); nothing is compiled yet."""
    setup = train_setup(config, model_cfg)
    state_shardings = sharding.named_shardings(setup.abstract_state, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    step = make_train_step(setup.graphdef, setup.tx, setup.schedule, batch_sharding, config.grad_accum_steps)

    def eval_step(params, batch):
        _, (ce, _) = loss_fn(params, setup.graphdef, batch)
        return ce

    train_step = jax.jit(
        step, in_shardings=(state_shardings, None), out_shardings=(state_shardings, None), donate_argnums=(0,)
    )
    return TrainProgram(setup, state_shardings, batch_sharding, train_step, jax.jit(eval_step))


def abstract_batch(config, batch_sharding) -> dict:
    """ShapeDtypeStructs of one global batch (for `.lower`), placed with `batch_sharding`."""
    shape = (config.batch_size, config.seq_len)
    return {
        k: jax.ShapeDtypeStruct(
            shape, jnp.float32 if k == "loss_mask" else jnp.int32, sharding=batch_sharding
        )
        for k in BATCH_KEYS
    }


def synthetic_batch(config, vocab_size: int, batch_sharding, seed: int = 0) -> dict:
    """A random-token global batch, one document per row, every target counted (benchmarks)."""
    import numpy as np

    b, s = config.batch_size, config.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (b, s + 1))
    host = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((b, s)),
        "positions": np.broadcast_to(np.arange(s), (b, s)),
        "loss_mask": np.ones((b, s)),
    }
    return {
        k: jax.device_put(np.asarray(v, np.float32 if k == "loss_mask" else np.int32), batch_sharding)
        for k, v in host.items()
    }
