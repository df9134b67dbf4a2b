"""The shuffled-reward control (config.rl.shuffle_rewards): one GRPO step from the same state with
and without it samples and scores the same rollouts (equal reward metrics), computes advantages
from the same multiset of rewards in another order, and so makes a different update; without the
flag the step is reproducible (two runs equal), so the difference is the flag's."""

import dataclasses

import jax
import numpy as np

from configs import tiny
from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.data.tokenizers import ByteTokenizer
from turbos_jax.posttrain import advantages, grpo, grpo_loss, prompts, rewards

# The shapes of tests/test_grpo_sharding.py's one-device step (its compiled programs are reused).
G, PROMPTS, NEW, LP = 2, 4, 6, 8


def test_shuffled_rewards_is_a_seeded_permutation():
    total = np.random.default_rng(0).random(16)
    a = grpo.shuffled_rewards(total, jax.random.key(1))
    np.testing.assert_array_equal(np.sort(a), np.sort(total))  # nothing lost or duplicated
    assert not np.array_equal(a, total)
    np.testing.assert_array_equal(a, grpo.shuffled_rewards(total, jax.random.key(1)))
    assert not np.array_equal(a, grpo.shuffled_rewards(total, jax.random.key(2)))


def _one_step(shuffle: bool, monkeypatch):
    """One step on one device -> (parameters, metrics, the rewards the advantages were computed
    from, the advantages)."""
    config = tiny.get_config()
    config.batch_size, config.seq_len = G * PROMPTS, LP + NEW - 1
    config.mesh.data = 1
    config.optim.schedule = (("constant", 10, 1e-3),)  # tiny's warmup gives the first step LR 0
    model_cfg = dataclasses.replace(ModelConfig.from_config(config.model), layout="AFMF")
    mesh = sharding.train_mesh(config, model_cfg, jax.devices()[:1])
    program = grpo.build_rl_program(config, model_cfg, mesh, microbatches=2)
    tok = ByteTokenizer()
    odd = lambda p, c, m: [float(len(x) > 0 and ord(x[0]) % 2 == 1) for x in c]  # reward spread at init
    spec = rewards.RewardSpec({"odd": (odd, 1.0)}, correctness="odd")
    settings = grpo.Settings(G, LP, NEW, 1.0, "group", 1e-6, None, 0.05, False, 1, False, False, 2.0, 0)
    settings = dataclasses.replace(settings, shuffle_rewards=shuffle)
    phases = [grpo.Phase(10, grpo_loss.LossParams(beta=0.1), {"m": 1.0})]
    records = [{"prompt": f"{i}+{i}=", "kind": "answer", "answer": "0"} for i in range(12)]
    stream = prompts.PromptStream({"m": records}, seed=0)

    seen = {}
    real = advantages.group_advantages

    def spy(r, *args):  # the rewards the step's advantages are computed from, and the result
        seen["rewards"], seen["advantages"] = np.array(r), real(r, *args)
        return seen["advantages"]

    monkeypatch.setattr(advantages, "group_advantages", spy)
    with jax.set_mesh(mesh):
        state = jax.jit(program.setup.init_state, out_shardings=program.state_shardings)()
        step = grpo.make_grpo_step(
            program, settings, phases, stream, grpo.Text(tok.encode, tok, 10), spec, config.seq_len
        )
        state, metrics = step(state, stream.draw(PROMPTS, {"m": 1.0}))
        params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state["params"]))])
    return params, jax.device_get(metrics), seen["rewards"], seen["advantages"]


def test_shuffle_rewards_keeps_rollouts_and_rewards_but_changes_the_update(monkeypatch):
    plain, m_plain, r_plain, a_plain = _one_step(False, monkeypatch)
    again, _, r_again, _ = _one_step(False, monkeypatch)
    shuffled, m_shuffled, r_shuffled, a_shuffled = _one_step(True, monkeypatch)

    # Negative control: without the flag the step is deterministic.
    np.testing.assert_array_equal(r_again, r_plain)
    np.testing.assert_array_equal(again, plain)
    assert bool(m_plain["updated"]) and 0 < r_plain.mean() < 1  # a real update from spread rewards
    # Same rollouts and scores (reward metrics describe the responses, not the permutation) ...
    for key in ("reward/odd", "reward_failures/odd", "response_tokens", "truncated_frac"):
        assert m_shuffled[key] == m_plain[key], key
    # ... the same rewards, none lost or duplicated, but moved to other responses ...
    np.testing.assert_array_equal(np.sort(r_shuffled), np.sort(r_plain))
    assert not np.array_equal(r_shuffled, r_plain)
    # ... so other advantages and another update.
    assert not np.allclose(a_shuffled, a_plain)
    assert np.abs(shuffled - plain).max() > 1e-5
