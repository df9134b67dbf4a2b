"""The run directory (`--workdir`): checked before anything is written, and its `config.json`.

Shared by every entry point that trains (`train`, and the post-training commands built on it):

  * `prepare(workdir)` creates the directory, or stops with a one-line `WorkdirError` when the path
    is a file, lies under a file, or cannot be written (checked by writing a probe file, since
    permission bits say nothing to root or on object-store mounts).
  * `write_config(workdir, config)` records the run's config as `config.json` (process 0). Call it
    after the checkpoint is restored: until then the file still describes the checkpoints, and
    `config_hint` reads it to name the config key behind a shape mismatch.
"""

from __future__ import annotations

import json
import os
import tempfile

import jax

from turbos_jax import cli

CONFIG_FILE = "config.json"


class WorkdirError(cli.UserError):
    """--workdir cannot hold a run (a file, under a file, or not writable)."""


def prepare(workdir: str) -> str:
    """Creates `workdir` if needed and checks it is a writable directory; returns its absolute path."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir={workdir}: exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir}: cannot create or write it ({e.strerror or e})") from e
    return path


def write_config(workdir: str, config) -> None:
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def saved_config(workdir: str) -> dict | None:
    """The config.json a previous run left in `workdir`, or None (absent or unreadable)."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _flat(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_hint(saved: dict | None, config, where: str = "the checkpoint's config.json"):
    """-> `explain(path, have, want)` for `Checkpointer.restore_latest`: the config key(s) most
    likely behind a mismatch ("have"/"want" are "(shape) dtype" strings; "have" None = missing).

    1. With the checkpoint's config.json: the `model.*` keys whose values differ between it and this
       config, narrowed to those whose old or new value appears in the mismatching shape or dtype.
    2. Without it (or with no model key changed): this config's `model.*` keys whose value appears
       in the wanted shape/dtype but not in the checkpoint's.
    """
    current = dict(_flat(json.loads(config.to_json_best_effort())))
    before = dict(_flat(saved)) if saved else {}

    def explain(path, have, want):
        words_have = set(_words(have)) if have else set()
        words_want = set(_words(want))
        changed = [k for k in current if k.startswith("model.") and k in before and before[k] != current[k]]
        if changed:
            related = [k for k in changed if {str(before[k]), str(current[k])} & (words_have | words_want)]
            keys = related or changed
            return "likely " + ", ".join(
                f"config.{k}: {before[k]!r} in {where}, {current[k]!r} here" for k in keys[:3]
            )
        keys = [k for k, v in current.items() if k.startswith("model.") and str(v) in words_want - words_have]
        if keys:
            return "likely " + " or ".join(f"config.{k}={current[k]!r}" for k in keys[:3])
        return None

    return explain


def _words(description: str) -> list[str]:
    """ "(256, 64) float32" -> ["256", "64", "float32"]."""
    return [w for w in description.replace("(", " ").replace(")", " ").replace(",", " ").split() if w]
