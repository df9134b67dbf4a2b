r"""Trains TurboS: `python -m turbos_jax.train --config=configs/tiny.py --workdir=/tmp/tiny`.

One linear function, `train_and_evaluate(config, workdir)`, in banner sections:
mesh -> data -> abstract model and optimizer -> sharded init -> restore -> step functions -> loop.
Rerunning the same command resumes from the newest readable checkpoint in WORKDIR/checkpoints.

Outputs in WORKDIR: `config.json`, `metrics.jsonl` (one JSON object per logged step), TensorBoard
event files, `checkpoints/<step>/`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from turbos_jax import accounting, cli, compile_cache, distributed, metrics, sharding
from turbos_jax import workdir as run_dir
from turbos_jax.checkpointing import Checkpointer
from turbos_jax.config import ModelConfig, check_train_config
from turbos_jax.data import BATCH_KEYS, DataError, make_eval_iterator, make_train_iterator
from turbos_jax.step import build_train_program, loss_fn  # noqa: F401 (loss_fn re-exported)

_CONFIG = _WORKDIR = None  # absl flags, defined by define_flags() (not on import)


def define_flags() -> None:
    """This command's absl flags (and distributed.py's multi-host ones), defined when it runs as
    `python -m turbos_jax.train`: importing the module (e.g. for `train_and_evaluate`) defines none."""
    global _CONFIG, _WORKDIR
    if _CONFIG is not None:
        return
    _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
    distributed.define_flags()


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf and config.on_nonfinite == "stop"."""


def train_and_evaluate(config, workdir: str, *, on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Runs (or resumes) training; returns the last logged metrics.

    `on_log(step, row)`, if given, is called on process 0 with every row written to metrics.jsonl
    (train rows every `log_every_steps`, {"step", "eval_loss"} rows at evaluations), after it is
    written: a notebook can plot the loss live. An exception it raises stops the run like any other
    (the last checkpoint stays intact)."""
    # ============================================================================ config, workdir
    model_cfg = ModelConfig.from_config(config.model)
    check_train_config(config)
    workdir = run_dir.prepare(workdir)  # a bad --workdir stops here, before anything is written
    cache_dir = compile_cache.enable(config.compilation_cache_dir)  # before the first compile
    logging.info("compilation cache: %s", cache_dir or "off")

    # ============================================================================ mesh
    mesh = sharding.train_mesh(config, model_cfg)

    # ==================================================================== model, optimizer, steps
    program = build_train_program(config, model_cfg, mesh)
    batch_sharding = program.batch_sharding

    # ============================================================================ data
    # Each process loads the rows its devices hold; processes that are replicas along `model`
    # load the same ones.
    shard, num_shards = sharding.process_batch_shard(batch_sharding, config.batch_size)
    train_iter = make_train_iterator(config, process_index=shard, process_count=num_shards)
    tokens_per_step = config.batch_size * config.seq_len
    global_shape = (config.batch_size, config.seq_len)

    def to_global(local):
        return {
            k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(local[k]), global_shape)
            for k in BATCH_KEYS
        }

    # ============================================================================ sharded init / restore
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    try:
        with jax.set_mesh(mesh):
            abstract_target = sharding.sharded_abstract(program.setup.abstract_state, mesh)
            hint = run_dir.config_hint(run_dir.saved_config(workdir), config)
            start_step, state = ckpt.restore_latest(abstract_target, train_iter, explain=hint)
            if state is None:
                start_step = 0
                state = jax.jit(program.setup.init_state, out_shardings=program.state_shardings)()
            else:
                logging.info("resumed from step %d", start_step)
                print(f"resuming from checkpoint step {start_step}", flush=True)
    except BaseException:
        ckpt.close()
        raise
    run_dir.write_config(workdir, config)  # after the restore: until then it describes the checkpoints

    # ============================================================================ step functions
    flops_per_token = accounting.training_flops_per_token(model_cfg, config.seq_len)["total"]
    skip_nonfinite = config.on_nonfinite == "skip"
    train_step, eval_step = program.train_step, program.eval_step

    def evaluate(params):
        it, losses = make_eval_iterator(config, process_index=shard, process_count=num_shards), []
        for _ in range(config.eval_batches):
            try:
                batch = next(it)
            except StopIteration:
                break
            losses.append(float(eval_step(params, to_global(batch))))
        return float(np.mean(losses)) if losses else float("nan")

    # ============================================================================ loop
    sigterm = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sigterm.append(True))

    def stop_now(step) -> bool:
        """SIGTERM seen; with several processes, seen by any, agreed on at log steps (every
        process must take the same save-and-stop step or the save's collectives hang)."""
        if jax.process_count() == 1:
            return bool(sigterm)
        if step % config.log_every_steps:
            return False
        return bool(multihost_utils.process_allgather(np.asarray(bool(sigterm))).any())

    writer = metrics.MetricsWriter(
        workdir, is_primary=jax.process_index() == 0, resume_step=start_step if start_step else None
    )
    progress = metrics.Progress(config.total_steps, initial_step=start_step, enabled=jax.process_index() == 0)
    peak = metrics.peak_flops_per_device(jax.devices()[0])
    last, pending, window_start, window_steps = {}, None, time.perf_counter(), 0

    def write(step, row):
        writer.write(step, row)
        if on_log is not None and jax.process_index() == 0:
            on_log(step, dict(row))

    def log(step, device_metrics):
        nonlocal window_start, window_steps, last
        host = jax.device_get(device_metrics)
        if not bool(host.pop("finite")):
            if not skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step} (loss={host['loss']}, "
                    f"grad_norm={host['grad_norm']}); parameters were not updated and the last "
                    f"checkpoint (step {max(ckpt.steps(), default='none')}) is intact; set "
                    "config.on_nonfinite='skip' to skip such steps"
                )
            host["skipped_nonfinite"] = 1
        if step % config.log_every_steps and step != config.total_steps:
            return
        elapsed = time.perf_counter() - window_start
        rates = metrics.throughput(
            elapsed / max(window_steps, 1), tokens_per_step, flops_per_token, jax.device_count(), peak
        ).metrics()
        rates["step_time_s"] = elapsed / max(window_steps, 1)
        last = {"step": step, **{k: np.asarray(v).tolist() for k, v in host.items()}, **rates}
        write(step, last)
        progress.update(step, last)
        window_start, window_steps = time.perf_counter(), 0

    stop_requested = False
    try:
        with jax.set_mesh(mesh):
            for step in range(start_step + 1, config.total_steps + 1):
                batch = to_global(next(train_iter))
                state, step_metrics = train_step(state, batch)
                if step == start_step + 1:  # keep compilation out of the throughput figures
                    jax.block_until_ready(step_metrics)
                    window_start = time.perf_counter()
                else:
                    window_steps += 1
                if pending is not None:  # host metrics a step late keep the device busy
                    log(*pending)
                pending = (step, step_metrics)
                if config.eval_every_steps and step % config.eval_every_steps == 0:
                    log(*pending)
                    pending = None
                    last["eval_loss"] = evaluate(state["params"])
                    write(step, {"step": step, "eval_loss": last["eval_loss"]})
                    window_start, window_steps = time.perf_counter(), 0
                stop_requested = stop_now(step)
                if step % config.checkpoint_every_steps == 0 or stop_requested:
                    if pending is not None:
                        log(*pending)  # never checkpoint past an unchecked non-finite step
                        pending = None
                    ckpt.save(step, state, train_iter)
                if stop_requested:
                    print(f"SIGTERM: saved checkpoint at step {step}, stopping", flush=True)
                    break
            if pending is not None:
                log(*pending)
            final_step = int(jax.device_get(state["step"]))
            if not stop_requested and final_step > start_step:
                ckpt.save(final_step, state, train_iter)
    finally:
        ckpt.close()
        writer.close()
        progress.close()
        signal.signal(signal.SIGTERM, previous_handler)
    return last


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    if _CONFIG.value is None or not _WORKDIR.value:
        raise app.UsageError(
            "--config and --workdir are required, e.g. --config=configs/tiny.py --workdir=/tmp/tiny"
        )
    distributed.maybe_initialize()  # multi-host: before anything touches a device
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    define_flags()
    cli.run(main, DataError, NonFiniteLossError)
