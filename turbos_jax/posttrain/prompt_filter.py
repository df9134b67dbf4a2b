r"""Prompt filtering (TurboS §3.5.2): keep the prompts the policy solves sometimes but not always.

    python -m turbos_jax.posttrain.prompt_filter --config=configs/grpo_tiny.py \
        --init_from=SFT_WORKDIR --prompts=rl_prompts.jsonl --out=filtered.jsonl --k=8

1. Every prompt is sampled K times from the policy (the newest checkpoint of --init_from) at the
   RL temperature, through the same rollout path as GRPO (rollouts.sample_groups).
2. Each response is scored by the prompt's verifier (answer checker or code sandbox) and the pass
   rate is the fraction of correct responses (Kimi k1.5 uses the same estimate of difficulty).
3. Prompts with low < pass rate < high are written to --out (input lines unchanged, plus
   "pass_rate"); the rest carry no GRPO signal (all-equal groups) and are dropped. A histogram of
   pass rates is printed.
A prompt whose reward fails (checker exception, sandbox crash) counts as not solved and is counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np

from turbos_jax.posttrain import rewards
from turbos_jax.posttrain import rollouts as ro_lib
from turbos_jax.posttrain.grpo import decode_responses


def pass_rates(
    graphdef,
    params,
    records: Sequence[dict],
    *,
    text,
    k: int,
    max_prompt_len: int,
    max_new_tokens: int,
    prompts_per_batch: int,
    temperature: float,
    seed: int,
    reward_spec: rewards.RewardSpec,
) -> tuple[np.ndarray, int]:
    """Steps 1-2 -> ((N,) pass rates, reward failures). Batches hold `prompts_per_batch` prompts
    (the last one padded with copies of its first prompt, so one program is compiled)."""
    rates, failures = [], 0
    for start in range(0, len(records), prompts_per_batch):
        chunk = list(records[start : start + prompts_per_batch])
        real = len(chunk)
        chunk += [chunk[0]] * (prompts_per_batch - real)
        texts_in = [r["prompt"] for r in chunk]
        prompts, lengths = ro_lib.encode_prompts(text.prompt_ids, texts_in, max_prompt_len)
        ro = ro_lib.sample_groups(
            graphdef,
            params,
            prompts,
            lengths,
            group_size=k,
            max_new_tokens=max_new_tokens,
            rng=jax.random.fold_in(jax.random.key(seed), start),
            eos_id=text.stop_id,
            temperature=temperature,
        )
        texts, ids = decode_responses(text, ro)
        meta = [r for r in chunk for _ in range(k)]
        _, parts, metrics = rewards.score(reward_spec, [m["prompt"] for m in meta], texts, meta, ids, k)
        correct = parts[reward_spec.correctness] >= 1.0
        rates.extend(rewards.pass_rates(correct, k)[::k][:real].tolist())
        failures += sum(v for key, v in metrics.items() if key.startswith("reward_failures/"))
    return np.asarray(rates), failures


def keep_mask(rates: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Step 3: low < rate < high (strict: always- and never-solved prompts go)."""
    return (rates > low) & (rates < high)


def histogram(rates: np.ndarray, k: int) -> str:
    """One line per possible pass rate i/k: count and a bar."""
    counts = np.bincount(np.rint(rates * k).astype(int), minlength=k + 1)
    width = max(1, int(counts.max()))
    return "\n".join(f"{i}/{k}: {c:6d} {'#' * int(40 * c / width)}" for i, c in enumerate(counts))


def write_filtered(path: str, lines: Sequence[dict], rates: np.ndarray, keep: np.ndarray) -> int:
    """Writes kept input records with their "pass_rate"; returns how many."""
    with open(path, "w") as f:
        for row, rate, ok in zip(lines, rates, keep, strict=True):
            if ok:
                f.write(json.dumps({**row, "pass_rate": float(rate)}) + "\n")
    return int(keep.sum())
