r"""An embedded verifiable task: seeded arithmetic problems of graded difficulty, with worked solutions.

    python -m turbos_jax.posttrain.arithmetic --out_dir=/tmp/arith --num_train=5000 --num_eval=600 \
        --seed=0 --levels=1,2,3

writes `train.jsonl` ({"prompt", "response"}), `eval.jsonl` ({"prompt", "response", "answer"}) and
`rl_prompts.jsonl` ({"prompt", "answer"}). From Python: `generate(num, split=..., seed=...,
levels=...)` and `write_jsonl`.

Levels (operands are drawn uniformly from the ranges; subtraction puts the larger operand first):

| level | operations | a | b | answer |
| --- | --- | --- | --- | --- |
| 1 | add, sub | 0-99 | 0-99 | 0-198 |
| 2 | add, sub | 100-999 | 100-999 | 0-1998 |
| 3 | mul | 10-999 | 2-9 | 20-8991 |
| 4 | add, sub | 1000-9999 | 1000-9999 | 0-19998 |
| 5 | mul | 10-99 | 10-99 | 100-9801 |

Format, and why:

* The prompt is the bare expression, `"478+256="`, `"523-168="`, `"47*8="`: 4-10 bytes, so a
  byte-level model spends its sequence on the answer. A chat template, if any, belongs to the SFT code.
* The reference `answer` is the plain decimal result, most-significant digit first (`"734"`): the form
  the checker (`turbos_jax.posttrain.answers`) and any evaluation expect. Answers are never negative.
* `solution` is a one-line worked solution ending in `"#### <answer>"`. It computes column by column,
  least-significant digit first, writing each column's full value, so the carry or borrow is in
  the text:
  `478+256=` -> `8+6=14 7+5+1=13 4+2+1=7 #### 734` (a two-digit value carries its tens),
  `523-168=` -> `3-8=-5 2-6-1=-5 5-1-1=3 #### 355` (a negative value borrows: digit = value + 10),
  `47*38=` -> `7*8=56 4*8+5=37 -> 376; 7*3=21 4*3+2=14 -> 1410; 376+1410=1786 #### 1786` (one row per
  digit of b, its value already shifted to that digit's place, then their sum).
  Every step is a single-digit operation plus a carry, which a tiny model can learn (Lee et al.,
  arXiv 2307.03381: scratchpads and least-significant-first digits make addition learnable from far
  fewer examples than a bare most-significant-first answer). The final answer stays most-significant
  first, so short- and long-CoT responses share one reference and one checker; `"####"` is the
  shortest marker the checker ranks above "the last number in the text". Prompts and solutions
  contain no newline, so `"\n"` can serve as the stop byte. Prompt + solution is at most 80 bytes.
* Short-CoT data uses `answer` as the response (`--response=answer`); long-CoT data uses
  `solution` (the default). The bare answer is the harder format, which leaves headroom for RL.

Splits: a problem's split is a function of the problem only, never of the seed or the level list:
`sha256("add:256:478")` (commutative operands sorted) mapped to [0, 1) falls in train (70%), eval (10%)
or rl (20%). So `a+b` and `b+a` share a split, and no seed can put an eval problem into a training
file. A split draws problems from its own random stream (seed and split name), so changing
`--num_train` does not change the eval set.

Determinism: `numpy.random.Generator` (PCG64) with int64 draws and SHA-256 give the same problems
on every platform; tests pin the first problems of seed 0.

`SFT_PARAMS` is the shipped SFT start of the GRPO demonstration: configs/sft_tiny.py's parameters
after its 1,800 steps on the 800 examples of `--levels=2 --operations=add --response=answer
--num_train=800` (46.0 % held-out greedy exact match on the 500 eval prompts), as a parameters file
(turbos_jax/params_file.py); configs/grpo_tiny.py starts from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

OPERATIONS = {"add": "+", "sub": "-", "mul": "*"}
SFT_PARAMS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "shipped", "sft_tiny_addition.safetensors"
)


@dataclasses.dataclass(frozen=True)
class Level:
    operations: tuple[str, ...]
    a_range: tuple[int, int]  # inclusive
    b_range: tuple[int, int]  # inclusive


LEVELS = {
    1: Level(("add", "sub"), (0, 99), (0, 99)),
    2: Level(("add", "sub"), (100, 999), (100, 999)),
    3: Level(("mul",), (10, 999), (2, 9)),
    4: Level(("add", "sub"), (1000, 9999), (1000, 9999)),
    5: Level(("mul",), (10, 99), (10, 99)),
}

# Fractions of the problem space per split, in hash order. Changing them moves problems between splits.
SPLITS = {"train": 0.7, "eval": 0.1, "rl": 0.2}
MAX_TEXT_BYTES = 80  # longest prompt + solution over all levels (99*99: 78)

SFT_KEYS = {"prompt": "prompt", "response": "solution"}  # output key -> Problem field
EVAL_KEYS = {"prompt": "prompt", "answer": "answer"}


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str  # "add-478-256": the problem itself, the same in every file and seed
    prompt: str  # "478+256="
    answer: str  # "734"
    solution: str  # "8+6=14 7+5+1=13 4+2+1=7 #### 734"
    difficulty: int  # the level
    operation: str  # "add", "sub" or "mul"
    operands: tuple[int, int]
    carries: int  # nonzero carries (borrows) the solution propagates; the final row sum is not counted

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _digits(n: int) -> list[int]:
    """Least-significant first."""
    return [int(c) for c in reversed(str(n))]


def _column_steps(a: int, b: int, sign: str) -> tuple[list[str], int]:
    """Column-wise addition (sign "+") or subtraction (sign "-", a >= b), least-significant first."""
    da, db = _digits(a), _digits(b)
    steps, carry, carries = [], 0, 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        value = x + y + carry if sign == "+" else x - y - carry
        steps.append(f"{x}{sign}{y}" + (f"{sign}{carry}" if carry else "") + f"={value}")
        carry = value // 10 if sign == "+" else int(value < 0)
        carries += carry > 0
    return steps, carries


def _multiply_steps(a: int, b: int) -> tuple[list[str], int]:
    rows, partials, carries = [], [], 0
    for place, y in enumerate(_digits(b)):
        steps, carry = [], 0
        for x in _digits(a):
            value = x * y + carry
            steps.append(f"{x}*{y}" + (f"+{carry}" if carry else "") + f"={value}")
            carry = value // 10
            carries += carry > 0
        partials.append(a * y * 10**place)
        rows.append(" ".join(steps) + f" -> {partials[-1]}")
    if len(partials) > 1:
        rows.append("+".join(map(str, partials)) + f"={a * b}")
    return ["; ".join(rows)], carries


def make_problem(operation: str, a: int, b: int, difficulty: int) -> Problem:
    """The problem `a <op> b` with its reference answer and worked solution."""
    if operation == "add":
        answer, (steps, carries) = a + b, _column_steps(a, b, "+")
    elif operation == "sub":
        if a < b:
            raise ValueError(f"sub needs a >= b, got {a}-{b}")
        answer, (steps, carries) = a - b, _column_steps(a, b, "-")
    elif operation == "mul":
        answer, (steps, carries) = a * b, _multiply_steps(a, b)
    else:
        raise ValueError(f"unknown operation {operation!r}; expected one of {sorted(OPERATIONS)}")
    return Problem(
        id=f"{operation}-{a}-{b}",
        prompt=f"{a}{OPERATIONS[operation]}{b}=",
        answer=str(answer),
        solution=" ".join(steps) + f" #### {answer}",
        difficulty=difficulty,
        operation=operation,
        operands=(a, b),
        carries=int(carries),
    )


def split_of(operation: str, a: int, b: int) -> str:
    """The split ("train", "eval" or "rl") that owns `a <op> b`, from a hash of the canonical problem."""
    x, y = (min(a, b), max(a, b)) if operation in ("add", "mul") else (a, b)
    digest = hashlib.sha256(f"{operation}:{x}:{y}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    edge = 0.0
    for name, fraction in SPLITS.items():
        edge += fraction
        if u < edge:
            return name
    return name  # u within rounding of 1.0


def _operation_weights(level: int, operations: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    allowed = [op for op in LEVELS[level].operations if operations.get(op, 0) > 0]
    if not allowed:
        raise ValueError(
            f"level {level} has operations {'/'.join(LEVELS[level].operations)}, none of them among "
            f"the requested {'/'.join(op for op, w in operations.items() if w > 0) or 'none'}"
        )
    weights = np.array([operations[op] for op in allowed], np.float64)
    return allowed, weights / weights.sum()


def _check_args(split: str, levels: Sequence[int], operations: Mapping[str, float]) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct and not empty, got {list(levels)}")
    for level in levels:
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}; levels are {sorted(LEVELS)}")
    for op, weight in operations.items():
        if op not in OPERATIONS:
            raise ValueError(f"unknown operation {op!r}; expected one of {sorted(OPERATIONS)}")
        if not weight >= 0:
            raise ValueError(f"operation {op} has weight {weight}; weights must be >= 0")


def generate(
    num: int,
    *,
    split: str,
    seed: int,
    levels: Sequence[int] = (1, 2, 3),
    operations: Mapping[str, float] | Iterable[str] | None = None,
    unique: bool = False,
) -> list[Problem]:
    """`num` problems of one split, the same for the same arguments on every platform.

    Args:
      split: "train", "eval" or "rl"; only problems that `split_of` assigns to it are kept.
      seed: with the split name, seeds the random stream.
      levels: `num` is shared evenly among them (the first levels get the remainder); the result is
        shuffled. So a set of another size is a different set, not a prefix of this one.
      operations: the operation mix, a weight per operation (`{"add": 2, "sub": 1}`) or a list of
        operations with equal weights; None means all. Each problem's operation is drawn among those
        of its level with positive weight; a level left with none is an error.
      unique: no problem twice (for evaluation sets). ValueError when a level's part of the split is
        too small to give its share.
    """
    if operations is None:
        operations = dict.fromkeys(OPERATIONS, 1.0)
    elif not isinstance(operations, Mapping):
        operations = dict.fromkeys(operations, 1.0)
    _check_args(split, levels, operations)
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    split_index = list(SPLITS).index(split)
    rng = np.random.default_rng([seed, split_index])
    quotas = [num // len(levels) + (i < num % len(levels)) for i in range(len(levels))]
    problems = []
    for level, quota in zip(levels, quotas, strict=True):
        ops, probs = _operation_weights(level, operations)
        spec, seen, drawn = LEVELS[level], set(), 0
        max_draws = 100 * quota + 10_000
        while drawn < quota:
            if max_draws == 0:
                raise ValueError(
                    f"level {level}: found {len(seen)} of {quota} distinct {split} problems; its share of "
                    "the split is too small, ask for fewer problems or add levels"
                )
            max_draws -= 1
            op = ops[int(rng.choice(len(ops), p=probs))] if len(ops) > 1 else ops[0]
            a = int(rng.integers(spec.a_range[0], spec.a_range[1] + 1, dtype=np.int64))
            b = int(rng.integers(spec.b_range[0], spec.b_range[1] + 1, dtype=np.int64))
            if op == "sub" and a < b:
                a, b = b, a
            if split_of(op, a, b) != split or (unique and (op, a, b) in seen):
                continue
            seen.add((op, a, b))
            drawn += 1
            problems.append(make_problem(op, a, b, level))
    order = rng.permutation(len(problems))
    return [problems[i] for i in order]


def to_record(problem: Problem, keys: Mapping[str, str]) -> dict:
    """The JSON object for one problem: output key -> the named Problem field."""
    fields = problem.as_dict()
    record = {}
    for out_key, field in keys.items():
        if field not in fields:
            raise ValueError(f"unknown problem field {field!r} for key {out_key!r}; fields: {list(fields)}")
        record[out_key] = fields[field]
    return record


def write_jsonl(path: str, problems: Iterable[Problem], keys: Mapping[str, str] = SFT_KEYS) -> int:
    """Writes one JSON object per line (`to_record`); returns the number written. Use `SFT_KEYS`
    (default) for SFT data, `EVAL_KEYS` for evaluation and RL prompts."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for problem in problems:
            f.write(json.dumps(to_record(problem, keys), ensure_ascii=False) + "\n")
            count += 1
    return count


def write_task_files(
    out_dir: str,
    *,
    num_train: int,
    num_eval: int,
    num_rl: int,
    seed: int,
    levels: Sequence[int] = (1, 2, 3),
    operations: Mapping[str, float] | Iterable[str] | None = None,
    response: str = "solution",
    metadata: bool = False,
) -> dict[str, str]:
    """Writes OUT_DIR/{train,eval,rl_prompts}.jsonl; returns {split: path}.

    train.jsonl holds {"prompt", "response"} with `response` the worked solution ("solution") or the
    bare answer ("answer"); eval.jsonl holds {"prompt", "response", "answer"} without repeats (the
    held-out set of SFT: loss on the response, exact match against the answer); rl_prompts.jsonl
    holds {"prompt", "answer"}. metadata adds "id", "difficulty" and "operation" to every line.
    """
    if response not in ("solution", "answer"):
        raise ValueError(f"response must be 'solution' or 'answer', got {response!r}")
    extra = {"id": "id", "difficulty": "difficulty", "operation": "operation"} if metadata else {}
    plan = {
        "train": ("train.jsonl", num_train, False, {"prompt": "prompt", "response": response}),
        "eval": (
            "eval.jsonl",
            num_eval,
            True,
            {"prompt": "prompt", "response": response, "answer": "answer"},
        ),
        "rl": ("rl_prompts.jsonl", num_rl, False, dict(EVAL_KEYS)),
    }
    batches = {
        split: generate(num, split=split, seed=seed, levels=levels, operations=operations, unique=unique)
        for split, (_, num, unique, _) in plan.items()
    }  # everything is checked before a file is written
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, (name, _, _, keys) in plan.items():
        paths[split] = os.path.join(out_dir, name)
        write_jsonl(paths[split], batches[split], {**keys, **extra})
    return paths


# ------------------------------------------------------------------------------------------ CLI
_FLAGS = None


def define_flags() -> None:
    """The command's absl flags, defined only when it runs as `python -m ...arithmetic`."""
    global _FLAGS
    if _FLAGS is not None:
        return
    from absl import flags

    _FLAGS = {
        "out_dir": flags.DEFINE_string("out_dir", None, "Directory for train/eval/rl_prompts.jsonl."),
        "num_train": flags.DEFINE_integer("num_train", 5000, "SFT examples (drawn with replacement)."),
        "num_eval": flags.DEFINE_integer("num_eval", 600, "Held-out evaluation problems (distinct)."),
        "num_rl": flags.DEFINE_integer("num_rl", 2000, "RL prompts."),
        "seed": flags.DEFINE_integer("seed", 0, "Random seed."),
        "levels": flags.DEFINE_string("levels", "1,2,3", f"Comma-separated levels from {sorted(LEVELS)}."),
        "operations": flags.DEFINE_string("operations", "add,sub,mul", "Comma-separated operations."),
        "response": flags.DEFINE_string("response", "solution", "SFT response: 'solution' or 'answer'."),
        "metadata": flags.DEFINE_bool("metadata", False, "Add id, difficulty, operation to every line."),
    }


def _parse_list(flag: str, text: str, parse, allowed) -> list:
    from turbos_jax.cli import UserError

    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [parse(t) for t in items]
    except ValueError:
        values = None
    if not values or any(v not in allowed for v in values):
        raise UserError(f"--{flag}={text!r}: expected a comma-separated list from {sorted(allowed)}")
    return values


def main(argv):
    from absl import app

    from turbos_jax.cli import UserError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = {name: flag.value for name, flag in _FLAGS.items()}
    if not f["out_dir"]:
        raise UserError("--out_dir is required")
    for name in ("num_train", "num_eval", "num_rl"):
        if f[name] < 0:
            raise UserError(f"--{name}={f[name]}: must be >= 0")
    if f["response"] not in ("solution", "answer"):
        raise UserError(f"--response={f['response']!r}: expected 'solution' (worked) or 'answer' (bare)")
    levels = _parse_list("levels", f["levels"], int, LEVELS)
    if len(set(levels)) != len(levels):
        raise UserError(f"--levels={f['levels']!r}: a level is repeated")
    operations = _parse_list("operations", f["operations"], str, OPERATIONS)
    for level in levels:
        try:
            _operation_weights(level, dict.fromkeys(operations, 1.0))
        except ValueError as e:
            raise UserError(f"--levels={f['levels']} --operations={f['operations']}: {e}") from None
    try:
        paths = write_task_files(
            f["out_dir"],
            num_train=f["num_train"],
            num_eval=f["num_eval"],
            num_rl=f["num_rl"],
            seed=f["seed"],
            levels=levels,
            operations=operations,
            response=f["response"],
            metadata=f["metadata"],
        )
    except ValueError as e:  # only the distinct eval set can run out of problems
        raise UserError(f"--num_eval={f['num_eval']}: {e}") from None
    for split, path in paths.items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    from turbos_jax import cli

    define_flags()
    cli.run(main)
