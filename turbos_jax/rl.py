r"""GRPO: `python -m turbos_jax.rl --config=configs/grpo_tiny.py --workdir=W --config.init_from=SFT`.

The trainer's pieces (`turbos_jax/training_loop.py`: mesh, Orbax resume, metrics, progress bar,
SIGTERM, non-finite guard) around one GRPO iteration per step (`posttrain/grpo.py`): prompts ->
G rollouts each -> rewards -> dynamic sampling -> advantages -> one token-level policy update.
`--config.init_from=SFT_WORKDIR` takes that run's newest parameters as the policy and as the frozen
reference (fresh optimizer, step 0). Rerunning the command resumes from W exactly: a checkpoint
holds the policy, the optimizer, the reference, the step (which seeds the rollouts) and the prompt
stream's position, so a killed run draws and samples what the uninterrupted one would have.

Multi-host: the same command on every host with `--coordinator_address --num_processes
--process_id` (as `train`); every process builds the same global batch (posttrain/grpo.py).

Prompts come from `config.rl.sources` (JSONL) mixed by the phase's weights (`config.rl.phases`:
stage I reasoning with a small KL, stage II general with a larger one) and are rendered with the
SFT template (`config.sft`), so the policy sees prompts exactly as in SFT.

Outputs in W as for `train`: metrics.jsonl (every `log_every_steps`: loss, pg_loss, kl, bon_nll,
entropy, clip fractions, reward/<component>, reward_failures/<component>, frac_zero_std,
num_gen_batches, response_tokens, ...), and at step 0 and every `eval_every_steps` a row with
`eval_exact_match` (greedy decoding of the first config.sft.eval_prompts held-out prompts of
config.sft.eval_file, answers checked) and `eval_response_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable

from turbos_jax import cli, distributed
from turbos_jax import training_loop as loop
from turbos_jax.config import check_train_config
from turbos_jax.data import DataError
from turbos_jax.data.sft import make_format, read_examples
from turbos_jax.posttrain import grpo, grpo_config
from turbos_jax.posttrain.evaluation import examples_exact_match
from turbos_jax.posttrain.prompts import PromptError, PromptStream, check_prompt_lengths, load_records
from turbos_jax.step import TrainProgram

# This command's flags (--config, --workdir, multi-host), defined only when it runs as a program.
define_flags = distributed.define_workdir_command_flags


def check_config(config) -> None:
    check_train_config(config)
    grpo_config.check_rl_config(config)


class PromptBatches:
    """The loop's data iterator: each `next()` is one step's prompt records, drawn with the mixture
    of that step's phase. Its state (the stream's position and the steps drawn) goes into every
    checkpoint through grain's get_state / set_state protocol."""

    def __init__(self, stream: PromptStream, phases, prompts_per_step: int):
        self.stream, self.phases, self.prompts_per_step, self.steps = stream, phases, prompts_per_step, 0

    def __iter__(self):
        return self

    def __next__(self) -> list[dict]:
        self.steps += 1
        return self.stream.draw(self.prompts_per_step, grpo.phase_at(self.phases, self.steps).mixture)

    def get_state(self) -> bytes:
        return b"%d\n" % self.steps + self.stream.get_state()

    def set_state(self, state: bytes) -> None:
        steps, _, stream_state = state.partition(b"\n")
        self.steps = int(steps)
        self.stream.set_state(stream_state)

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it; nothing to prefetch
        pass


def rl(config, workdir: str, *, on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Runs (or resumes) GRPO; returns the last logged metrics. `on_log` as in `train_and_evaluate`."""
    # ============================================================ config, workdir, mesh, program
    run = loop.prepare_run(config, workdir, check=check_config)
    rl_cfg = config.rl
    program = grpo.build_rl_program(config, run.model_cfg, run.mesh, config.grad_accum_steps)

    # ============================================================================ data
    fmt = make_format(config)
    text = grpo.sft_text(fmt)
    sources = {
        name: load_records(path, prompt_key=fmt.prompt_key, answer_key=fmt.answer_key, kind=kind)
        for name, (kind, path) in rl_cfg.sources.items()
    }
    for name, records in sources.items():
        where = f"config.rl.sources[{name!r}] {rl_cfg.sources[name][1]}"
        check_prompt_lengths(records, text.prompt_ids, rl_cfg.max_prompt_len, where)
    phases = grpo_config.phases(config)
    batches = PromptBatches(
        PromptStream(sources, config.seed), phases, config.batch_size // rl_cfg.num_generations
    )
    eval_examples = read_examples(config.sft.eval_file, fmt, key="eval_file")[: config.sft.eval_prompts]
    step = grpo.make_grpo_step(
        program,
        grpo_config.settings(config),
        phases,
        batches.stream,
        text,
        grpo_config.reward_spec(config),
        config.seq_len,
    )
    run = run._replace(
        program=TrainProgram(program.setup, program.state_shardings, program.batch_sharding, step, None)
    )

    # ============================================= restore (or policy + reference from init_from)
    from_params = lambda params: grpo.from_params(params, program.setup.tx)  # policy = reference
    start = loop.restore_or_init(run, batches, init=loop.INIT_PARAMS, from_params=from_params)

    # ============================================================================ loop
    def evaluate(params):
        if not eval_examples:
            return {}
        result = examples_exact_match(
            program.setup.graphdef,
            params,
            eval_examples,
            fmt,
            max_new_tokens=rl_cfg.max_new_tokens,
            batch_size=config.sft.eval_batch_size,
            mesh=run.mesh,
        )
        return {"eval_exact_match": result.accuracy, "eval_response_tokens": result.mean_tokens}

    return loop.train_loop(
        run, start, batches, lambda records: records, evaluate=evaluate, eval_at_start=True, on_log=on_log
    )


main = distributed.workdir_command_main(rl, "--config=configs/grpo_tiny.py --workdir=/tmp/grpo")


if __name__ == "__main__":
    define_flags()
    cli.run(main, DataError, PromptError, loop.NonFiniteLossError)
