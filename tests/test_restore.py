"""Restore tells an incompatible checkpoint (the config changed) from a damaged one (bad files).

Incompatible: a one-line error naming the first differing path, both shapes/dtypes and the likely
config key; nothing on disk changes. Damaged: moved aside, the previous step restored. Also the
`--workdir` checks and the CLI's behaviour on a changed model.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, subprocess_env

from configs import tiny
from turbos_jax import workdir as run_dir
from turbos_jax.checkpointing import Checkpointer, IncompatibleCheckpointError


# ------------------------------------------------------------------------- helpers
def _iterator(skip: int = 0):
    it = grain.MapDataset.range(100).to_iter_dataset().__iter__()
    for _ in range(skip):
        next(it)
    return it


def _state(seed: int, w_shape=(4, 3), dtype=jnp.float32, extra: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    params = {"dense": {"w": jnp.asarray(rng.normal(size=w_shape), dtype)}, "b": jnp.ones((3,), dtype)}
    if extra:
        params["gate"] = jnp.zeros((2,), dtype)
    return {"params": params, "step": jnp.asarray(seed, jnp.int32)}


def _abstract(state):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def _saved(directory, steps=(1, 2)) -> str:
    """A checkpoint directory with one step per entry of `steps` (state seeded by the step)."""
    ckpt = Checkpointer(directory, keep=5)
    for step in steps:
        ckpt.save(step, _state(step), _iterator(step))
    ckpt.close()
    return directory


def _tree_digest(directory) -> dict[str, str]:
    """Every file under `directory` with its content hash: proves nothing was moved or changed."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(dirpath, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _restore(directory, target, explain=None):
    ckpt = Checkpointer(directory, keep=5)
    try:
        return ckpt.restore_latest(target, _iterator(), explain=explain)
    finally:
        ckpt.close()


# ------------------------------------------------------------------------- incompatible
@pytest.mark.parametrize(
    "target, expected",
    [
        (
            _state(0, w_shape=(4, 5)),
            "params/dense/w is (4, 3) float32 in the checkpoint, (4, 5) float32 here",
        ),
        (_state(0, dtype=jnp.bfloat16), "params/b is (3,) float32 in the checkpoint, (3,) bfloat16 here"),
        (_state(0, extra=True), "params/gate ((2,) float32 here) is not in the checkpoint"),
        (
            {"params": _state(0)["params"]},
            "the checkpoint has step (() int32), which this config does not build",
        ),
    ],
    ids=["shape", "dtype", "missing-leaf", "extra-leaf"],
)
def test_incompatible_checkpoint_is_an_error_and_nothing_moves(tmp_path, target, expected):
    directory = _saved(str(tmp_path / "ckpt"))
    before = _tree_digest(directory)
    with pytest.raises(IncompatibleCheckpointError) as info:
        _restore(directory, _abstract(target))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint step 2 in {directory} does not match this config: ")
    assert expected in message
    assert "nothing was moved" in message
    assert _tree_digest(directory) == before  # no rename, no deletion, no rewrite


def test_mismatch_names_the_config_key_behind_it():
    """With the previous run's config.json: the changed model key whose values appear in the
    shapes. Without it: this config's key whose value is the new dimension."""
    old, new = tiny.get_config(), tiny.get_config()
    new.model.d_model = 32
    new.total_steps = 7  # not a model key: never blamed for a shape
    import json

    saved = json.loads(old.to_json_best_effort())
    explain = run_dir.config_hint(saved, new)
    hint = explain("params/embed/embedding", "(256, 64) float32", "(256, 32) float32")
    assert hint == "likely config.model.d_model: 64 in the checkpoint's config.json, 32 here"
    guess = run_dir.config_hint(None, new)("params/embed/embedding", "(256, 64) float32", "(256, 32) float32")
    assert guess.startswith("likely config.model.d_model=32")  # ambiguous without config.json:
    assert "total_steps" not in guess  # candidates are model keys holding the new dimension
    dtype = tiny.get_config()
    dtype.model.param_dtype = "bfloat16"
    hint = run_dir.config_hint(saved, dtype)("params/b", "(3,) float32", "(3,) bfloat16")
    assert (
        hint == "likely config.model.param_dtype: 'float32' in the checkpoint's config.json, 'bfloat16' here"
    )


def test_explain_hint_is_part_of_the_error(tmp_path):
    directory = _saved(str(tmp_path / "ckpt"))
    with pytest.raises(IncompatibleCheckpointError, match=r"\(likely config\.model\.width=5\);"):
        _restore(
            directory, _abstract(_state(0, w_shape=(4, 5))), explain=lambda *_: "likely config.model.width=5"
        )


# ------------------------------------------------------------------------- damaged
def _truncate_data_files(step_dir: str) -> None:
    """Truncates the array data of a step's state (as a crash during a copy would)."""
    for dirpath, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            if f.endswith(".data") or os.path.basename(dirpath) == "d" or "manifest" in f:
                with open(os.path.join(dirpath, f), "r+b") as fh:
                    fh.truncate(0)


@pytest.mark.parametrize("damage", ["array-data", "metadata"])
def test_damaged_latest_step_moves_aside_and_the_previous_restores(tmp_path, damage):
    directory = _saved(str(tmp_path / "ckpt"))
    if damage == "array-data":
        _truncate_data_files(os.path.join(directory, "2"))
    else:  # the tree metadata itself: unreadable is damage, not a mismatch
        with open(os.path.join(directory, "2", "state", "_METADATA"), "w") as f:
            f.write("{not json")
    step, state = _restore(directory, _abstract(_state(0)))
    assert step == 1
    np.testing.assert_array_equal(
        np.asarray(state["params"]["dense"]["w"]), np.asarray(_state(1)["params"]["dense"]["w"])
    )
    assert int(state["step"]) == 1
    moved = [d for d in os.listdir(directory) if d.startswith("corrupt-2-")]
    assert len(moved) == 1 and not os.path.exists(os.path.join(directory, "2"))


def test_compatible_checkpoint_restores_state_and_iterator(tmp_path):
    directory = _saved(str(tmp_path / "ckpt"))
    it = _iterator()
    ckpt = Checkpointer(directory, keep=5)
    step, state = ckpt.restore_latest(_abstract(_state(0)), it)
    ckpt.close()
    assert step == 2 and int(state["step"]) == 2
    assert next(it) == 2  # the iterator continues where step 2 saved it


# ------------------------------------------------------------------------- workdir
def test_workdir_checks(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    with pytest.raises(run_dir.WorkdirError, match=r"^--workdir=.*/file: exists and is not a directory$"):
        run_dir.prepare(str(a_file))
    with pytest.raises(run_dir.WorkdirError, match=r"^--workdir=.*/file/sub: cannot create or write it"):
        run_dir.prepare(str(a_file / "sub"))
    assert a_file.read_text() == "keep me"
    made = run_dir.prepare(str(tmp_path / "new" / "run"))
    assert os.path.isdir(made) and os.listdir(made) == []  # the write probe leaves nothing behind


# ------------------------------------------------------------------------- the CLI
def _train(workdir, *extra):
    cmd = [
        sys.executable,
        "-m",
        "turbos_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        "--config.batch_size=4",
        "--config.seq_len=32",
        "--config.model.layout=AFMF",
        "--config.eval_every_steps=0",
        "--config.checkpoint_every_steps=2",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


def test_cli_rerun_with_a_changed_model_stops_and_keeps_everything(tmp_path):
    """The case that used to move every checkpoint to corrupt-* and train from step 0."""
    work = str(tmp_path / "run")
    first = _train(work, "--config.total_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    before = _tree_digest(work)
    assert sorted(d for d in os.listdir(os.path.join(work, "checkpoints"))) == ["2", "3"]

    changed = _train(work, "--config.total_steps=5", "--config.model.d_model=32")
    assert changed.returncode == 1, changed.stderr[-3000:]
    last = changed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint step 3 in "), changed.stderr[-3000:]
    assert "params/embed/embedding is (256, 64) float32 in the checkpoint, (256, 32) float32 here" in last
    assert "likely config.model.d_model: 64 in the checkpoint's config.json, 32 here" in last
    assert "Traceback" not in changed.stderr
    assert _tree_digest(work) == before  # checkpoints, config.json and metrics untouched

    on_a_file = _train(os.path.join(work, "config.json"), "--config.total_steps=1")
    assert on_a_file.returncode == 1
    assert on_a_file.stderr.strip().splitlines()[-1].endswith("config.json: exists and is not a directory")
    assert _tree_digest(work) == before
