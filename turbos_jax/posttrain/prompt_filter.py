r"""Prompt filtering (TurboS §3.5.2): keep the prompts the policy solves sometimes but not always.

    python -m turbos_jax.posttrain.prompt_filter --config=configs/grpo_tiny.py \
        --init_from=SFT_WORKDIR --prompts=rl_prompts.jsonl --out=filtered.jsonl --k=8

1. Every prompt is sampled K times from the policy (the newest checkpoint of --init_from, or a
   parameters file) at the RL temperature, through the same rollout path as GRPO
   (rollouts.sample_groups).
2. Each response is scored by the prompt's verifier (answer checker or code sandbox) and the pass
   rate is the fraction of correct responses (Kimi k1.5 uses the same estimate of difficulty).
3. Prompts with low < pass rate < high are written to --out (input lines unchanged, plus
   "pass_rate"); the rest carry no GRPO signal (all-equal groups) and are dropped. A histogram of
   pass rates is printed.
A prompt whose reward fails (checker exception, sandbox crash) counts as not solved and is counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import jax
import numpy as np

from turbos_jax.posttrain import rewards
from turbos_jax.posttrain import rollouts as ro_lib
from turbos_jax.posttrain.grpo import decode_responses


def pass_rates(
    graphdef,
    params,
    records: Sequence[dict],
    *,
    text,
    k: int,
    max_prompt_len: int,
    max_new_tokens: int,
    prompts_per_batch: int,
    temperature: float,
    seed: int,
    reward_spec: rewards.RewardSpec,
) -> tuple[np.ndarray, int]:
    """Steps 1-2 -> ((N,) pass rates, reward failures). Batches hold `prompts_per_batch` prompts
    (the last one padded with copies of its first prompt, so one program is compiled)."""
    rates, failures = [], 0
    for start in range(0, len(records), prompts_per_batch):
        chunk = list(records[start : start + prompts_per_batch])
        real = len(chunk)
        chunk += [chunk[0]] * (prompts_per_batch - real)
        texts_in = [r["prompt"] for r in chunk]
        prompts, lengths = ro_lib.encode_prompts(text.prompt_ids, texts_in, max_prompt_len)
        ro = ro_lib.sample_groups(
            graphdef,
            params,
            prompts,
            lengths,
            group_size=k,
            max_new_tokens=max_new_tokens,
            rng=jax.random.fold_in(jax.random.key(seed), start),
            eos_id=text.stop_id,
            temperature=temperature,
        )
        texts, ids = decode_responses(text, ro)
        meta = [r for r in chunk for _ in range(k)]
        _, parts, metrics = rewards.score(reward_spec, [m["prompt"] for m in meta], texts, meta, ids, k)
        correct = parts[reward_spec.correctness] >= 1.0
        rates.extend(rewards.pass_rates(correct, k)[::k][:real].tolist())
        failures += sum(v for key, v in metrics.items() if key.startswith("reward_failures/"))
    return np.asarray(rates), failures


def keep_mask(rates: np.ndarray, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Step 3: low < rate < high (strict: always- and never-solved prompts go)."""
    return (rates > low) & (rates < high)


def histogram(rates: np.ndarray, k: int) -> str:
    """One line per possible pass rate i/k: count and a bar."""
    counts = np.bincount(np.rint(rates * k).astype(int), minlength=k + 1)
    width = max(1, int(counts.max()))
    return "\n".join(f"{i}/{k}: {c:6d} {'#' * int(40 * c / width)}" for i, c in enumerate(counts))


def write_filtered(path: str, lines: Sequence[dict], rates: np.ndarray, keep: np.ndarray) -> int:
    """Writes kept input records with their "pass_rate"; returns how many."""
    with open(path, "w") as f:
        for row, rate, ok in zip(lines, rates, keep, strict=True):
            if ok:
                f.write(json.dumps({**row, "pass_rate": float(rate)}) + "\n")
    return int(keep.sum())


# ------------------------------------------------------------------------------ command line
_FLAGS = {}  # absl flags, defined by define_flags() (not on import)


def define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    if _FLAGS:
        return
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "RL config (config.rl, config.sft).")
    _FLAGS["init_from"] = flags.DEFINE_string(
        "init_from", None, "Workdir or parameters file of the policy (default config.init_from)."
    )
    _FLAGS["prompts"] = flags.DEFINE_string("prompts", None, "JSONL prompts to filter.")
    _FLAGS["kind"] = flags.DEFINE_enum("kind", "answer", ["answer", "code"], "How the prompts are verified.")
    _FLAGS["out"] = flags.DEFINE_string("out", None, "Where the kept prompts go (JSONL).")
    _FLAGS["k"] = flags.DEFINE_integer("k", 8, "Samples per prompt.", lower_bound=2)
    _FLAGS["batch_prompts"] = flags.DEFINE_integer(
        "batch_prompts", 16, "Prompts sampled at once.", lower_bound=1
    )
    _FLAGS["low"] = flags.DEFINE_float("low", 0.0, "Keep pass rates above this ...")
    _FLAGS["high"] = flags.DEFINE_float("high", 1.0, "... and below this.")


def filter_prompts(
    config,
    *,
    init_from: str,
    prompts: str,
    kind: str,
    out: str,
    k: int,
    batch_prompts: int,
    low: float,
    high: float,
) -> np.ndarray:
    """The command: steps 1-3 of the module docstring with the policy of `init_from`; -> rates."""
    import os

    from turbos_jax import params_file, sharding
    from turbos_jax.config import ModelConfig
    from turbos_jax.data.sft import make_format
    from turbos_jax.posttrain import grpo, grpo_config
    from turbos_jax.posttrain.prompts import load_records

    grpo_config.check_rl_config(config)
    fmt = make_format(config)
    records = load_records(prompts, prompt_key=fmt.prompt_key, answer_key=fmt.answer_key, kind=kind)
    with open(prompts) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    model_cfg = ModelConfig.from_config(config.model)
    mesh = sharding.train_mesh(config, model_cfg)
    program = grpo.build_rl_program(config, model_cfg, mesh, 1)
    with jax.set_mesh(mesh):
        abstract = sharding.sharded_abstract(program.setup.abstract_state, mesh)
        source = os.path.abspath(os.path.expanduser(init_from))
        step, policy = params_file.init_params(source, abstract, config)
        print(f"policy: {init_from} checkpoint step {step}; {len(records)} prompts x {k} samples", flush=True)
        rates, failures = pass_rates(
            program.setup.graphdef,
            policy,
            records,
            text=grpo.sft_text(fmt),
            k=k,
            max_prompt_len=config.rl.max_prompt_len,
            max_new_tokens=config.rl.max_new_tokens,
            prompts_per_batch=batch_prompts,
            temperature=config.rl.temperature,
            seed=config.seed,
            reward_spec=grpo_config.reward_spec(config),
        )
    keep = keep_mask(rates, low, high)
    kept = write_filtered(out, lines, rates, keep)
    print(histogram(rates, k))
    print(
        f"kept {kept} of {len(records)} prompts with {low} < pass rate < {high} -> {out}; "
        f"reward failures: {failures}"
    )
    return rates


def main(argv):
    from absl import app, flags, logging

    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = {name: flag.value for name, flag in _FLAGS.items()}
    if f["config"] is None or not f["prompts"] or not f["out"]:
        raise app.UsageError("--config, --prompts and --out are required")
    init_from = f["init_from"] or f["config"].init_from
    if not init_from:
        raise app.UsageError("--init_from (or config.init_from) must name the policy's workdir")
    filter_prompts(
        f["config"],
        init_from=init_from,
        prompts=f["prompts"],
        kind=f["kind"],
        out=f["out"],
        k=f["k"],
        batch_prompts=f["batch_prompts"],
        low=f["low"],
        high=f["high"],
    )


if __name__ == "__main__":
    from turbos_jax import cli
    from turbos_jax.data import DataError
    from turbos_jax.posttrain.prompts import PromptError

    define_flags()
    cli.run(main, DataError, PromptError)
