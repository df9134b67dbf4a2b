r"""Adaptive long-short CoT fusion (TurboS report §3.2.1): SFT data whose responses are as long as
the problem needs.

    python -m turbos_jax.posttrain.cot_fusion --problems=/tmp/arith/eval.jsonl \
        --short_config=configs/sft_tiny.py --short_workdir=/tmp/sft-short \
        --strong_config=configs/sft_tiny.py --strong_workdir=/tmp/sft-long \
        --max_rounds=3 --out=/tmp/fused.jsonl

For each problem {"prompt", "answer"}:
  1. The short-CoT generator answers. If the checker (`answers.is_correct`) accepts the answer, the
     pair is kept as it is (round 0: an easy problem gets a short response).
  2. Otherwise the stronger reasoner gets the problem and the attempts so far, joined by
     `separator`, and continues after them.
  3. Its continuation is checked; a wrong one becomes one more attempt and step 2 repeats, up to
     `max_rounds` continuations.
  4. The training response is every attempt followed by the correct one, joined by `separator`
     (so the final answer the checker reads is the correct one). Problems never solved are left out
     and reported (`unsolved`).
The output JSONL ({"prompt", "response", "answer", "rounds"}) trains with `turbos_jax.sft` as it is.

Choices the report leaves open: the number of rounds (`max_rounds`, default 3); the delimiter between
attempts (`separator`, default " Wait, let me check again. ", without a newline so that the byte
models' "\n" stop byte cannot occur inside a response); the rewrite of the strong reasoner's text into
short style is not done (a callable `strong` may rewrite before returning); unsolved problems are
dropped rather than kept with a wrong answer.

A generator is any callable `(prompts) -> responses`; the strong one is called as
`strong(prompts, continuations)`, the continuation being the attempts so far plus the separator (a
`CheckpointGenerator` appends it after the assistant prefix, so the model continues it).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import NamedTuple

from turbos_jax.posttrain.answers import is_correct

DEFAULT_SEPARATOR = " Wait, let me check again. "


class Fused(NamedTuple):
    records: list[dict]  # {"prompt", "response", "answer", "rounds"} of solved problems, input order
    unsolved: list[dict]  # {"prompt", "answer", "attempts"} of problems no round solved
    rounds: dict[int, int]  # solved problems per round (0 = the short model's first answer)


def fuse(
    problems: Sequence[dict],
    short: Callable[[list[str]], list[str]],
    strong: Callable[[list[str], list[str]], list[str]],
    *,
    max_rounds: int = 3,
    separator: str = DEFAULT_SEPARATOR,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
) -> Fused:
    """Steps 1-4 of the module docstring; every round is one batched call per generator."""
    if max_rounds < 0:
        raise ValueError(f"max_rounds={max_rounds}: must be >= 0")
    prompts = [str(p[prompt_key]) for p in problems]
    answers = [str(p[answer_key]) for p in problems]
    attempts: list[list[str]] = [[r] for r in _checked_call(short, "short", prompts)]
    solved_in: dict[int, int] = {}
    open_ = []
    for i, (a, ref) in enumerate(zip(attempts, answers, strict=True)):
        if is_correct(a[-1], ref):
            solved_in[i] = 0
        else:
            open_.append(i)
    for round_ in range(1, max_rounds + 1):
        if not open_:
            break
        continuations = [separator.join(attempts[i]) + separator for i in open_]
        outs = _checked_call(strong, "strong", [prompts[i] for i in open_], continuations)
        still_open = []
        for i, out in zip(open_, outs, strict=True):
            attempts[i].append(out)
            if is_correct(out, answers[i]):
                solved_in[i] = round_
            else:
                still_open.append(i)
        open_ = still_open
    records = [
        {
            "prompt": prompts[i],
            "response": separator.join(attempts[i]),
            "answer": answers[i],
            "rounds": solved_in[i],
        }
        for i in sorted(solved_in)
    ]
    unsolved = [{"prompt": prompts[i], "answer": answers[i], "attempts": attempts[i]} for i in open_]
    counts = {r: sum(1 for v in solved_in.values() if v == r) for r in range(max_rounds + 1)}
    return Fused(records, unsolved, counts)


def _checked_call(fn, name: str, *args) -> list[str]:
    out = list(fn(*(list(a) for a in args)))
    if len(out) != len(args[0]) or not all(isinstance(o, str) for o in out):
        raise ValueError(
            f"the {name} generator returned {len(out)} responses for {len(args[0])} prompts (strings)"
        )
    return out


def read_problems(path: str, prompt_key: str, answer_key: str) -> list[dict]:
    """{"prompt", "answer"} records of a JSONL file; one-line ValueError naming file:line."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in (prompt_key, answer_key)
            ):
                raise ValueError(f"{path}:{number}: needs string fields {prompt_key!r} and {answer_key!r}")
            problems.append(record)
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def write_jsonl(path: str, records: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------ CLI
_FLAGS = None


def define_flags() -> None:
    """The command's absl flags, defined only when it runs as `python -m ...cot_fusion`."""
    global _FLAGS
    if _FLAGS is not None:
        return
    from absl import flags

    _FLAGS = {
        "problems": flags.DEFINE_string("problems", None, "JSONL of problems with prompt and answer."),
        "short_config": flags.DEFINE_string("short_config", None, "Config file of the short-CoT model."),
        "short_workdir": flags.DEFINE_string("short_workdir", None, "Workdir of the short-CoT model."),
        "strong_config": flags.DEFINE_string("strong_config", None, "Config file of the strong reasoner."),
        "strong_workdir": flags.DEFINE_string("strong_workdir", None, "Workdir of the strong reasoner."),
        "max_rounds": flags.DEFINE_integer("max_rounds", 3, "Continuations by the strong reasoner at most."),
        "separator": flags.DEFINE_string("separator", DEFAULT_SEPARATOR, "Text between attempts."),
        "max_new_tokens": flags.DEFINE_integer("max_new_tokens", 64, "Tokens per attempt at most."),
        "batch_size": flags.DEFINE_integer("batch_size", 64, "Prompts decoded at once."),
        "prompt_key": flags.DEFINE_string("prompt_key", "prompt", "Problem key of the prompt."),
        "answer_key": flags.DEFINE_string("answer_key", "answer", "Problem key of the reference answer."),
        "out": flags.DEFINE_string("out", None, "Output JSONL; unsolved problems go to OUT.unsolved.jsonl."),
    }


def main(argv):
    from absl import app, flags, logging

    from turbos_jax.cli import UserError
    from turbos_jax.posttrain.generators import CheckpointGenerator, load_config_file

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
    f = {name: flag.value for name, flag in _FLAGS.items()}
    for name in ("problems", "short_config", "short_workdir", "strong_config", "strong_workdir", "out"):
        if not f[name]:
            raise UserError(f"--{name} is required")
    for name in ("max_rounds", "max_new_tokens", "batch_size"):
        if f[name] < (0 if name == "max_rounds" else 1):
            raise UserError(f"--{name}={f[name]}: must be >= {0 if name == 'max_rounds' else 1}")
    try:
        problems = read_problems(f["problems"], f["prompt_key"], f["answer_key"])
    except (OSError, ValueError) as e:
        raise UserError(f"--problems: {e}") from None
    gens = {}
    for role in ("short", "strong"):
        config = load_config_file(f"{role}_config", f[f"{role}_config"])
        gens[role] = CheckpointGenerator(
            config, f[f"{role}_workdir"], max_new_tokens=f["max_new_tokens"], batch_size=f["batch_size"]
        )
    result = fuse(
        problems,
        gens["short"],
        gens["strong"],
        max_rounds=f["max_rounds"],
        separator=f["separator"],
        prompt_key=f["prompt_key"],
        answer_key=f["answer_key"],
    )
    write_jsonl(f["out"], result.records)
    write_jsonl(f["out"] + ".unsolved.jsonl", result.unsolved)
    per_round = ", ".join(f"round {r}: {n}" for r, n in result.rounds.items())
    print(f"solved {len(result.records)} of {len(problems)} ({per_round}); unsolved {len(result.unsolved)}")
    print(f"wrote {f['out']} and {f['out']}.unsolved.jsonl")


if __name__ == "__main__":
    from turbos_jax import cli
    from turbos_jax.data import DataError
    from turbos_jax.generate import GenerateError

    define_flags()
    cli.run(main, DataError, GenerateError)
