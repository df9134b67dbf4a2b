"""Orbax checkpoints of {train state, data iterator}, with fallback past a damaged latest step.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step into a temporary directory
and renames it only once complete, so an interrupted save never looks like a checkpoint; old steps
are removed (keeping `keep_checkpoints`) only after a newer one has been finalised.

Restoring walks the steps newest first and tells an incompatible step from a damaged one:

  1. Compare: the step's array metadata (tree paths, shapes, dtypes; no array data is read) against
     the abstract target. A difference means the run's config changed, not that the files are bad:
     `IncompatibleCheckpointError`, one line naming the first differing path, both shapes/dtypes and
     the likely config key (`explain`), and nothing on disk is touched.
  2. Restore: the state and the data iterator of a compatible step. A failure here (truncated or
     corrupted files, missing items), or unreadable metadata in 1, is damage: reported in one line,
     the step is moved aside to WORKDIR/checkpoints/corrupt-<step>-<time> (kept for inspection,
     never deleted), and the previous step is tried.
  With several processes, each verdict (ok / incompatible / damaged) is all-gathered after 1 and
  after 2, and every process acts on the same, most cautious one (incompatible > damaged > ok), so a
  step is never moved aside while some process restored it or found it incompatible. Step 2 calls
  the item handlers directly: they hold no cross-process barrier, so a process whose read fails
  cannot leave the others waiting inside Orbax.

Multi-process (docs/sharding.md): every process calls save and restore; the directory must be one
shared filesystem path. Orbax writes each array shard once and restores onto whatever mesh the
abstract target carries, so the mesh shape may change between runs. The data iterator is per
process (`data/process_<i>-of-<n>.json`), so a step restores only with the process count that saved
it: a mismatch is a one-line `ProcessCountMismatchError`, not a corrupt step.
"""

from __future__ import annotations

import glob
import os
import re
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from turbos_jax import cli


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class IncompatibleCheckpointError(CheckpointError, cli.UserError):
    """The newest checkpoint's tree, shapes or dtypes differ from the state this config builds."""


class ProcessCountMismatchError(CheckpointError, cli.UserError):
    """The newest checkpoint's data-iterator state was saved by a different number of processes."""


class InitFromError(CheckpointError, cli.UserError):
    """config.init_from holds no readable checkpoint."""


def has_steps(directory: str) -> bool:
    """Whether `directory` (a run's checkpoints/) holds any finalised step."""
    return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


class Checkpointer:
    """Saves and restores `{"state": pytree, "data": grain iterator}` by step."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, *, force: bool = False) -> bool:
        """Starts an (async) save; returns False if a checkpoint for `step` already exists."""
        if step in self._manager.all_steps():
            return False
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
            ),
            force=force,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any, data_iterator, *, explain=None):
        """Restores the newest readable step into `abstract_state` (ShapeDtypeStructs with
        shardings) and `data_iterator` (in place). Returns (step, state) or (None, None).

        Raises IncompatibleCheckpointError when the newest step does not fit `abstract_state`;
        `explain(path, saved, wanted)` (each "shape dtype") may return a hint naming the config key
        that likely changed. Damaged steps are moved aside (module docstring)."""
        for step in reversed(self.steps()):
            self._check_process_count(step)
            verdict, detail = _agreed(*_compare(self._step_dir(step) / "state", abstract_state, explain))
            if verdict == _INCOMPATIBLE:
                raise IncompatibleCheckpointError(
                    f"checkpoint step {step} in {self.directory} does not match this config: {detail}; "
                    "nothing was moved: resume with the config it was saved with, or use a new --workdir"
                )
            if verdict == _OK:
                verdict, detail, state = self._read(step, abstract_state, data_iterator)
                if verdict == _OK:
                    return step, state
            moved = self._move_aside(step)
            logging.warning(
                "checkpoint step %d in %s is unreadable (%s); moved to %s, trying the previous one",
                step,
                self.directory,
                detail,
                moved,
            )
            print(
                f"warning: checkpoint step {step} is unreadable ({detail}); "
                f"moved aside to {moved}, falling back to the previous checkpoint",
                flush=True,
            )
        return None, None

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def _read(self, step: int, abstract_state, data_iterator):
        """Step 2 of the module docstring -> (agreed verdict, detail, state or None)."""
        state = None
        state_handler, data_handler = ocp.StandardCheckpointHandler(), grain.checkpoint.CheckpointHandler()
        try:
            state = state_handler.restore(
                self._step_dir(step) / "state", args=ocp.args.StandardRestore(abstract_state)
            )
            data_handler.restore(
                self._step_dir(step) / "data", args=grain.checkpoint.CheckpointRestore(data_iterator)
            )
            verdict, detail = _OK, ""
        except Exception as e:  # noqa: BLE001 - any read failure of a compatible step is damage
            verdict, detail = _DAMAGED, _first_line(e)
        finally:  # their executors and event loops, also after a failed read
            state_handler.close()
            data_handler.close()
        verdict, detail = _agreed(verdict, detail)
        return verdict, detail, state if verdict == _OK else None

    def _check_process_count(self, step: int) -> None:
        """Raises ProcessCountMismatchError if `step` holds data-iterator state only for another
        process count (grain names the files process_<i>-of-<n>.json). Every process sees the same
        files, so all of them raise together instead of some moving the step aside."""
        files = glob.glob(os.path.join(self.directory, str(step), "data", "process_*-of-*.json"))
        counts = {
            int(m.group(1))
            for f in files
            if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", os.path.basename(f)))
        }
        if counts and jax.process_count() not in counts:
            raise ProcessCountMismatchError(
                f"checkpoint step {step} in {self.directory} was saved by {max(counts)} process(es) "
                f"but this job has {jax.process_count()}: the data iterator's position is per "
                "process, so resume with the same number of processes (the mesh shape may change)"
            )

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(self.directory, f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0 and os.path.exists(src):
            os.rename(src, dst)
        if jax.process_count() > 1:  # nobody re-lists the steps before process 0 has renamed
            ocp.multihost.sync_global_processes(f"turbos_move_aside_{step}")
        self._manager.reload()
        return dst

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def restore_for_init(
    directory: str, abstract_state: Any, *, params_only: bool, explain=None
) -> tuple[int, Any]:
    """Another run's newest readable step in `directory` (its checkpoints/) as the start of this run
    -> (step, state). Reads only; nothing there is moved or written.

    params_only: only `abstract_state["params"]` is read (Orbax partial restore) and compared, so
    the other run's optimizer may differ; returns {"params": ...}. Otherwise the whole state
    (params, optimizer state, step) must match and is returned; the data iterator is never read.
    A mismatch is `IncompatibleCheckpointError` (the first differing path, parameters first, and
    `explain`'s hint); an unreadable step is skipped with a warning (left in place) for the previous
    one; no readable step is `InitFromError`."""
    target = {"params": abstract_state["params"]} if params_only else abstract_state
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise InitFromError(f"config.init_from: no checkpoint in {directory}")
    for step in reversed(steps):
        state_dir = epath.Path(directory) / str(step) / "state"
        only = "params" if params_only else None
        verdict, detail = _agreed(*_compare(state_dir, target, explain, only=only))
        if verdict == _INCOMPATIBLE:
            raise IncompatibleCheckpointError(
                f"config.init_from: checkpoint step {step} in {directory} does not match this config: "
                f"{detail}; nothing was written or moved"
            )
        state = None
        if verdict == _OK:
            handler = ocp.PyTreeCheckpointHandler()
            try:
                restore_args = ocp.checkpoint_utils.construct_restore_args(target)
                args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=params_only)
                state = handler.restore(state_dir, args=args)
            except Exception as e:  # noqa: BLE001 - any read failure of a compatible step is damage
                verdict, detail = _DAMAGED, _first_line(e)
            finally:
                handler.close()
            verdict, detail = _agreed(verdict, detail)
        if verdict == _OK:
            return step, state
        print(
            f"warning: config.init_from: checkpoint step {step} in {directory} is unreadable ({detail}); "
            "left in place, trying the previous one",
            flush=True,
        )
    raise InitFromError(f"config.init_from: no readable checkpoint in {directory} (steps {steps})")


# ------------------------------------------------------------------------------ verdicts
_OK, _DAMAGED, _INCOMPATIBLE = 0, 1, 2  # ordered by caution: the largest verdict of any process wins
_NAMES = {_OK: "ok", _DAMAGED: "unreadable", _INCOMPATIBLE: "incompatible"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _agreed(verdict: int, detail: str) -> tuple[int, str]:
    """The most cautious verdict over all processes; the detail is this process's own, or says
    which processes reached the verdict when this one did not."""
    if jax.process_count() == 1:
        return verdict, detail
    verdicts = np.asarray(multihost_utils.process_allgather(np.asarray(verdict, np.int32))).reshape(-1)
    worst = int(verdicts.max())
    if worst != verdict:
        who = [int(i) for i in np.flatnonzero(verdicts == worst)]
        detail = f"found {_NAMES[worst]} by process(es) {who}"
    return worst, detail


def leaf_path(path) -> str:
    """ "params/embed/embedding" from a pytree key path (nnx.State, optax namedtuples, Orbax's
    metadata dicts/lists all give the same string); a trailing `value` (nnx.Param) is dropped."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    while names and names[-1] == "value":
        names.pop()
    return "/".join(names)


def describe(leaf) -> str:
    return f"{tuple(leaf.shape)} {np.dtype(leaf.dtype).name}"


def _compare(state_dir: epath.Path, abstract_state, explain, *, only: str | None = None) -> tuple[int, str]:
    """Step 1 of the module docstring -> (verdict, detail) for this process. `only`: compare the
    checkpoint's leaves under this top-level key (e.g. "params") and ignore the rest."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(state_dir)
        saved = {leaf_path(p): describe(v) for p, v in jax.tree_util.tree_leaves_with_path(metadata)}
        if only is not None:
            saved = {p: v for p, v in saved.items() if p.startswith(only + "/")}
    except Exception as e:  # noqa: BLE001 - unreadable metadata is damage, not a mismatch
        return _DAMAGED, _first_line(e)
    finally:
        handler.close()
    wanted = {leaf_path(p): describe(v) for p, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
    mismatch = first_mismatch(saved, wanted, explain)
    return (_INCOMPATIBLE, mismatch) if mismatch else (_OK, "")


def first_mismatch(
    saved: dict[str, str], wanted: dict[str, str], explain, *, what: str = "the checkpoint"
) -> str:
    """The first difference between two {leaf path: "(shape) dtype"} maps, as one phrase with
    `explain`'s hint, or "" when they agree: a wanted leaf missing from or shaped differently in
    `saved` (parameters first: the optimizer's moments mirror them, and a parameter path is what a
    user recognises), else a saved leaf this config does not build."""
    for path, want in sorted(wanted.items(), key=lambda item: not item[0].startswith("params/")):
        have = saved.get(path)
        if have == want:
            continue
        if have is None:
            return f"{path} ({want} here) is not in {what}" + _hint(explain, path, None, want)
        return f"{path} is {have} in {what}, {want} here" + _hint(explain, path, have, want)
    extra = [p for p in saved if p not in wanted]
    if extra:
        return f"{what} has {extra[0]} ({saved[extra[0]]}), which this config does not build"
    return ""


def _hint(explain, path, have, want) -> str:
    hint = explain(path, have, want) if explain else None
    return f" ({hint})" if hint else ""
