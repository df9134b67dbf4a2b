"""config.rl validation (turbos_jax/posttrain/grpo_config.py): the shipped config's block passes,
each bad value is a one-line ConfigError naming its key, and phases / settings / rewards are built."""

import re

import pytest

from turbos_jax.config import ConfigError
from turbos_jax.posttrain import grpo_config


def _config():
    from configs import grpo_tiny

    return grpo_tiny.get_config()


def test_shipped_config_and_objects():
    config = _config()
    grpo_config.check_rl_config(config)
    phases = grpo_config.phases(config)
    assert [p.until_step for p in phases] == [150, 200] and phases[1].loss.beta > phases[0].loss.beta
    assert phases[1].mixture == {"math": 0.1, "general": 0.9}
    s = grpo_config.settings(config)
    assert s.group_size == 8 and s.temperature == 1.0 and s.sign_anchor_tau == 0.5
    spec = grpo_config.reward_spec(config)
    meta = [{"kind": "answer", "answer": "2"}, {"kind": "code", "tests": ["assert f() == 2"]}]
    got = spec.components["correct"][0](["1+1=", "f"], ["#### 2", "def f(): return 1"], meta)
    assert got == [1.0, 0.0]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_generations", 1, "config.rl.num_generations=1: GRPO needs at least 2"),
        ("temperature", 0.0, "config.rl.temperature=0.0: must be > 0"),
        ("loss_agg", "seq-sum", "config.rl.loss_agg='seq-sum': expected one of"),
        ("sources", {"math": ("essay", "x.jsonl")}, "config.rl.sources['math']="),
        ("phases", ((100, 0.001, {"math": 1.0}),), "last phase ends at step 100 < config.total_steps=200"),
        ("phases", ((200, 0.001, {"logic": 1.0}),), "mixture must name sources"),
        ("reward_model", "nomodule", "config.rl.reward_model='nomodule': expected 'module:function'"),
        ("max_new_tokens", 41, "config.seq_len=17: must be config.rl.max_prompt_len + max_new_tokens - 1"),
    ],
)
def test_bad_values_name_their_key(key, value, message):
    config = _config()
    with config.unlocked():
        config.rl[key] = value
    with pytest.raises(ConfigError, match=re.escape(message)):
        grpo_config.check_rl_config(config)


def test_missing_and_unknown_keys():
    config = _config()
    with config.unlocked():
        del config.rl["bon_coef"]
    with pytest.raises(ConfigError, match="config.rl.bon_coef: required key is missing"):
        grpo_config.check_rl_config(config)
    config = _config()
    with config.unlocked():
        config.rl.beta = 0.1
    with pytest.raises(ConfigError, match="config.rl.beta: unknown key"):
        grpo_config.check_rl_config(config)
