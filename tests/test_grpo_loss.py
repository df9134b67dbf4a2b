"""GRPO loss (turbos_jax/posttrain/grpo_loss.py): the clipped policy term and K3 on hand-made values,
the same gradient however the batch is split (negative control: per-microbatch normalisers),
the on-policy REINFORCE identity, the best-of-N term, the MoE aux loss, and fp32 log-probs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from configs import tiny
from turbos_jax.config import ModelConfig
from turbos_jax.model import init_model
from turbos_jax.posttrain import grpo_loss as G
from turbos_jax.posttrain.rollouts import Rollouts, at_targets, dropless_graphdef, training_batch

R, T, LP, N = 8, 16, 6, 10  # rows, trainer length, prompt buffer, max completion
# One jitted program per (model, microbatches): the loss coefficients are traced, so the tests share it.
grads_fn = jax.jit(G.grpo_grads, static_argnames=("graphdef", "microbatches"))
logprobs_fn = jax.jit(lambda p, g, b: G.token_logprobs(p, g, b)[0], static_argnums=1)


def _cfg(aux: bool):
    cfg = ModelConfig.from_config(tiny.get_config().model)
    weights = (0.01, 1e-3) if aux else (0.0, 0.0)
    return dataclasses.replace(
        cfg, layout="AFMF", d_model=32, expert_dim=32, aux_loss_weight=weights[0], z_loss_weight=weights[1]
    )


def _rl_batch(seed=0, advantages=None):
    """Random rollouts of uneven prompt and completion lengths -> an RL batch (numpy)."""
    rng = np.random.default_rng(seed)
    plen = rng.integers(2, LP + 1, R).astype(np.int32)
    n = rng.integers(1, N + 1, R).astype(np.int32)
    ro = Rollouts(
        prompts=rng.integers(1, 256, (R, LP)).astype(np.int32),
        prompt_lengths=plen,
        completions=rng.integers(1, 256, (R, N)).astype(np.int32),
        lengths=n,
        logprobs=np.zeros((R, N), np.float32),
        truncated=np.zeros(R, bool),
    )
    batch = training_batch(ro, T)
    mask = batch["loss_mask"]
    adv = rng.normal(size=R).astype(np.float32) if advantages is None else np.asarray(advantages, np.float32)
    batch["advantages"] = adv
    # Old / reference log-probs away from the policy's (~ -5.5 at init) so ratios clip and K3 > 0.
    batch["old_logprobs"] = at_targets(rng.normal(-5.5, 0.3, (R, N)).astype(np.float32), ro, T)
    batch["ref_logprobs"] = at_targets(rng.normal(-5.5, 0.3, (R, N)).astype(np.float32), ro, T)
    batch["is_weights"] = np.where(mask > 0, rng.uniform(0.5, 2.0, (R, T)), 1.0).astype(np.float32)
    return batch


@pytest.fixture(scope="module")
def model():
    graphdef, params = init_model(_cfg(aux=False), seed=0)
    return dropless_graphdef(graphdef, params), params


def test_policy_terms_and_k3_on_hand_values():
    hp = G.LossParams(epsilon_low=0.2, epsilon_high=0.28, kl_clip=10.0)
    logp = jnp.log(jnp.array([[0.5, 0.5, 0.5, 0.5, 0.5]]))
    old = jnp.log(jnp.array([[0.25, 0.25, 1.0, 0.5, 0.5]]))  # ratios 2, 2, 0.5, 1, 1
    batch = {
        "advantages": jnp.array([1.0]),
        "old_logprobs": old,
        "ref_logprobs": jnp.log(jnp.array([[0.5, 1e-9, 0.5, 0.25, 0.5]])),
        "is_weights": jnp.array([[1.0, 1.0, 1.0, 1.0, 0.5]]),
    }
    pg, kl, ratio = G.policy_terms(logp, batch, hp)
    assert_close(ratio, [[2.0, 2.0, 0.5, 1.0, 1.0]], 1e-6)
    # A > 0: min(r, clip(r, 0.8, 1.28)) -> 1.28 (high clip), 1.28, 0.5 (unclipped below), 1, 1 * 0.5.
    assert_close(pg, [[-1.28, -1.28, -0.5, -1.0, -0.5]], 1e-6)
    neg = {**batch, "advantages": jnp.array([-1.0])}
    pg_neg, _, _ = G.policy_terms(logp, neg, hp)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)) -> 2, 2, 0.8 (low clip), 1, 0.5.
    assert_close(pg_neg, [[2.0, 2.0, 0.8, 1.0, 0.5]], 1e-6)
    # K3 = exp(d) - d - 1, d = ref - logp: 0 when equal, clipped at 10 for the 1e-9 spike, >= 0.
    d = np.log(0.25 / 0.5)
    assert_close(kl, [[0.0, 10.0, 0.0, np.exp(d) - d - 1, 0.0]], 1e-5)
    spikes = G.k3_kl(jnp.zeros(1000), jax.random.normal(jax.random.key(0), (1000,)) * 8, clip=10.0)
    assert float(spikes.min()) >= 0.0 and float(spikes.max()) == 10.0


def test_token_level_loss_is_split_invariant_and_per_microbatch_mean_is_not(model):
    graphdef, params = model
    hp = G.LossParams(epsilon_low=0.2, epsilon_high=0.28, beta=0.05, bon_coef=0.1)
    batch = jax.tree.map(jnp.asarray, _rl_batch())
    loss1, metrics1, grads1 = grads_fn(params, graphdef, batch, hp, microbatches=1)
    assert float(metrics1["clipfrac_low"]) > 0 and float(metrics1["clipfrac_high"]) > 0  # both clips active
    assert float(metrics1["kl"]) > 0 and float(metrics1["bon_nll"]) > 0
    flat1 = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads1)])
    for k in (2,):
        loss_k, metrics_k, grads_k = grads_fn(params, graphdef, batch, hp, microbatches=k)
        flat_k = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads_k)])
        assert_close(loss_k, loss1, 1e-5, f"loss k={k}")
        assert_close(flat_k, flat1, 1e-5, f"grads k={k}")
        for name in ("pg_loss", "kl", "bon_nll", "entropy", "clipfrac_low"):
            assert_close(metrics_k[name], metrics1[name], 1e-5, f"{name} k={k}")

    # Negative control: each microbatch normalised by its own token count, then averaged (the
    # gradient-accumulation bug of verl#5625), gives a different update on uneven lengths.
    def per_micro_mean(p):
        total = 0.0
        for j in range(2):
            mb = jax.tree.map(lambda v, j=j: v[j::2], batch)
            weights = G.token_weights(mb["loss_mask"], mb["advantages"], hp.loss_agg)
            total = total + G.grpo_loss(p, graphdef, mb, weights, hp)[0] / 2
        return total

    bad = np.concatenate([np.ravel(g) for g in jax.tree.leaves(jax.jit(jax.grad(per_micro_mean))(params))])
    with pytest.raises(AssertionError):
        assert_close(bad, flat1, 1e-5, "per-microbatch mean")


def test_on_policy_gradient_is_reinforce(model):
    """mu = 1, old = current policy: ratio == 1, no clipping, and the gradient is that of
    -sum_it w_it A_i log pi (REINFORCE with the token-level weights)."""
    graphdef, params = model
    hp = G.LossParams(beta=0.0, bon_coef=0.0)
    batch = jax.tree.map(jnp.asarray, _rl_batch(seed=1))
    logp = logprobs_fn(params, graphdef, batch)
    assert logp.dtype == jnp.float32
    batch["old_logprobs"] = logp
    batch["is_weights"] = jnp.ones_like(logp)
    w, _ = G.token_weights(batch["loss_mask"], batch["advantages"])

    def reinforce(p):
        lp = G.token_logprobs(p, graphdef, batch)[0]
        return -jnp.sum(w * batch["advantages"][:, None] * lp)

    loss, metrics, grads = grads_fn(params, graphdef, batch, hp)
    ref = jax.jit(jax.grad(reinforce))(params)
    assert_close(metrics["ratio_mean"], np.sum(w), 1e-6, "ratio")
    assert float(metrics["clipfrac_low"]) == 0 and float(metrics["clipfrac_high"]) == 0
    flat = lambda t: np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)])
    assert_close(flat(grads), flat(ref), 1e-5, "reinforce")
    assert np.abs(flat(grads)).max() > 0


def test_best_of_n_term_only_on_positive_advantages(model):
    graphdef, params = model
    adv = np.array([1.0, -1.0, 0.5, -0.5, -1.0, 2.0, -2.0, 0.0], np.float32)
    batch = jax.tree.map(jnp.asarray, _rl_batch(seed=2, advantages=adv))
    hp0 = G.LossParams(bon_coef=0.0)
    hp1 = dataclasses.replace(hp0, bon_coef=0.3)
    _, m0, g0 = grads_fn(params, graphdef, batch, hp0)
    _, m1, g1 = grads_fn(params, graphdef, batch, hp1)
    logp = np.asarray(logprobs_fn(params, graphdef, batch))
    pos = np.asarray(batch["loss_mask"]) * (adv > 0)[:, None]
    assert_close(m1["bon_nll"], -np.sum(pos * logp) / pos.sum(), 1e-5, "bon_nll")

    def nll_pos(p):
        lp = G.token_logprobs(p, graphdef, batch)[0]
        return -jnp.sum(pos * lp) / pos.sum()

    flat = lambda t: np.concatenate([np.ravel(g) for g in jax.tree.leaves(t)])
    expected = flat(g0) + 0.3 * flat(jax.jit(jax.grad(nll_pos))(params))
    assert_close(flat(g1), expected, 1e-5, "bon gradient")
    # No positive advantage: the term is exactly zero.
    none = {**batch, "advantages": -jnp.abs(batch["advantages"])}
    assert float(grads_fn(params, graphdef, none, hp1)[1]["bon_nll"]) == 0.0


def test_moe_aux_loss_is_added():
    cfg = _cfg(aux=True)
    graphdef, params = init_model(cfg, seed=0)
    graphdef = dropless_graphdef(graphdef, params)
    batch = jax.tree.map(jnp.asarray, _rl_batch(seed=3))
    hp = G.LossParams()
    loss, metrics, _ = grads_fn(params, graphdef, batch, hp)
    parts = metrics["pg_loss"] + hp.beta * metrics["kl"] + hp.bon_coef * metrics["bon_nll"]
    expected_aux = 0.01 * metrics["moe_lb_loss"] + 1e-3 * metrics["moe_z_loss"]
    assert float(metrics["aux_loss"]) > 0.005  # lb loss ~1 at init
    assert_close(metrics["aux_loss"], expected_aux, 1e-5, "aux")
    assert_close(loss, parts + metrics["aux_loss"], 1e-5, "loss")
