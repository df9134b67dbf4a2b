"""Group-relative advantages, the report's sign-anchored group reward adjustment, and dynamic sampling.

Rows are group-major: the G responses to prompt p are rows p*G .. p*G + G - 1 (contiguous), so a
(N*G,) reward vector reshapes to (N, G). All functions are numpy on the host.

Group reward adjustment (TurboS §3.5.2: rewards rescaled within each prompt's group so undesirable
answers get negative and desirable ones positive advantage; the formula is not given, this is our
interpretation):
  1. z_i = (r_i - mean_group) / (std_group + eps), std with ddof 1 (`group_advantages`).
  2. a response whose reward reaches `tau` (desirable) gets max(z_i, a_min); one below gets
     min(z_i, -a_min) (`sign_anchor`). A correct answer in a group of mostly better-rewarded correct
     answers (e.g. after a length reward) thus keeps a positive advantage, and an incorrect one is
     never pushed up. With binary rewards, tau = 0.5 and a_min < 1/sqrt(G) mixed groups are unchanged.

Dynamic sampling (DAPO; TurboS): groups whose rewards are all equal have zero advantage and no
gradient, so they are dropped and more prompts sampled until `groups_needed` survive, at most
`max_gen_batches` generation rounds. If the cap is reached the batch is completed with dropped
groups marked invalid (`valid` = False: their loss mask is zeroed), so the update keeps its shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SCALES = ("group", "batch", "none")


def by_group(values: np.ndarray, group_size: int) -> np.ndarray:
    """(N*G,) -> (N, G); a row count that is not a multiple of G is an error."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or values.size % group_size:
        raise ValueError(f"expected (N*{group_size},) values, got shape {values.shape}")
    return values.reshape(-1, group_size)


def zero_std_groups(rewards: np.ndarray, group_size: int) -> np.ndarray:
    """(N,) bool: groups whose G rewards are exactly equal (no spread, no gradient)."""
    r = by_group(rewards, group_size)
    return np.all(r == r[:, :1], axis=1)


def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-6) -> np.ndarray:
    """(N*G,) rewards -> (N*G,) fp32 advantages r - mean_group, divided by the group's std (ddof 1,
    "group"), the whole batch's std ("batch") or nothing ("none", Dr. GRPO)."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: GRPO needs at least 2 responses per prompt")
    r = by_group(rewards, group_size)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (r.std(axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std(ddof=1) + eps)
    return centred.reshape(-1).astype(np.float32)


def sign_anchor(advantages: np.ndarray, rewards: np.ndarray, tau: float, a_min: float) -> np.ndarray:
    """Step 2 of the module docstring: desirable (r >= tau) -> >= a_min, the rest -> <= -a_min.

    Rows of groups with no reward spread should be dropped before (their z is 0 by construction)."""
    adv, r = np.asarray(advantages, np.float32), np.asarray(rewards)
    if a_min < 0:
        raise ValueError(f"a_min={a_min}: must be >= 0")
    return np.where(r >= tau, np.maximum(adv, a_min), np.minimum(adv, -a_min)).astype(np.float32)


def collect_groups(
    sample: Callable[[int], dict[str, np.ndarray]],
    groups_needed: int,
    group_size: int,
    max_gen_batches: int,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Dynamic sampling: calls `sample(round)` until `groups_needed` groups with reward spread exist.

    `sample` returns group-major arrays (leading dimension rows = groups * G) including "rewards".
    Returns (exactly groups_needed * G rows of every array, plus "valid" (rows,) bool), and stats:
    num_gen_batches, frac_zero_std (over every generated group), groups_invalid (filled-in groups).
    """
    kept, dropped, n_groups, n_zero = [], [], 0, 0
    rounds = 0
    while rounds < max_gen_batches and sum(len(k["rewards"]) for k in kept) < groups_needed * group_size:
        batch = sample(rounds)
        rounds += 1
        flat = zero_std_groups(batch["rewards"], group_size)
        n_groups += flat.size
        n_zero += int(flat.sum())
        rows_kept = np.repeat(~flat, group_size)
        kept.append({k: v[rows_kept] for k, v in batch.items()})
        dropped.append({k: v[~rows_kept] for k, v in batch.items()})
    good = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
    need = groups_needed * group_size
    n_good = min(len(good["rewards"]), need)
    out = {k: v[:n_good] for k, v in good.items()}
    valid = np.ones(n_good, bool)
    if n_good < need:  # cap reached: complete the shape with flat groups that carry no loss
        flat = {k: np.concatenate([b[k] for b in dropped]) for k in dropped[0]}
        fill = need - n_good
        if len(flat["rewards"]) < fill:
            raise ValueError(f"sample() returned {n_groups} groups in {rounds} rounds; need {groups_needed}")
        out = {k: np.concatenate([out[k], flat[k][:fill]]) for k in out}
        valid = np.concatenate([valid, np.zeros(fill, bool)])
    out["valid"] = valid
    stats = {
        "num_gen_batches": rounds,
        "frac_zero_std": n_zero / max(n_groups, 1),
        "groups_invalid": int((~valid).sum()) // group_size,
    }
    return out, stats
