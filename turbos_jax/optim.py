"""The optimizer: global-norm clipping, then AdamW on a chained learning-rate schedule.

`config.optim.schedule` is a tuple of `(kind, steps, end_lr)` phases run back to back, counted in
optimizer updates (optax's count: the first update uses the LR at step 0). Every phase starts where
the previous one ended (0 before the first phase):

  warmup    linear from the previous end to end_lr over `steps` (from 0 when it comes first).
  cosine    half-cosine from the previous end to end_lr over `steps` (the long main decay).
  anneal    the same half-cosine curve; it differs from `cosine` only in its role and length, the
            report's short "fast cosine decay to 5e-6" at the end of pre-training.
  constant  end_lr for `steps`; if end_lr differs from the previous end, the LR jumps at the first
            step of the phase.

After the last phase the LR stays at the last end_lr. The LR is continuous at every boundary except
a constant phase's jump; at a boundary step the next phase's first value applies (= previous end).

Weight decay (decoupled, AdamW) applies to matmul and conv kernels only. Not decayed, by the
parameter's own name: norm `scale`s, biases (`bias`, `*_bias`: the conv biases and `dt_bias`), the
Mamba2 `A_log` and `D`, and the token `embedding` table. Decaying these would pull them towards 0,
which is not a neutral prior for them: a norm scale towards 0 shrinks the residual stream, A_log and
dt_bias set the SSM time scales, D is a skip gain, and embedding rows of rare tokens (few gradients)
would decay to nothing between their updates. The untied LM head is a matmul and is decayed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from turbos_jax.config import ConfigError

SCHEDULE_KINDS = ("warmup", "cosine", "anneal", "constant")
OPTIM_KEYS = ("schedule", "b1", "b2", "eps", "weight_decay", "grad_clip")
NO_DECAY_NAMES = ("scale", "bias", "A_log", "D", "embedding")


# ---------------------------------------------------------------------- schedule
def _check_phase(i: int, phase) -> tuple[str, int, float]:
    where = f"config.optim.schedule[{i}]={phase!r}"
    if not isinstance(phase, (tuple, list)) or len(phase) != 3:
        raise ConfigError(f"{where}: expected a (kind, steps, end_lr) triple")
    kind, steps, end_lr = phase
    if kind not in SCHEDULE_KINDS:
        raise ConfigError(f"{where}: unknown kind {kind!r}; expected one of {SCHEDULE_KINDS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise ConfigError(f"{where}: steps must be a positive integer")
    if isinstance(end_lr, bool) or not isinstance(end_lr, (int, float)):
        raise ConfigError(f"{where}: end_lr must be a number")
    if not math.isfinite(end_lr) or end_lr < 0:
        raise ConfigError(f"{where}: end_lr must be finite and >= 0")
    return kind, steps, float(end_lr)


def _cosine(init: float, end: float, steps: int) -> optax.Schedule:
    """Half-cosine from `init` (count 0) to `end` (count >= steps); either direction."""

    def schedule(count):
        frac = jnp.clip(jnp.asarray(count, jnp.float32) / steps, 0.0, 1.0)
        return end + (init - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def make_schedule(schedule_cfg) -> optax.Schedule:
    """`config.optim.schedule` -> an optax schedule (count -> LR), see the module docstring."""
    if isinstance(schedule_cfg, (str, bytes)) or not isinstance(schedule_cfg, (tuple, list)):
        raise ConfigError(
            f"config.optim.schedule={schedule_cfg!r}: expected a tuple of (kind, steps, end_lr) phases"
        )
    if not schedule_cfg:
        raise ConfigError("config.optim.schedule=(): needs at least one phase")
    schedules, boundaries = [], []
    start, step = 0.0, 0
    for i, phase in enumerate(schedule_cfg):
        kind, steps, end = _check_phase(i, phase)
        if kind == "warmup":
            schedules.append(optax.linear_schedule(start, end, steps))
        elif kind in ("cosine", "anneal"):
            schedules.append(_cosine(start, end, steps))
        else:
            schedules.append(optax.constant_schedule(end))
        step += steps
        boundaries.append(step)
        start = end
    if len(schedules) == 1:
        return schedules[0]
    return optax.join_schedules(schedules, boundaries[:-1])


def learning_rate_at(schedule: optax.Schedule, step) -> float:
    """The LR the schedule gives for update number `step` (0-based optax count), as a float."""
    return float(jax.device_get(schedule(step)))


def schedule_length(schedule_cfg) -> int:
    """Total steps covered by the phases (the LR is flat at the last end_lr after this)."""
    return sum(_check_phase(i, p)[1] for i, p in enumerate(schedule_cfg))


# ---------------------------------------------------------------------- weight-decay mask
def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def param_name(path) -> str:
    """A parameter's own name from a pytree path; a trailing `value` (the array inside an
    `nnx.Param` when a State is flattened to arrays) is skipped, so State and pure dicts agree."""
    names = [_key_name(k) for k in path]
    while len(names) > 1 and names[-1] == "value":
        names.pop()
    return names[-1] if names else ""


def is_decayed(name: str) -> bool:
    return not (name in NO_DECAY_NAMES or name.endswith("_bias"))


def decay_mask(params):
    """Bool pytree matching `params` (an `nnx.State` of Params or a pure dict): True = decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_decayed(param_name(path)), params)


# ---------------------------------------------------------------------- optimizer
def _get(optim_cfg, key):
    data = optim_cfg if isinstance(optim_cfg, Mapping) else optim_cfg.to_dict()
    unknown = sorted(set(data) - set(OPTIM_KEYS))
    if unknown:
        raise ConfigError(f"config.optim.{unknown[0]}: unknown key (known: {list(OPTIM_KEYS)})")
    if key not in data:
        raise ConfigError(f"config.optim.{key}: required key is missing")
    return data[key]


def _number(optim_cfg, key, ok, rule: str) -> float:
    value = _get(optim_cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ConfigError(f"config.optim.{key}={value!r}: {rule}")
    return float(value)


def make_optimizer(optim_cfg) -> optax.GradientTransformation:
    """`config.optim` -> clip_by_global_norm(grad_clip) then AdamW with the schedule and the
    decay mask. `grad_clip` = 0 turns clipping off. Works on an `nnx.State` of Params."""
    schedule = make_schedule(_get(optim_cfg, "schedule"))
    b1 = _number(optim_cfg, "b1", lambda v: 0 <= v < 1, "must be in [0, 1)")
    b2 = _number(optim_cfg, "b2", lambda v: 0 <= v < 1, "must be in [0, 1)")
    eps = _number(optim_cfg, "eps", lambda v: 0 < v < math.inf, "must be > 0")
    wd = _number(optim_cfg, "weight_decay", lambda v: 0 <= v < math.inf, "must be >= 0")
    clip = _number(optim_cfg, "grad_clip", lambda v: 0 <= v < math.inf, "must be >= 0 (0 = off)")
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
    if clip == 0:
        return adamw
    return optax.chain(optax.clip_by_global_norm(clip), adamw)
