"""Rewards for GRPO: components, the TurboS shaping terms, and an aggregator that logs each part.

A component maps a batch of group-major responses to one float per response:

    fn(prompts: list[str], completions: list[str], metadata: list[dict]) -> (R,) array

Components here: `answer_reward` (the answer-consistency checker, 1/0), `code_reward` (fraction of
unit tests passed in the sandbox), and any model-based reward (a generative RM, a classifier) passed
as the same kind of callable. `score` calls each one under `guard`: an exception, a wrong length or
a non-finite value makes that component's rows failures, scored `failure_value` (0: never correct)
and counted, so a reward failure is never fatal and never silently a pass.

Shaping terms (TurboS §3.2.2, §3.4; the report gives no formulas, these are our interpretation):
  * repetition penalty: -(fraction of the response's token n-grams that repeat an earlier one);
  * length (long-CoT compression) reward, within a group and among its correct responses only
    (Kimi k1.5 form): 0.5 - (len - min) / (max - min) over the correct responses' lengths when at
    least two are correct and their lengths differ, else 0; incorrect responses get 0;
  * difficulty-adaptive weighting: the length reward of a group is scaled by its pass rate, so easy
    prompts (high pass rate) are pushed hard toward brevity and hard prompts hardly at all.
total = sum_c weight_c * component_c + w_rep * repetition + w_len * (pass rate if adaptive else 1)
* length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from turbos_jax.posttrain import answers, sandbox

RewardFn = Callable[[list[str], list[str], list[dict]], Sequence[float]]


def answer_reward(prompts, completions, metadata) -> np.ndarray:
    """1.0 where the response's final answer matches metadata["answer"], else 0.0."""
    pairs = zip(completions, metadata, strict=True)
    return np.array([float(answers.is_correct(c, m["answer"])) for c, m in pairs])


def extract_code(text: str) -> str:
    """The last ```python fenced block of a response (or the whole text if it has none)."""
    fence = "```"
    end = text.rfind(fence)
    start = text.rfind(fence, 0, end) if end > 0 else -1
    if start < 0:
        return text
    block = text[start + len(fence) : end]
    first_line, _, rest = block.partition("\n")
    return rest if first_line.strip().lower() in ("python", "py", "") else block


def code_reward(prompts, completions, metadata, limits: sandbox.Limits | None = None) -> np.ndarray:
    """Fraction of metadata["tests"] (assert snippets) the response's code passes in the sandbox.

    NaN (a reward failure: `score` counts it and scores 0) where no verdict is possible: a test
    snippet that does not compile (the record's fault; checked here, nothing runs), or a sandbox
    run with status "error" (the child died or reported nothing, e.g. a snippet calling
    os._exit). A response whose code fails, loops or exhausts memory gets its fraction (0 if its
    code does not run), which is a verdict, not a failure."""
    limits = sandbox.Limits() if limits is None else limits
    out = []
    for c, m in zip(completions, metadata, strict=True):
        tests = list(m["tests"])
        try:
            for i, t in enumerate(tests):
                compile(t, f"test_{i}", "exec")
        except (SyntaxError, ValueError, TypeError):
            out.append(np.nan)
            continue
        result = sandbox.run_python_tests(extract_code(c), tests, limits)
        out.append(np.nan if result.status == "error" else result.fraction)
    return np.array(out, np.float64)


def repetition_penalty(token_ids: Sequence[Sequence[int]], n: int = 3) -> np.ndarray:
    """-(repeated n-grams / n-grams) per response, in [-1, 0]; 0 for responses shorter than n + 1."""
    out = np.zeros(len(token_ids))
    for i, toks in enumerate(token_ids):
        grams = [tuple(toks[j : j + n]) for j in range(len(toks) - n + 1)]
        if len(grams) > 1:
            out[i] = -(1.0 - len(set(grams)) / len(grams))
    return out


def length_reward(lengths: np.ndarray, correct: np.ndarray, group_size: int) -> np.ndarray:
    """Kimi-form compression reward among each group's correct responses (module docstring)."""
    lengths = np.asarray(lengths, np.float64).reshape(-1, group_size)
    ok = np.asarray(correct, bool).reshape(-1, group_size)
    out = np.zeros_like(lengths)
    for g in range(lengths.shape[0]):
        if ok[g].sum() < 2:
            continue
        lo, hi = lengths[g][ok[g]].min(), lengths[g][ok[g]].max()
        if hi > lo:
            out[g] = np.where(ok[g], 0.5 - (lengths[g] - lo) / (hi - lo), 0.0)
    return out.reshape(-1)


def pass_rates(correct: np.ndarray, group_size: int) -> np.ndarray:
    """(R,) the pass rate of each row's group."""
    c = np.asarray(correct, np.float64).reshape(-1, group_size)
    return np.repeat(c.mean(axis=1), group_size)


def guard(fn: RewardFn, prompts, completions, metadata, failure_value: float = 0.0):
    """Calls a component; returns ((R,) float64 scores, (R,) bool failed). Never raises."""
    n = len(completions)
    try:
        values = np.asarray(fn(prompts, completions, metadata), np.float64)
        if values.shape != (n,):
            raise ValueError(f"returned shape {values.shape}, expected ({n},)")
    except Exception:  # a broken reward service must not stop the run (counted below)
        return np.full(n, failure_value), np.ones(n, bool)
    failed = ~np.isfinite(values)
    return np.where(failed, failure_value, values), failed


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """What `score` computes: weighted components plus shaping. `correctness` names the component
    whose value 1.0 means "correct" (for pass rates and the length reward)."""

    components: dict[str, tuple[RewardFn, float]]  # name -> (fn, weight)
    correctness: str = "answer"
    repetition_weight: float = 0.0
    repetition_ngram: int = 3
    length_weight: float = 0.0
    difficulty_adaptive: bool = False


def score(spec: RewardSpec, prompts, completions, metadata, token_ids, group_size: int, labels=None):
    """-> ((R,) total rewards, {name: (R,) values}, metrics) for group-major responses.

    metrics: reward/<name> (mean), reward_failures/<name> (count), reward/total, pass_rate; with
    `labels` (R,) (e.g. each row's prompt source) also reward_failures/<name>/<label> (count)."""
    parts, failures = {}, {}
    for name, (fn, _) in spec.components.items():
        parts[name], failures[name] = guard(fn, prompts, completions, metadata)
    total = sum(weight * parts[name] for name, (_, weight) in spec.components.items())
    correct = parts[spec.correctness] >= 1.0  # RewardSpec names a component (checked by the caller)
    if spec.repetition_weight:
        parts["repetition"] = repetition_penalty(token_ids, spec.repetition_ngram)
        total = total + spec.repetition_weight * parts["repetition"]
    if spec.length_weight:
        lengths = np.array([len(t) for t in token_ids])
        scale = pass_rates(correct, group_size) if spec.difficulty_adaptive else 1.0
        parts["length"] = scale * length_reward(lengths, correct, group_size)
        total = total + spec.length_weight * parts["length"]
    metrics = {f"reward/{k}": float(np.mean(v)) for k, v in parts.items()}
    metrics |= {f"reward_failures/{k}": int(v.sum()) for k, v in failures.items()}
    metrics |= {"reward/total": float(np.mean(total)), "pass_rate": float(np.mean(correct))}
    if labels is not None:
        labels = np.asarray(labels)
        for label in sorted(set(labels.tolist())):
            on = labels == label
            metrics |= {f"reward_failures/{k}/{label}": int(v[on].sum()) for k, v in failures.items()}
    return np.asarray(total, np.float64), parts, metrics
