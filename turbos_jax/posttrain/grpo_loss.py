"""The GRPO objective with the TurboS changes (report §3.5.2), and its microbatched gradient.

An RL batch is the trainer's batch (`inputs`, `targets`, `segment_ids`, `positions`, `loss_mask`,
all (B, T); see `rollouts.training_batch`) with per-row and per-token RL fields:

    advantages    (B,)    fp32  A_i, one per sampled response
    old_logprobs  (B, T)  fp32  log pi_old(target) at completion positions (sampler or trainer)
    ref_logprobs  (B, T)  fp32  log pi_ref(target) from the frozen reference
    is_weights    (B, T)  fp32  truncated importance weights (1 unless rollouts used int8 weights)

`loss_mask` is 1 exactly on the completion tokens that are scored. With token log-probs
l = log pi_theta, per token t of row i:

  1. ratio r = exp(clip(l - old, -20, 20)); policy term pg = -min(r A, clip(r, 1 - eps_low,
     1 + eps_high) A) * is_weight (PPO clip with separate low and high ranges, "clip-higher").
  2. K3 KL to the reference: d = ref - l, k3 = exp(d) - d - 1 >= 0, clipped to [0, kl_clip]
     (the report's [0, 10] against log-prob spikes).
  3. Token-level aggregation over the WHOLE optimizer batch: main = sum_it w_it (pg + beta k3) with
     w = loss_mask / sum(loss_mask) ("token-mean", the report's token-level loss) or
     w = loss_mask / (row tokens * rows) ("seq-mean-token-mean", the original GRPO).
     The weights are computed once from the whole batch (`token_weights`) before it is split, so
     every microbatch split sums to the same loss and gradient.
  4. Best-of-N loss: bon = sum_it v_it (-l) with v = loss_mask * [A_i > 0] / (its sum over the
     batch): an SFT-like NLL on the samples with positive advantage, weighted by bon_coef.
  5. loss = main + bon_coef * bon + the model's MoE auxiliary loss (load balance + z-loss, weighted
     by the model config; a batch statistic, averaged over microbatches as the pre-training step does).

Log-probs are fp32 (log_softmax of fp32 logits / temperature). With mu = 1 and old = the current
policy, r == 1 in value and the loss is ~0 while its gradient is the REINFORCE gradient (tested).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

RL_KEYS = ("advantages", "old_logprobs", "ref_logprobs", "is_weights")
LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-mean")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("epsilon_low", "epsilon_high", "beta", "kl_clip", "bon_coef"),
    meta_fields=("temperature", "loss_agg"),
)
@dataclasses.dataclass(frozen=True)
class LossParams:
    """The loss's hyper-parameters (module docstring). A pytree: the coefficients are traced
    (changing beta between stages does not recompile), temperature and loss_agg are static."""

    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    beta: float = 0.001
    kl_clip: float = 10.0
    bon_coef: float = 0.1
    temperature: float = 1.0
    loss_agg: str = "token-mean"

    def __post_init__(self):
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg={self.loss_agg!r}: expected one of {LOSS_AGGREGATIONS}")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")


def token_logprobs(params, graphdef, batch, temperature: float = 1.0):
    """Teacher-forced log pi(targets) (B, T) fp32, entropy (B, T) fp32 and the model's aux dict."""
    logits, aux = nnx.merge(graphdef, params)(batch["inputs"], batch["segment_ids"], batch["positions"])
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_all, batch["targets"][..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy, aux


def token_weights(loss_mask, advantages, loss_agg: str = "token-mean"):
    """Whole-batch normalised weights: (w for the main loss, v for the BoN loss), both (B, T).

    Computed before the batch is split into microbatches, so the denominators are global."""
    mask = loss_mask.astype(jnp.float32)
    if loss_agg == "token-mean":
        w = mask / jnp.maximum(jnp.sum(mask), 1.0)
    else:  # seq-mean-token-mean: every row with tokens weighs 1 / (rows with tokens)
        row_tokens = jnp.sum(mask, axis=1, keepdims=True)
        rows = jnp.maximum(jnp.sum(row_tokens > 0), 1)
        w = mask / (jnp.maximum(row_tokens, 1.0) * rows)
    positive = mask * (advantages > 0)[:, None]
    v = positive / jnp.maximum(jnp.sum(positive), 1.0)
    return w, v


def k3_kl(logp, ref_logp, clip: float):
    """Per-token K3 estimate of KL(pi || pi_ref) on sampled tokens, clipped to [0, clip]."""
    d = jnp.clip(ref_logp - logp, -20.0, 20.0)
    return jnp.clip(jnp.exp(d) - d - 1.0, 0.0, clip)


def policy_terms(logp, batch, hp: LossParams):
    """Steps 1-2 per token: (pg (B, T), clipped K3 (B, T), ratio (B, T)) from the current log-probs
    logp (B, T) and the batch's advantages, old / reference log-probs and importance weights."""
    adv = batch["advantages"][:, None].astype(jnp.float32)
    ratio = jnp.exp(jnp.clip(logp - batch["old_logprobs"], -20.0, 20.0))
    clipped = jnp.clip(ratio, 1.0 - hp.epsilon_low, 1.0 + hp.epsilon_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv) * batch["is_weights"]
    return pg, k3_kl(logp, batch["ref_logprobs"], hp.kl_clip), ratio


def grpo_loss(params, graphdef, batch, weights, hp: LossParams, aux_scale: float = 1.0):
    """(loss, metrics) of one (micro)batch; `weights` = `token_weights` rows of this batch.

    Every metric is a weighted sum with the whole-batch weights, so microbatch metrics add up to
    the whole batch's; the MoE aux loss and statistics are scaled by `aux_scale` (1 / microbatches:
    summed over microbatches they give the mean)."""
    w, v = weights
    logp, entropy, aux = token_logprobs(params, graphdef, batch, hp.temperature)
    pg, kl, ratio = policy_terms(logp, batch, hp)
    pg_loss, kl_mean = jnp.sum(w * pg), jnp.sum(w * kl)
    bon_nll = jnp.sum(v * -logp)
    aux = {k: a * aux_scale for k, a in aux.items()}
    loss = pg_loss + hp.beta * kl_mean + hp.bon_coef * bon_nll + aux["aux_loss"]
    # Clip activity: a token is clipped low when A < 0 and r < 1 - eps, high when A > 0 and r > 1 + eps.
    adv = batch["advantages"][:, None]
    low = (adv < 0) & (ratio < 1.0 - hp.epsilon_low)
    high = (adv > 0) & (ratio > 1.0 + hp.epsilon_high)
    metrics = {
        "pg_loss": pg_loss,
        "kl": kl_mean,
        "bon_nll": bon_nll,
        "entropy": jnp.sum(w * entropy),
        "clipfrac_low": jnp.sum(w * low),
        "clipfrac_high": jnp.sum(w * high),
        "ratio_mean": jnp.sum(w * ratio),
        **aux,
    }
    return loss, metrics


def _split(tree, k: int):
    """[B, ...] -> [k, B/k, ...], microbatch j = rows j::k (as step.py's gradient accumulation)."""
    return jax.tree.map(lambda v: v.reshape(v.shape[0] // k, k, *v.shape[1:]).swapaxes(0, 1), tree)


def grpo_grads(params, graphdef, batch, hp: LossParams, microbatches: int = 1):
    """(loss, metrics, grads) of the whole batch, computed over `microbatches` sequential pieces.

    1. Weights from the whole batch (`token_weights`): the token-level normalisers are global.
    2. A `lax.scan` sums each microbatch's loss, metrics and fp32 gradients; the MoE aux loss (a
       batch statistic) is divided by the microbatch count, i.e. averaged.
    The token-level part is therefore identical however the batch is split (tested, with the
    per-microbatch-normaliser bug as negative control)."""
    weights = token_weights(batch["loss_mask"], batch["advantages"], hp.loss_agg)
    grad_fn = jax.value_and_grad(grpo_loss, has_aux=True)
    if microbatches == 1:
        (loss, metrics), grads = grad_fn(params, graphdef, batch, weights, hp)
        return loss, metrics, grads
    rows = batch["advantages"].shape[0]
    if rows % microbatches:
        raise ValueError(f"batch of {rows} rows does not split into {microbatches} microbatches")

    micro_grad = jax.value_and_grad(
        lambda p, mb, mw: grpo_loss(p, graphdef, mb, mw, hp, 1.0 / microbatches), has_aux=True
    )

    def body(carry, inputs):
        mb, mw = inputs
        (loss, metrics), grads = micro_grad(params, mb, mw)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    pieces = (_split(batch, microbatches), _split(weights, microbatches))
    one_piece = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), pieces)
    (loss_s, metrics_s), grads_s = jax.eval_shape(micro_grad, params, *one_piece)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (loss_s, metrics_s, grads_s))
    (loss, metrics, grads), _ = jax.lax.scan(body, zeros, pieces)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss, metrics, grads


def make_rl_step(graphdef, tx, microbatches: int = 1):
    """The (unjitted) policy update `(state, batch, hp) -> (state, metrics)` on a state holding
    {"params", "opt_state", "step"} (other entries, e.g. the reference, pass through). A non-finite
    loss or gradient leaves params and optimizer moments untouched (metrics["finite"] is False);
    so does a batch without any scored token (every group filtered out: metrics["updated"] is
    False), where only the MoE aux loss and Adam's momentum would move the policy. The step is
    counted either way."""
    import optax

    def rl_step(state: dict[str, Any], batch, hp: LossParams):
        loss, metrics, grads = grpo_grads(state["params"], graphdef, batch, hp, microbatches)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (jnp.sum(batch["loss_mask"]) > 0)
        params, opt_state = jax.tree.map(
            lambda n, o: jnp.where(apply, n, o), (params, opt_state), (state["params"], state["opt_state"])
        )
        new_state = state | {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "updated": apply, **metrics}
        return new_state, metrics

    return rl_step
