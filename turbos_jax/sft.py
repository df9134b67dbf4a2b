r"""Supervised fine-tuning: `python -m turbos_jax.sft --config=configs/sft_tiny.py --workdir=W`.

The trainer's pieces (`turbos_jax/training_loop.py`: mesh, Orbax resume, metrics, progress bar,
SIGTERM, non-finite guard) on prompt/response data (`turbos_jax/data/sft.py`): the loss on response
tokens and their stop token only, whole examples packed with their own segments. With
`--config.init_from=PRETRAINED_WORKDIR` the parameters come from that run's newest checkpoint with
a fresh optimizer at step 0; rerunning the command resumes from W exactly like `train`.

Evaluation, at step 0 and every `eval_every_steps`, written to W/metrics.jsonl as one row:
  eval_loss                  mean CE on the held-out records (`config.sft.eval_file`)
  eval_exact_match           greedy decoding of the first `config.sft.eval_prompts` held-out prompts,
                             final answer checked against the reference (posttrain/answers.py)
  eval_response_tokens       mean generated tokens per prompt (stop token included)
"""

from __future__ import annotations

from collections.abc import Callable

from turbos_jax import cli, distributed
from turbos_jax import training_loop as loop
from turbos_jax.config import ConfigError, check_train_config
from turbos_jax.data import DataError
from turbos_jax.data.sft import make_format, make_sft_eval_batches, make_sft_train_iterator, read_examples
from turbos_jax.posttrain.evaluation import examples_exact_match

_STR_KEYS = (
    "train_file",
    "eval_file",
    "prompt_key",
    "response_key",
    "messages_key",
    "answer_key",
    "stop_text",
)
_INT_KEYS = ("eval_prompts", "eval_batch_size", "max_new_tokens")


# This command's flags (--config, --workdir, multi-host), defined only when it runs as a program.
define_flags = distributed.define_workdir_command_flags


def check_sft_config(config) -> None:
    """The run keys (`check_train_config`) and config.sft's keys; one-line ConfigError naming the key."""
    check_train_config(config)
    if "sft" not in config:
        raise ConfigError("config.sft: required block is missing (see configs/sft_tiny.py)")
    for key in (*_STR_KEYS, *_INT_KEYS, "role_prefixes"):
        if key not in config.sft:
            raise ConfigError(f"config.sft.{key}: required key is missing")
    for key in _STR_KEYS:
        if not isinstance(config.sft[key], str):
            raise ConfigError(f"config.sft.{key}={config.sft[key]!r}: expected a string")
    for key in ("train_file", "eval_file", "prompt_key", "response_key", "messages_key", "answer_key"):
        if not config.sft[key]:
            raise ConfigError(f"config.sft.{key}='': must not be empty")
    for key in _INT_KEYS:
        value, least = config.sft[key], 0 if key == "eval_prompts" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"config.sft.{key}={value!r}: must be an integer >= {least}")


def sft(config, workdir: str, *, on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Runs (or resumes) SFT; returns the last logged metrics. `on_log` as in `train_and_evaluate`."""
    # ============================================================ config, workdir, mesh, program
    run = loop.prepare_run(config, workdir, check=check_sft_config)

    # ============================================================================ data
    fmt = make_format(config)
    max_len = config.seq_len + 1
    train_examples = read_examples(config.sft.train_file, fmt, key="train_file", max_len=max_len)
    eval_examples = read_examples(config.sft.eval_file, fmt, key="eval_file", max_len=max_len)
    shard = {"process_index": run.shard, "process_count": run.num_shards}
    train_iter = make_sft_train_iterator(config, train_examples, **shard)
    eval_batches = make_sft_eval_batches(config, eval_examples, **shard)
    to_global = loop.batch_globaliser(run)
    match_set = eval_examples[: config.sft.eval_prompts]

    # ============================================= restore (or parameters from config.init_from)
    start = loop.restore_or_init(run, train_iter, init=loop.INIT_PARAMS)

    # ============================================================================ loop
    def evaluate(params):
        values = {
            "eval_loss": loop.mean_eval_loss(run, params, iter(eval_batches), to_global, len(eval_batches))
        }
        if match_set:
            result = examples_exact_match(
                run.program.setup.graphdef,
                params,
                match_set,
                fmt,
                max_new_tokens=config.sft.max_new_tokens,
                batch_size=config.sft.eval_batch_size,
                mesh=run.mesh,
            )
            values["eval_exact_match"] = result.accuracy
            values["eval_response_tokens"] = result.mean_tokens
        return values

    return loop.train_loop(
        run, start, train_iter, to_global, evaluate=evaluate, eval_at_start=True, on_log=on_log
    )


main = distributed.workdir_command_main(sft, "--config=configs/sft_tiny.py --workdir=/tmp/sft")


if __name__ == "__main__":
    define_flags()
    cli.run(main, DataError, loop.NonFiniteLossError)
