"""posttrain.grpo_demo: arm configs, the equal-time comparison, and a budget that really stops a run."""

from __future__ import annotations

import json
import os

import pytest

from turbos_jax.checkpointing import Checkpointer
from turbos_jax.posttrain import arithmetic, grpo_demo
from turbos_jax.sft import sft


def test_arm_configs_differ_only_where_the_protocol_says():
    kw = dict(seed=3, init_from="/sft", data_dir="/d", minutes=2.0, eval_seconds=30, eval_prompts=50)
    grpo, shuffled, cont = (grpo_demo.arm_config(a, **kw) for a in ("grpo", "shuffled", "sft"))
    assert not grpo.rl.shuffle_rewards and shuffled.rl.shuffle_rewards
    grpo.rl.shuffle_rewards = True
    assert grpo.to_dict() == shuffled.to_dict()  # the shuffled control differs by that key only
    for c in (grpo, cont):
        assert (c.seed, c.init_from, c.sft.eval_file, c.sft.eval_prompts) == (3, "/sft", "/d/eval.jsonl", 50)
        assert c.optim.schedule == (("constant", c.total_steps, 1e-4),)
    assert cont.sft.train_file == "/d/train.jsonl" and "rl" not in cont
    assert grpo.rl.sources.to_dict() == {"math": ("answer", "/d/rl_prompts.jsonl")}
    assert grpo.rl.phases == ((grpo.total_steps, 0.001, {"math": 1.0}),)
    # Schedules outlast the budget at the expected step times; evaluations about every 30 s.
    assert grpo.total_steps * 3.0 > 120 and cont.total_steps * 0.2 > 120
    assert (grpo.eval_every_steps, cont.eval_every_steps) == (10, 150)
    with pytest.raises(ValueError, match="unknown arm 'ppo'"):
        grpo_demo.arm_config("ppo", **kw)


def _results():
    return {
        ("grpo", 0): [(0.1, 0.40), (2.0, 0.48), (4.1, 0.60)],
        ("sft", 0): [(0.1, 0.40), (1.9, 0.41), (3.9, 0.42)],
        ("shuffled", 0): [(0.1, 0.40), (2.2, 0.20), (4.0, 0.05)],
        ("grpo", 1): [(0.1, 0.40), (2.1, 0.45), (3.8, 0.49)],
        ("sft", 1): [(0.1, 0.40), (2.0, 0.43), (3.9, 0.44)],
    }


def test_comparison_at_equal_time():
    results = _results()
    points = results["grpo", 0]
    assert grpo_demo.at_time(points, 0.0) == 0.40  # before the first evaluation: the start
    assert grpo_demo.at_time(points, 4.0) == 0.48  # 4.1 min is past a 4-minute budget
    assert grpo_demo.at_time(points, 4.1) == 0.60
    table = grpo_demo.comparison_table(results, [0.0, 4.0])
    assert "| GRPO | 40.0 (40.0 / 40.0) | 48.5 (48.0 / 49.0) |" in table
    assert "| continued SFT | 40.0 (40.0 / 40.0) | 43.0 (42.0 / 44.0) |" in table
    assert "| GRPO, shuffled rewards | 40.0 (40.0) | 5.0 (5.0) |" in table
    passed, lines = grpo_demo.verdict(results, 4.1)
    assert lines[0].startswith("seed 0: GRPO 40.0 -> 60.0 % (+20.0), continued SFT 42.0 %")
    assert not passed  # seed 1 gains 9 points only
    del results["grpo", 1], results["sft", 1]
    assert grpo_demo.verdict(results, 4.1)[0]
    results["sft", 0][-1] = (3.9, 0.55)  # continued SFT within 10 points of GRPO: no pass
    assert not grpo_demo.verdict(results, 4.1)[0]


def test_a_budget_stops_the_run_with_a_checkpoint(tmp_path):
    data = arithmetic.write_task_files(
        str(tmp_path / "task"), num_train=100, num_eval=8, num_rl=0, seed=0, levels=(1,), operations=("add",)
    )
    kw = dict(seed=0, init_from=str(tmp_path / "sft"), data_dir=str(tmp_path / "task"), eval_prompts=4)
    config = grpo_demo.arm_config("sft", minutes=1.0, **kw)
    config.model.layout = "AFMF"
    config.batch_size, config.seq_len, config.eval_batches = 8, 64, 1  # 8 fake devices
    config.total_steps, config.log_every_steps, config.init_from = 2, 1, ""
    sft(config, kw["init_from"])  # the start every arm restores

    config.total_steps, config.eval_every_steps, config.init_from = 50, 1000, kw["init_from"]
    points = grpo_demo.run_arm("sft", config, str(tmp_path / "arm"), minutes=0.0)
    # A zero budget stops at the first row (the step-0 evaluation): SIGTERM, checkpoint after step 1.
    assert len(points) == 1 and points[0][0] > 0 and 0.0 <= points[0][1] <= 1.0
    with open(tmp_path / "arm" / grpo_demo.TIMELINE) as f:
        rows = [json.loads(line) for line in f]
    assert rows[0]["step"] == 0 and "eval_exact_match" in rows[0]
    ckpt = Checkpointer(str(tmp_path / "arm" / "run" / "checkpoints"), keep=1)
    assert ckpt.steps() == [1]
    ckpt.close()
    assert grpo_demo.finished(str(tmp_path / "arm"), 0.0) and not grpo_demo.finished(
        str(tmp_path / "arm"), 1.0
    )
    with pytest.raises(FileExistsError, match="an arm runs once per workdir"):
        grpo_demo.run_arm("sft", config, str(tmp_path / "arm"), minutes=0.0)
    assert data["train"] and os.path.exists(data["eval"])


def test_the_shipped_sft_start_scores_what_the_docs_say(tmp_path):
    """arithmetic.SFT_PARAMS is configs/sft_tiny.py's 46.0 % run: greedy exact match on the 500
    held-out prompts the documented data command writes. (Float sums differ with the XLA thread
    count, so a few borderline answers may flip: 44-48 %. A from-scratch model scores 0 %.)"""
    from configs import sft_tiny
    from turbos_jax.config import ModelConfig
    from turbos_jax.data.sft import make_format, read_examples
    from turbos_jax.generate import restore_params
    from turbos_jax.posttrain.evaluation import examples_exact_match

    files = arithmetic.write_task_files(
        str(tmp_path),
        num_train=0,
        num_eval=500,
        num_rl=0,
        seed=0,
        levels=(2,),
        operations=("add",),
        response="answer",
    )
    config = sft_tiny.get_config()
    fmt = make_format(config)
    graphdef, params, step = restore_params(
        ModelConfig.from_config(config.model), arithmetic.SFT_PARAMS, config
    )
    assert step == 1800
    examples = read_examples(files["eval"], fmt, key="eval_file")
    result = examples_exact_match(
        graphdef, params, examples, fmt, max_new_tokens=config.sft.max_new_tokens, batch_size=250
    )
    assert len(examples) == 500 and 0.44 <= result.accuracy <= 0.48, result.accuracy
