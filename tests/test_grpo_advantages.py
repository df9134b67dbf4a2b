"""Advantages and batches (turbos_jax/posttrain/advantages.py): group z-scores on hand values, the
sign-anchored adjustment, zero-spread groups, and dynamic sampling with its refill cap."""

import numpy as np
import pytest

from turbos_jax.posttrain import advantages as A


def test_group_advantages_hand_values():
    r = np.array([1, 0, 0, 1, 3, 1, 2, 2], float)
    got = A.group_advantages(r, 4, eps=0.0)
    s = np.std([1, 0, 0, 1], ddof=1)  # 0.5774
    np.testing.assert_allclose(got[:4], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rtol=1e-6)
    np.testing.assert_allclose(got[4:], [1 / np.std([3, 1, 2, 2], ddof=1), -1 / 0.8165, 0, 0], rtol=1e-4)
    np.testing.assert_allclose(A.group_advantages(r, 4, "none"), [0.5, -0.5, -0.5, 0.5, 1, -1, 0, 0])
    np.testing.assert_allclose(
        A.group_advantages(r, 4, "batch", eps=0.0)[:4], [0.5, -0.5, -0.5, 0.5] / np.std(r, ddof=1)
    )
    # Interleaved layout (prompts p0 p1 p0 p1 ...) would give a different answer: rows are groups.
    assert not np.allclose(A.group_advantages(r.reshape(4, 2).T.ravel(), 4), got)
    with pytest.raises(ValueError, match="group_size=1"):
        A.group_advantages(r, 1)


def test_sign_anchor():
    # Binary rewards, G = 4, a_min < 1/sqrt(G): mixed groups are unchanged.
    r = np.array([1, 0, 0, 0, 1, 1, 1, 0], float)
    z = A.group_advantages(r, 4)
    np.testing.assert_array_equal(A.sign_anchor(z, r, tau=0.5, a_min=0.1), z)
    # Shaped rewards (correct + a length term): the long correct answer's z is negative, anchoring
    # keeps it positive; an incorrect answer above the group mean is pushed negative.
    shaped = np.array([1.5, 1.4, 0.0, 0.6, 0.0, 0.1, 0.45, 1.0])  # tau = 0.5: rows 0, 1, 3, 7 desirable
    z = A.group_advantages(shaped, 4)
    anchored = A.sign_anchor(z, shaped, tau=0.5, a_min=0.05)
    assert (anchored[[0, 1, 3, 7]] >= 0.05).all() and (anchored[[2, 4, 5, 6]] <= -0.05).all()
    assert anchored[0] == z[0] and anchored[2] == z[2]  # already on the right side: untouched
    assert z[3] < 0 and anchored[3] == np.float32(0.05)  # correct but below its group's mean
    assert z[6] > 0 and anchored[6] == np.float32(-0.05)  # incorrect but above its group's mean


def test_dynamic_sampling_refills_and_caps():
    G = 2
    rounds = [
        np.array([1, 1, 0, 1, 0, 0]),  # groups: flat, mixed, flat
        np.array([0, 1, 1, 1, 1, 0]),  # mixed, flat, mixed
        np.array([1, 1, 1, 1, 1, 1]),  # all flat
    ]

    def sample(i):
        r = rounds[i].astype(float)
        return {"rewards": r, "row": np.arange(6) + 10 * i}

    out, stats = A.collect_groups(sample, groups_needed=3, group_size=G, max_gen_batches=8)
    assert out["row"].tolist() == [2, 3, 10, 11, 14, 15] and out["valid"].all()
    assert stats == {"num_gen_batches": 2, "frac_zero_std": 3 / 6, "groups_invalid": 0}
    # Cap: 4 groups needed, 3 mixed exist in 3 rounds -> one flat group fills in, marked invalid.
    out, stats = A.collect_groups(sample, groups_needed=4, group_size=G, max_gen_batches=3)
    assert out["row"].tolist()[:6] == [2, 3, 10, 11, 14, 15] and out["valid"].tolist() == [1] * 6 + [0] * 2
    assert stats["num_gen_batches"] == 3 and stats["groups_invalid"] == 1
    assert A.zero_std_groups(np.array([0.5, 0.5, 0.5, 0.50001]), 2).tolist() == [True, False]
