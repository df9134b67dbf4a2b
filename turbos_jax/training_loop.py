"""The pieces every trainer is composed of: `train` (pre-training), `sft`, and later `rl`.

    run = prepare_run(config, workdir)                     # config, workdir, cache, mesh, program
    it = <the command's data iterator>(config, process_index=run.shard, process_count=run.num_shards)
    to_global = batch_globaliser(run)                      # process-local numpy -> global arrays
    start = restore_or_init(run, it, init=INIT_FULL)       # resume > config.init_from > fresh init
    last = train_loop(run, start, it, to_global, evaluate=...)

Each command owns only its data and its evaluation; the checkpoint layout, resume, metrics,
progress bar, SIGTERM handling and the non-finite guard are the same for all of them.

`config.init_from` (a workdir) starts a run from the newest checkpoint of another run, only when this
run's workdir has no checkpoint of its own (a resume always wins); a parameters file
(`*.safetensors`, `params_file.py`) gives parameters only, as INIT_PARAMS below, for every command.
How much of a workdir's checkpoint is taken is the command's choice (`init`):
  INIT_FULL    parameters, optimizer state and step (pre-training stages 4K -> 32K -> 256K): the
               step and the LR schedule count on from the checkpoint's step; the data pipeline
               starts fresh (its state belongs to the other run's data).
  INIT_PARAMS  parameters only, a fresh optimizer and step 0 (SFT from a pre-trained model, RL from
               an SFT model).
A tree, shape or dtype mismatch is `IncompatibleCheckpointError` (a workdir) or `ParamsFileError`
(a file) naming the parameter; nothing in either place is written or moved by a failed start.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from turbos_jax import accounting, checkpointing, compile_cache, metrics, params_file, sharding
from turbos_jax import workdir as run_dir
from turbos_jax.checkpointing import Checkpointer
from turbos_jax.config import ConfigError, ModelConfig, check_train_config
from turbos_jax.data.packing import BATCH_KEYS
from turbos_jax.step import TrainProgram, build_train_program

INIT_FULL, INIT_PARAMS = "full", "params"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf and config.on_nonfinite == "stop"."""


class Run(NamedTuple):
    """What every piece below reads: the checked config, the absolute workdir, the mesh, the compiled-
    on-first-call program, and which slice of the global batch this process loads."""

    config: Any
    model_cfg: ModelConfig
    workdir: str
    mesh: jax.sharding.Mesh
    program: TrainProgram
    shard: int  # this process's data shard ...
    num_shards: int  # ... of this many (processes holding the same rows share a shard)


class Start(NamedTuple):
    """Where the loop starts: the open checkpointer of this run, the step already done, the state."""

    ckpt: Checkpointer
    step: int
    state: dict


def prepare_run(config, workdir: str, *, check: Callable = check_train_config) -> Run:
    """Checks the config (`check`, then the model), prepares the workdir (a bad --workdir stops here,
    before anything is written), enables the compilation cache (before the first compile), builds
    the mesh and the train program (nothing compiled yet)."""
    model_cfg = ModelConfig.from_config(config.model)
    check(config)
    workdir = run_dir.prepare(workdir)
    cache_dir = compile_cache.enable(config.compilation_cache_dir)
    logging.info("compilation cache: %s", cache_dir or "off")
    mesh = sharding.train_mesh(config, model_cfg)
    program = build_train_program(config, model_cfg, mesh)
    # Each process loads the rows its devices hold; processes that are replicas along `model` load
    # the same ones.
    shard, num_shards = sharding.process_batch_shard(program.batch_sharding, config.batch_size)
    return Run(config, model_cfg, workdir, mesh, program, shard, num_shards)


def batch_globaliser(run: Run) -> Callable[[dict], dict]:
    """-> `to_global(local_batch)`: this process's numpy rows as the global (B, L) arrays."""
    shape = (run.config.batch_size, run.config.seq_len)
    sharding_ = run.program.batch_sharding

    def to_global(local: dict) -> dict:
        return {
            k: jax.make_array_from_process_local_data(sharding_, np.asarray(local[k]), shape)
            for k in BATCH_KEYS
        }

    return to_global


def mean_eval_loss(run: Run, params, batches: Iterator[dict], to_global, max_batches: int) -> float:
    """Mean CE of `params` over up to `max_batches` batches of `batches` (NaN when there are none)."""
    losses = []
    for _, batch in zip(range(max_batches), batches, strict=False):
        losses.append(float(run.program.eval_step(params, to_global(batch))))
    return float(np.mean(losses)) if losses else float("nan")


# ----------------------------------------------------------------------------- restore or init
def restore_or_init(run: Run, data_iterator, *, init: str, from_params: Callable | None = None) -> Start:
    """This run's newest checkpoint (state and `data_iterator`, restored in place); else
    `config.init_from`'s (module docstring; `init` is INIT_FULL or INIT_PARAMS); else a fresh
    sharded init. Writes `config.json` once the state is known: until then the file describes the
    checkpoints, and the mismatch hint reads it. With INIT_PARAMS, `from_params(params) -> state`
    builds the state from the restored parameters (default: a fresh optimizer at step 0; rl adds
    the frozen reference)."""
    config, program, mesh = run.config, run.program, run.mesh
    ckpt_dir = os.path.join(run.workdir, "checkpoints")
    ckpt, step, state = None, None, None
    try:
        with jax.set_mesh(mesh):
            abstract = sharding.sharded_abstract(program.setup.abstract_state, mesh)
            if checkpointing.has_steps(ckpt_dir) or not config.init_from:
                ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
                hint = run_dir.config_hint(run_dir.saved_config(run.workdir), config)
                step, state = ckpt.restore_latest(abstract, data_iterator, explain=hint)
                if state is not None:
                    logging.info("resumed from step %d", step)
                    print(f"resuming from checkpoint step {step}", flush=True)
            if state is None and config.init_from:
                step, state = _init_from(run, abstract, init, from_params)
            if state is None:
                step, state = 0, jax.jit(program.setup.init_state, out_shardings=program.state_shardings)()
            if ckpt is None:  # created only now: a failed init_from leaves no checkpoints/ behind
                ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    run_dir.write_config(run.workdir, config)
    return Start(ckpt, step, state)


def _init_from(run: Run, abstract, init: str, from_params: Callable | None) -> tuple[int, dict]:
    config, program = run.config, run.program
    if init not in (INIT_FULL, INIT_PARAMS):
        raise ValueError(f"init={init!r}: expected {INIT_FULL!r} or {INIT_PARAMS!r}")
    source = os.path.abspath(os.path.expanduser(config.init_from))
    if init == INIT_FULL and not params_file.is_params_file(source):
        hint = run_dir.config_hint(run_dir.saved_config(source), config)
        checkpoints = os.path.join(source, "checkpoints")
        step, state = checkpointing.restore_for_init(checkpoints, abstract, params_only=False, explain=hint)
        if step >= config.total_steps:
            raise ConfigError(
                f"config.total_steps={config.total_steps}: must exceed step {step} of the config.init_from "
                f"checkpoint in {source} (the step counts on from it)"
            )
        print(f"starting from {source} checkpoint step {step} (parameters and optimizer state)", flush=True)
        return step, state
    step, params = params_file.init_params(source, abstract, config)
    tx = program.setup.tx

    def fresh(params):
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    fresh = fresh if from_params is None else from_params
    state = jax.jit(fresh, out_shardings=program.state_shardings, donate_argnums=0)(params)
    print(f"parameters from {source} (checkpoint step {step}); fresh optimizer, step 0", flush=True)
    return 0, state


# ----------------------------------------------------------------------------- the loop
def train_loop(
    run: Run,
    start: Start,
    train_iter,
    to_global: Callable[[dict], dict],
    *,
    evaluate: Callable[[Any], dict] | None = None,
    eval_at_start: bool = False,
    on_log: Callable[[int, dict], None] | None = None,
) -> dict:
    """Trains from `start` to config.total_steps; returns the last logged metrics. Closes the
    checkpointer.

    * Metrics are fetched a step late (the host never stalls the device) and logged every
      `log_every_steps` to metrics.jsonl / TensorBoard / the progress bar; a resumed run truncates
      metrics.jsonl after its checkpoint's step.
    * `evaluate(params) -> {name: value}` runs every `eval_every_steps` (and before the first step
      of a run starting at step 0 when `eval_at_start`); its row {"step", **values} is written.
    * `on_log(step, row)` sees every row written (process 0), after it is written.
    * A non-finite step stops the run (NonFiniteLossError, the last checkpoint intact) or, with
      on_nonfinite="skip", is logged as skipped.
    * Checkpoints every `checkpoint_every_steps`, at the end, and after the step in which SIGTERM
      arrived (then returns; with several processes all agree on that step at a log step).
    """
    config, program = run.config, run.program
    ckpt, start_step, state = start
    tokens_per_step = config.batch_size * config.seq_len
    flops_per_token = accounting.training_flops_per_token(run.model_cfg, config.seq_len)["total"]
    skip_nonfinite = config.on_nonfinite == "skip"
    primary = jax.process_index() == 0

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

    writer = progress = None
    try:
        writer = metrics.MetricsWriter(run.workdir, is_primary=primary, resume_step=start_step or None)
        progress = metrics.Progress(config.total_steps, initial_step=start_step, enabled=primary)
        peak = metrics.peak_flops_per_device(jax.devices()[0])
        last, pending, window_start, window_steps = {}, None, time.perf_counter(), 0

        def write(step, row):
            writer.write(step, row)
            if on_log is not None and primary:
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

        def run_eval(step, params):
            values = evaluate(params)
            last.update(values)
            write(step, {"step": step, **values})

        stop_requested = False
        with jax.set_mesh(run.mesh):
            if evaluate is not None and eval_at_start and start_step == 0:
                run_eval(0, state["params"])
            for step in range(start_step + 1, config.total_steps + 1):
                batch = to_global(next(train_iter))
                state, step_metrics = program.train_step(state, batch)
                if step == start_step + 1:  # keep compilation out of the throughput figures
                    jax.block_until_ready(step_metrics)
                    window_start = time.perf_counter()
                else:
                    window_steps += 1
                if pending is not None:  # host metrics a step late keep the device busy
                    log(*pending)
                pending = (step, step_metrics)
                if evaluate is not None and config.eval_every_steps and step % config.eval_every_steps == 0:
                    log(*pending)
                    pending = None
                    run_eval(step, state["params"])
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
        if writer is not None:
            writer.close()
        if progress is not None:
            progress.close()
        signal.signal(signal.SIGTERM, previous_handler)
    return last
