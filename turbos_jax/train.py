r"""Trains TurboS: `python -m turbos_jax.train --config=configs/tiny.py --workdir=/tmp/tiny`.

One linear function, `train_and_evaluate(config, workdir)`, composed of the shared trainer pieces
(`turbos_jax/training_loop.py`): config, workdir, mesh and program -> data -> restore or init ->
loop. Rerunning the same command resumes from the newest readable checkpoint in WORKDIR/checkpoints;
with `--config.init_from=OTHER_WORKDIR` a run without checkpoints of its own starts from OTHER's
newest checkpoint (parameters, optimizer state and step: the next pre-training stage).

Outputs in WORKDIR: `config.json`, `metrics.jsonl` (one JSON object per logged step), TensorBoard
event files, `checkpoints/<step>/`.
"""

from __future__ import annotations

from collections.abc import Callable

from turbos_jax import cli, distributed
from turbos_jax import training_loop as loop
from turbos_jax.data import DataError, make_eval_iterator, make_train_iterator
from turbos_jax.step import loss_fn  # noqa: F401 (re-exported)
from turbos_jax.training_loop import NonFiniteLossError  # noqa: F401 (re-exported)

# This command's flags (--config, --workdir, multi-host), defined only when it runs as a program.
define_flags = distributed.define_workdir_command_flags


def train_and_evaluate(config, workdir: str, *, on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Runs (or resumes) training; returns the last logged metrics.

    `on_log(step, row)`, if given, is called on process 0 with every row written to metrics.jsonl
    (train rows every `log_every_steps`, {"step", "eval_loss"} rows at evaluations), after it is
    written: a notebook can plot the loss live. An exception it raises stops the run like any other
    (the last checkpoint stays intact)."""
    # ============================================================ config, workdir, mesh, program
    run = loop.prepare_run(config, workdir)

    # ============================================================================ data
    train_iter = make_train_iterator(config, process_index=run.shard, process_count=run.num_shards)
    to_global = loop.batch_globaliser(run)

    # ================================================ restore (or config.init_from, or sharded init)
    start = loop.restore_or_init(run, train_iter, init=loop.INIT_FULL)

    # ============================================================================ loop
    def evaluate(params):
        batches = make_eval_iterator(config, process_index=run.shard, process_count=run.num_shards)
        return {"eval_loss": loop.mean_eval_loss(run, params, batches, to_global, config.eval_batches)}

    return loop.train_loop(run, start, train_iter, to_global, evaluate=evaluate, on_log=on_log)


main = distributed.workdir_command_main(train_and_evaluate, "--config=configs/tiny.py --workdir=/tmp/tiny")


if __name__ == "__main__":
    define_flags()
    cli.run(main, DataError, NonFiniteLossError)
