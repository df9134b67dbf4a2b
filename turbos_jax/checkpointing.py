"""Orbax checkpoints of {train state, data iterator}, with fallback past a damaged latest step.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Orbax writes each step into a temporary directory
and renames it only once complete, so an interrupted save never looks like a checkpoint; old steps
are removed (keeping `keep_checkpoints`) only after a newer one has been finalised.

Restoring walks the steps newest first. A step that fails to restore (truncated or corrupted files,
missing items) is reported in one line and moved aside to WORKDIR/checkpoints/corrupt-<step>-<time>
(kept for inspection, never deleted), and the previous step is tried.

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
import orbax.checkpoint as ocp
from absl import logging

from turbos_jax import cli


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class ProcessCountMismatchError(CheckpointError, cli.UserError):
    """The newest checkpoint's data-iterator state was saved by a different number of processes."""


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

    def restore_latest(self, abstract_state: Any, data_iterator):
        """Restores the newest readable step into `abstract_state` (ShapeDtypeStructs with
        shardings) and `data_iterator` (in place). Returns (step, state) or (None, None)."""
        for step in reversed(self.steps()):
            self._check_process_count(step)
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=grain.checkpoint.CheckpointRestore(data_iterator),
                    ),
                )
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                moved = self._move_aside(step)
                logging.warning(
                    "checkpoint step %d in %s is unreadable (%s); moved to %s, trying the previous one",
                    step,
                    self.directory,
                    reason,
                    moved,
                )
                print(
                    f"warning: checkpoint step {step} is unreadable ({type(e).__name__}); "
                    f"moved aside to {moved}, falling back to the previous checkpoint",
                    flush=True,
                )
                continue
            return step, restored["state"]
        return None, None

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
