"""GRPO on a mesh: one step (rollouts, rewards, update) on 8 fake CPU devices -- policy, reference
and optimizer state sharded by turbos_jax.sharding, rollout and update batches split over `data` --
gives the single-device step's parameters."""

import dataclasses

import jax
import numpy as np
from helpers import assert_close

from configs import tiny
from turbos_jax import sharding
from turbos_jax.config import ModelConfig
from turbos_jax.data.tokenizers import ByteTokenizer
from turbos_jax.posttrain import grpo, grpo_loss, prompts, rewards

G, PROMPTS, NEW, LP = 2, 4, 6, 8


def _step(devices):
    config = tiny.get_config()
    config.batch_size, config.seq_len = G * PROMPTS, LP + NEW - 1
    config.mesh.data = len(devices)
    config.optim.schedule = (("constant", 10, 1e-3),)  # tiny's warmup gives the first step LR 0
    model_cfg = dataclasses.replace(ModelConfig.from_config(config.model), layout="AFMF")
    mesh = sharding.train_mesh(config, model_cfg, devices)
    program = grpo.build_rl_program(config, model_cfg, mesh, microbatches=2)
    tok = ByteTokenizer()
    odd = lambda p, c, m: [float(len(x) > 0 and ord(x[0]) % 2 == 1) for x in c]  # reward spread at init
    spec = rewards.RewardSpec({"odd": (odd, 1.0)}, correctness="odd")
    settings = grpo.Settings(G, LP, NEW, 1.0, "group", 1e-6, None, 0.05, False, 1, False, False, 2.0, 0)
    phases = [grpo.Phase(10, grpo_loss.LossParams(beta=0.1), {"m": 1.0})]
    records = [{"prompt": f"{i}+{i}=", "kind": "answer", "answer": "0"} for i in range(12)]
    stream = prompts.PromptStream({"m": records}, seed=0)
    with jax.set_mesh(mesh):
        state = jax.jit(program.setup.init_state, out_shardings=program.state_shardings)()
        step = grpo.make_grpo_step(
            program, settings, phases, stream, grpo.Text(tok.encode, tok, 10), spec, config.seq_len
        )
        init = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(state["params"]))])
        state, metrics = step(state, stream.draw(PROMPTS, {"m": 1.0}))
        assert bool(metrics["updated"]) and float(metrics["kl"]) == 0.0  # first step: policy == reference
        sharded = [leaf.sharding for leaf in jax.tree.leaves(state["params"])]
        return jax.device_get(state["params"]), sharded, jax.device_get(metrics), init


def test_one_rl_step_on_8_devices_equals_1():
    one, _, m1, init = _step(jax.devices()[:1])
    eight, shardings, m8, _ = _step(jax.devices()[:8])
    assert sum(not s.is_fully_replicated for s in shardings) > len(shardings) // 2  # FSDP over `data`
    assert float(m1["reward/odd"]) == float(m8["reward/odd"])  # the same rollouts
    assert_close(m8["loss"], m1["loss"], 1e-5, "loss")
    flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
    update = np.abs(flat(one) - init).max()
    assert update > 5e-4  # the step moved the parameters (an LR of 1e-3; tiny's warmup would give 0)
    assert_close(flat(eight), flat(one), 1e-4, "parameters")
    # Measured: max |diff| 2e-5 against an update of 1e-3 (Adam normalises the gradient, so the
    # elements whose gradient is near 0 move by up to the LR in a reduction-order-dependent way).
    assert np.abs(flat(one) - flat(eight)).max() < 0.1 * update
