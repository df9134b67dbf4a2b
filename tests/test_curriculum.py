"""The long-context curriculum at CPU size (docs/training.md, "Long-context stages"): the tiny model
trains at 128 tokens, then at 2K with context parallelism 2, then at 8K with context 4 on the 8 fake
devices, each stage started from the previous one's workdir by `config.init_from`: parameters and
optimizer state carried over, the step counted on, RoPE's NTK alpha raised, the data started fresh."""

import json
import os

import numpy as np

from configs import tiny
from turbos_jax.train import train_and_evaluate

# (seq_len, context, batch_size, total_steps, rope_alpha) per stage: the 4K -> 32K -> 256K ladder
# scaled down; the sequence per device is 128, 1024 and 2048 tokens.
STAGES = ((128, 1, 8, 12, 1.0), (2048, 2, 4, 14, 50.0), (8192, 4, 2, 15, 1000.0))


def stage_config(seq_len, context, batch_size, total_steps, rope_alpha, init_from):
    config = tiny.get_config()
    config.seq_len, config.batch_size, config.total_steps = seq_len, batch_size, total_steps
    config.mesh.data, config.mesh.context = -1, context
    config.model.rope_alpha = rope_alpha
    config.init_from = init_from
    config.optim.schedule = (("constant", total_steps, 3e-3),)
    config.log_every_steps, config.eval_every_steps = 1, 0
    config.checkpoint_every_steps = total_steps
    return config


def test_tiny_curriculum_128_2k_8k(tmp_path):
    rows, previous = [], ""
    for i, stage in enumerate(STAGES):
        workdir = str(tmp_path / f"stage{i}")
        logged = []
        train_and_evaluate(
            stage_config(*stage, previous), workdir, on_log=lambda _, r, out=logged: out.append(r)
        )
        rows.append([r for r in logged if "loss" in r])
        steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
        assert steps[-1] == stage[3]
        with open(os.path.join(workdir, "config.json")) as f:
            assert json.load(f)["mesh"]["context"] == stage[1]
        previous = workdir
    first_step = [r[0]["step"] for r in rows]
    # Each stage goes on from the previous stage's last step.
    assert first_step == [1, STAGES[0][3] + 1, STAGES[1][3] + 1]
    losses = [np.array([r["loss"] for r in stage_rows]) for stage_rows in rows]
    assert all(np.isfinite(x).all() for x in losses)
    # Parameters carried over: each later stage starts far below an untrained model's first loss
    # (ln 256 = 5.5 for bytes) and near where the previous stage ended.
    assert losses[0][-1] < losses[0][0] - 1.0
    for before, after in zip(losses, losses[1:], strict=False):
        assert after[0] < losses[0][0] - 1.0
        assert abs(after[0] - before[-1]) < 0.6
