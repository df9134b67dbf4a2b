"""`config.rl` (configs/grpo_tiny.py documents every key): validation with one-line errors naming
the key, and the typed objects the GRPO iteration takes (Settings, Phases, RewardSpec)."""

from __future__ import annotations

import importlib
import math

from turbos_jax.config import ConfigError
from turbos_jax.posttrain import advantages, grpo, grpo_loss, rewards
from turbos_jax.posttrain.prompts import KINDS

_FLOATS = ("temperature", "epsilon_low", "epsilon_high", "kl_clip", "bon_coef", "sign_anchor_tau")
_FLOATS += ("sign_anchor_min", "length_weight", "repetition_weight", "reward_model_weight", "is_cap")
_INTS = ("num_generations", "max_prompt_len", "max_new_tokens", "max_gen_batches")
_BOOLS = ("dynamic_sampling", "mask_truncated", "difficulty_adaptive", "int8_rollouts", "shuffle_rewards")
_STRS = ("loss_agg", "scale_rewards", "reward_model")
RL_KEYS = ("sources", "phases", *_FLOATS, *_INTS, *_BOOLS, *_STRS)


def check_rl_config(config) -> None:
    """config.rl's keys and their agreement with the run keys; ConfigError naming the key."""
    if "rl" not in config:
        raise ConfigError("config.rl: required block is missing (see configs/grpo_tiny.py)")
    r = config.rl
    for key in RL_KEYS:
        if key not in r:
            raise ConfigError(f"config.rl.{key}: required key is missing")
    unknown = sorted(set(r.keys()) - set(RL_KEYS))
    if unknown:
        raise ConfigError(f"config.rl.{unknown[0]}: unknown key (known: {', '.join(RL_KEYS)})")

    def fail(key, msg):
        raise ConfigError(f"config.rl.{key}={r[key]!r}: {msg}")

    for key in _FLOATS:
        if isinstance(r[key], bool) or not isinstance(r[key], (int, float)) or not math.isfinite(r[key]):
            fail(key, "expected a finite number")
    for key in _INTS:
        if isinstance(r[key], bool) or not isinstance(r[key], int) or r[key] < 1:
            fail(key, "expected an integer >= 1")
    for key in _BOOLS:
        if not isinstance(r[key], bool):
            fail(key, "expected True or False")
    for key in _STRS:
        if not isinstance(r[key], str):
            fail(key, "expected a string")
    if r.num_generations < 2:
        fail("num_generations", "GRPO needs at least 2 responses per prompt")
    if r.temperature <= 0:
        fail("temperature", "must be > 0 (RL samples from the policy)")
    if r.loss_agg not in grpo_loss.LOSS_AGGREGATIONS:
        fail("loss_agg", f"expected one of {grpo_loss.LOSS_AGGREGATIONS}")
    if r.scale_rewards not in advantages.SCALES:
        fail("scale_rewards", f"expected one of {advantages.SCALES}")
    for key in ("epsilon_low", "epsilon_high", "kl_clip", "bon_coef", "sign_anchor_min", "is_cap"):
        if r[key] < 0:
            fail(key, "must be >= 0")
    if config.batch_size % r.num_generations:
        raise ConfigError(
            f"config.batch_size={config.batch_size}: must be prompts per step x "
            f"config.rl.num_generations={r.num_generations}"
        )
    if config.seq_len != r.max_prompt_len + r.max_new_tokens - 1:
        raise ConfigError(
            f"config.seq_len={config.seq_len}: must be config.rl.max_prompt_len + max_new_tokens - 1 "
            f"= {r.max_prompt_len + r.max_new_tokens - 1}"
        )
    if r.reward_model and ":" not in r.reward_model:
        fail("reward_model", "expected 'module:function' or ''")
    _check_sources(r)
    _check_phases(r, config.total_steps)


def _check_sources(r) -> None:
    if not hasattr(r.sources, "items") or not r.sources:  # a ConfigDict in a config file
        raise ConfigError(f"config.rl.sources={r.sources!r}: expected {{name: (kind, jsonl path)}}")
    for name, spec in r.sources.items():
        if not (
            isinstance(spec, (tuple, list))
            and len(spec) == 2
            and spec[0] in KINDS
            and isinstance(spec[1], str)
        ):
            raise ConfigError(f"config.rl.sources[{name!r}]={spec!r}: expected (kind in {KINDS}, path)")


def _check_phases(r, total_steps: int) -> None:
    if not isinstance(r.phases, (tuple, list)) or not r.phases:
        raise ConfigError(
            f"config.rl.phases={r.phases!r}: expected ((last_step, beta, {{source: weight}}), ...)"
        )
    previous = 0
    for i, phase in enumerate(r.phases):
        where = f"config.rl.phases[{i}]={phase!r}"
        if not (isinstance(phase, (tuple, list)) and len(phase) == 3):
            raise ConfigError(f"{where}: expected (last_step, beta, {{source: weight}})")
        until, beta, mixture = phase
        if isinstance(until, bool) or not isinstance(until, int) or until <= previous:
            raise ConfigError(f"{where}: last steps must be integers increasing from 1")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
            raise ConfigError(f"{where}: beta must be a number >= 0")
        if not hasattr(mixture, "items") or not mixture or any(s not in r.sources for s in mixture):
            raise ConfigError(f"{where}: mixture must name sources of config.rl.sources {sorted(r.sources)}")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in mixture.values()):
            raise ConfigError(f"{where}: mixture weights must be numbers >= 0")
        if sum(mixture.values()) <= 0:
            raise ConfigError(f"{where}: mixture weights sum to 0")
        previous = until
    if previous < total_steps:
        raise ConfigError(
            f"config.rl.phases: the last phase ends at step {previous} < config.total_steps={total_steps}"
        )


def settings(config) -> grpo.Settings:
    r = config.rl
    return grpo.Settings(
        group_size=r.num_generations,
        max_prompt_len=r.max_prompt_len,
        max_new_tokens=r.max_new_tokens,
        temperature=float(r.temperature),
        scale_rewards=r.scale_rewards,
        adv_eps=1e-6,
        sign_anchor_tau=None if r.sign_anchor_tau < 0 else float(r.sign_anchor_tau),
        sign_anchor_min=float(r.sign_anchor_min),
        dynamic_sampling=r.dynamic_sampling,
        max_gen_batches=r.max_gen_batches,
        mask_truncated=r.mask_truncated,
        int8_rollouts=r.int8_rollouts,
        is_cap=float(r.is_cap),
        seed=config.seed,
        shuffle_rewards=r.shuffle_rewards,
    )


def phases(config) -> list[grpo.Phase]:
    r = config.rl
    out = []
    for until, beta, mixture in r.phases:
        loss = grpo_loss.LossParams(
            epsilon_low=float(r.epsilon_low),
            epsilon_high=float(r.epsilon_high),
            beta=float(beta),
            kl_clip=float(r.kl_clip),
            bon_coef=float(r.bon_coef),
            temperature=float(r.temperature),
            loss_agg=r.loss_agg,
        )
        out.append(grpo.Phase(int(until), loss, {k: float(v) for k, v in mixture.items()}))
    return out


def verifiable_reward(prompts, completions, metadata):
    """1/0 answer check for "answer" records, fraction of unit tests passed for "code" records.
    A row whose verifier raises is NaN (a failure `rewards.score` counts and scores 0): one bad
    record must not fail the other rows of the batch."""
    out = []
    for p, c, m in zip(prompts, completions, metadata, strict=True):
        fn = rewards.answer_reward if m["kind"] == "answer" else rewards.code_reward
        try:
            out.append(float(fn([p], [c], [m])[0]))
        except Exception:  # counted by rewards.score, never fatal
            out.append(float("nan"))
    return out


def reward_spec(config) -> rewards.RewardSpec:
    """ "correct" (the verifier of each record's kind), plus the configured model-based reward."""
    r = config.rl
    components = {"correct": (verifiable_reward, 1.0)}
    if r.reward_model:
        module, _, name = r.reward_model.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"config.rl.reward_model={r.reward_model!r}: cannot import ({e})") from None
        components["model"] = (fn, float(r.reward_model_weight))
    return rewards.RewardSpec(
        components,
        correctness="correct",
        repetition_weight=float(r.repetition_weight),
        length_weight=float(r.length_weight),
        difficulty_adaptive=r.difficulty_adaptive,
    )
