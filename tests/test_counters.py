"""Step, optimizer count, learning rate and checkpoint step agree around a non-finite step.

One training batch is poisoned (a NaN in its loss mask, so its loss and gradients are NaN: a forced
non-finite step). Under `on_nonfinite="skip"` the step is counted everywhere but changes neither the
parameters nor Adam's moments; under `"stop"` the run stops and the last checkpoint is consistent.
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from turbos_jax import optim, train
from turbos_jax.metrics import read_jsonl

POISONED_STEP = 3


class _PoisonOneBatch(grain.DatasetIterator):
    """Wraps the trainer's iterator; the batch of step `POISONED_STEP` gets a NaN loss mask."""

    def __init__(self, inner):
        super().__init__([inner])
        self._inner, self._served = inner, 0

    def __next__(self):
        batch = dict(next(self._inner))
        self._served += 1
        if self._served == POISONED_STEP:
            mask = np.array(batch["loss_mask"], np.float32)
            mask[0, 0] = np.nan
            batch["loss_mask"] = mask
        return batch

    def get_state(self):
        return {"inner": self._inner.get_state(), "served": self._served}

    def set_state(self, state):
        self._inner.set_state(state["inner"])
        self._served = state["served"]


def _config(mode: str, total_steps: int, checkpoint_every: int):
    config = tiny.get_config()
    config.batch_size, config.seq_len, config.total_steps = 8, 32, total_steps  # 8 fake devices
    config.model.layout = "AFMF"
    config.log_every_steps, config.eval_every_steps = 1, 0
    config.checkpoint_every_steps = checkpoint_every
    config.optim.schedule = (("warmup", 10, 1e-3),)  # a different LR at every step
    config.on_nonfinite = mode
    return config


def _saved_state(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _counts(state) -> list[int]:
    """Every optax `count` leaf of the saved optimizer state."""
    leaves = jax.tree_util.tree_leaves_with_path(state["opt_state"])
    return [int(v) for path, v in leaves if jax.tree_util.keystr(path).endswith("count']")]


@pytest.fixture
def poisoned(monkeypatch):
    real = train.make_train_iterator
    monkeypatch.setattr(train, "make_train_iterator", lambda *a, **k: _PoisonOneBatch(real(*a, **k)))


def test_skip_mode_counts_the_skipped_step_everywhere(tmp_path, poisoned):
    config = _config("skip", total_steps=6, checkpoint_every=2)
    train.train_and_evaluate(config, str(tmp_path))
    rows = {r["step"]: r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert [s for s, r in rows.items() if r.get("skipped_nonfinite")] == [POISONED_STEP]
    assert np.isfinite(rows[POISONED_STEP + 1]["loss"])  # the parameters were not touched
    schedule = optim.make_schedule(config.optim.schedule)
    for step, row in rows.items():  # update `step` used optax count step - 1
        assert row["learning_rate"] == pytest.approx(optim.learning_rate_at(schedule, step - 1), rel=1e-6)

    for step in (2, 4, 6):  # checkpoint step == state step == every optimizer count
        state = _saved_state(str(tmp_path), step)
        assert int(state["step"]) == step
        counts = _counts(state)
        assert len(counts) >= 2 and set(counts) == {step}, counts


def test_skip_mode_changes_nothing_but_the_counts(tmp_path, poisoned):
    """Checkpoint right after the poisoned step: identical to the one before it except the counts."""
    config = _config("skip", total_steps=POISONED_STEP, checkpoint_every=POISONED_STEP - 1)
    train.train_and_evaluate(config, str(tmp_path))
    before = _saved_state(str(tmp_path), POISONED_STEP - 1)
    after = _saved_state(str(tmp_path), POISONED_STEP)
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    for path, value in jax.tree_util.tree_leaves_with_path(after):
        name = jax.tree_util.keystr(path)
        if name.endswith("count']") or name == "['step']":
            assert int(value) == POISONED_STEP and int(flat_before[path]) == POISONED_STEP - 1
        else:
            np.testing.assert_array_equal(value, flat_before[path], err_msg=name)


def test_stop_mode_stops_with_a_consistent_checkpoint(tmp_path, poisoned):
    config = _config("stop", total_steps=6, checkpoint_every=2)
    with pytest.raises(train.NonFiniteLossError, match=f"non-finite loss at step {POISONED_STEP}"):
        train.train_and_evaluate(config, str(tmp_path))
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [2]  # nothing saved at or after the bad step
    state = _saved_state(str(tmp_path), 2)
    assert int(state["step"]) == 2 and set(_counts(state)) == {2}
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert max(r["step"] for r in rows) == POISONED_STEP - 1  # the bad step is not logged as trained
