"""Rewards (turbos_jax/posttrain/rewards.py): the answer checker as a reward, code rewards through
the sandbox, repetition, the length (compression) reward among correct responses, the difficulty
weighting, and the aggregator's per-component metrics and failure accounting."""

import numpy as np

from turbos_jax.posttrain import rewards as W

G = 4


def test_answer_and_code_rewards():
    meta = [{"answer": "734"}, {"answer": "734"}, {"answer": "12"}]
    got = W.answer_reward(None, ["8+6=14 #### 734", "#### 735", "12 cm"], meta)
    assert got.tolist() == [1.0, 0.0, 1.0]
    code = "Here:\n```python\ndef sq(x):\n    return x * x\n```\n"
    meta = [{"tests": ["assert sq(3) == 9", "assert sq(2) == 4"]}] * 2
    assert W.extract_code(code).strip() == "def sq(x):\n    return x * x"
    got = W.code_reward(None, [code, "def sq(x): return x + x"], meta)
    assert got.tolist() == [1.0, 0.5]  # x + x passes only sq(2) == 4


def test_code_records_without_a_verdict_are_failures_not_zeros():
    """A test snippet that does not compile, or that kills the sandbox's child, gives no verdict:
    NaN, which `score` counts as a failure (scored 0) for that row only; per-source counts."""
    code = "def sq(x): return x * x"
    meta = [
        {"tests": ["assert sq(3) == 9"], "kind": "code"},
        {"tests": ["assert sq(3 =="], "kind": "code"},
        {"tests": ["import os; os._exit(0)"], "kind": "code"},
        {"tests": ["assert sq(3) == 10"], "kind": "code"},
    ]
    got = W.code_reward(None, [code] * 4, meta)
    assert got[0] == 1.0 and np.isnan(got[1]) and np.isnan(got[2]) and got[3] == 0.0
    spec = W.RewardSpec({"code": (W.code_reward, 1.0)}, correctness="code")
    total, _, metrics = W.score(spec, [""] * 4, [code] * 4, meta, [[1]] * 4, 2, labels=["a", "a", "b", "b"])
    assert total.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert metrics["reward_failures/code"] == 2
    assert metrics["reward_failures/code/a"] == metrics["reward_failures/code/b"] == 1


def test_repetition_penalty():
    got = W.repetition_penalty([[1, 2, 3, 4, 5, 6], [7, 7, 7, 7, 7, 7], [1, 2, 3, 1, 2, 3], [1, 2]], n=3)
    # n-grams: all distinct; 4 identical (3 repeats of 4); 123 231 312 123 (1 repeat of 4); too short.
    np.testing.assert_allclose(got, [0.0, -0.75, -0.25, 0.0])


def test_length_reward_among_correct_and_difficulty_weighting():
    lengths = np.array([10, 20, 30, 5, 10, 20, 30, 40])
    correct = np.array([1, 1, 1, 0, 1, 0, 0, 0], bool)
    got = W.length_reward(lengths, correct, G)
    # Group 0: correct lengths 10..30 -> 0.5, 0, -0.5; the incorrect (shortest) row gets 0.
    # Group 1: a single correct response -> nothing to compare, all 0.
    np.testing.assert_allclose(got, [0.5, 0.0, -0.5, 0.0, 0, 0, 0, 0])
    np.testing.assert_allclose(W.pass_rates(correct, G), [0.75] * 4 + [0.25] * 4)
    # Correct responses always outscore incorrect ones with length_weight <= 1.
    spec = W.RewardSpec({"answer": (lambda p, c, m: correct.astype(float), 1.0)}, length_weight=1.0)
    total, parts, _ = W.score(spec, [""] * 8, [""] * 8, [{}] * 8, [[0] * n for n in lengths], G)
    assert total[correct].min() > total[~correct].max()
    adaptive = W.RewardSpec(spec.components, length_weight=1.0, difficulty_adaptive=True)
    _, parts_a, _ = W.score(adaptive, [""] * 8, [""] * 8, [{}] * 8, [[0] * n for n in lengths], G)
    np.testing.assert_allclose(parts_a["length"], 0.75 * parts["length"])  # scaled by pass rate


def test_aggregator_counts_failures_and_never_scores_them_correct():
    def flaky(prompts, completions, metadata):
        if len(completions) > 2:
            raise RuntimeError("reward service down")
        return [1.0, 1.0]

    def model_rm(prompts, completions, metadata):  # a model-based reward: one NaN
        return np.array([0.2, np.nan, 0.8, 0.5])

    spec = W.RewardSpec(
        {"answer": (W.answer_reward, 1.0), "flaky": (flaky, 0.5), "rm": (model_rm, 0.25)},
        repetition_weight=0.1,
    )
    meta = [{"answer": "5"}] * 4
    total, parts, metrics = W.score(spec, ["2+3="] * 4, ["5", "#### 5", "6", "five"], meta, [[53]] * 4, G)
    assert parts["flaky"].tolist() == [0.0] * 4 and metrics["reward_failures/flaky"] == 4
    assert parts["rm"].tolist() == [0.2, 0.0, 0.8, 0.5] and metrics["reward_failures/rm"] == 1
    np.testing.assert_allclose(total, [1.05, 1.0, 0.2, 0.125])
    assert metrics["reward/answer"] == 0.5 and metrics["pass_rate"] == 0.5
    assert metrics["reward_failures/answer"] == 0 and "reward/repetition" in metrics
    assert abs(metrics["reward/total"] - total.mean()) < 1e-12
