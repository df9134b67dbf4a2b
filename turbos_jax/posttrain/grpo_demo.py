"""The GRPO demonstration: GRPO against two controls from one SFT checkpoint, at equal wall-clock.

Three arms start from the same SFT start (a workdir or parameters file; the shipped one in
benchmarks/grpo_demo.py and notebook 05) and run for the same budget of minutes:

  grpo      `turbos_jax.rl.rl` with configs/grpo_tiny.py, stage I only (one phase of math prompts);
  sft       `turbos_jax.sft.sft` with configs/sft_tiny.py continued on the same labelled examples
            (fresh optimizer, the GRPO arm's constant learning rate): rules out "just more training";
  shuffled  the grpo arm with `rl.shuffle_rewards` (rewards permuted across the batch): rules out
            "any update helps" and sign bugs.

`run_arm` runs one arm in this process: every metrics row, stamped with seconds since the call, is
appended to WORKDIR/timeline.jsonl, and at the first row past the budget the process sends itself
SIGTERM, so the trainer checkpoints after that step and returns (its graceful stop). Compiles,
evaluations and checkpoints count in the wall-clock, as they would for a user. Arms are compared by
their last held-out evaluation at or before a time (`at_time`). `benchmarks/grpo_demo.py` runs arms x
seeds in pinned child processes; notebook 05 runs one seed in its kernel.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Mapping, Sequence

ARMS = ("grpo", "sft", "shuffled")
LABELS = {"grpo": "GRPO", "sft": "continued SFT", "shuffled": "GRPO, shuffled rewards"}
# Rough seconds per step on one CPU core (benchmarks/RESULTS.md), only to turn `eval_seconds` into
# an evaluation cadence in steps and to size a schedule the budget, not the step count, ends.
STEP_SECONDS = {"grpo": 3.0, "sft": 0.2, "shuffled": 3.0}
TIMELINE = "timeline.jsonl"
Points = list[tuple[float, float]]  # (minutes since the start, held-out exact match)


def arm_config(
    arm: str,
    *,
    seed: int,
    init_from: str,
    data_dir: str,
    minutes: float,
    eval_seconds: float = 60.0,
    eval_prompts: int = 500,
    learning_rate: float = 1e-4,
    beta: float = 0.001,
):
    """The arm's config: the shipped config with the task files of `data_dir` (train.jsonl,
    eval.jsonl, rl_prompts.jsonl), `seed`, the SFT start and a constant-rate schedule long enough
    that the budget, not the step count, ends the run."""
    from configs import grpo_tiny, sft_tiny

    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; arms are {ARMS}")
    if arm == "sft":
        config = sft_tiny.get_config()
        config.sft.train_file = os.path.join(data_dir, "train.jsonl")
    else:
        config = grpo_tiny.get_config()
        config.rl.sources = {"math": ("answer", os.path.join(data_dir, "rl_prompts.jsonl"))}
        config.rl.shuffle_rewards = arm == "shuffled"
    steps = max(1, int(10 * minutes * 60 / STEP_SECONDS[arm]))  # 10x the expected count
    every = max(1, round(eval_seconds / STEP_SECONDS[arm]))
    config.seed = seed
    config.init_from = init_from
    config.total_steps = steps
    config.eval_every_steps = config.checkpoint_every_steps = every
    config.log_every_steps = max(1, min(config.log_every_steps, every))
    config.optim.schedule = (("constant", steps, learning_rate),)
    config.sft.eval_file = os.path.join(data_dir, "eval.jsonl")
    config.sft.eval_prompts = eval_prompts
    config.sft.eval_batch_size = min(eval_prompts, 250)
    if arm != "sft":
        config.rl.phases = ((steps, beta, {"math": 1.0}),)
    return config


def run_arm(
    arm: str,
    config,
    workdir: str,
    minutes: float,
    *,
    on_log: Callable[[int, dict], None] | None = None,
) -> Points:
    """Runs `arm` (its `arm_config`, possibly edited) in `workdir` for `minutes` of wall-clock;
    returns its timeline's evaluations. `on_log(step, row)` also sees every row (a live plot)."""
    from turbos_jax import rl, sft

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, TIMELINE)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: an arm runs once per workdir; remove the workdir to rerun")
    start, stopping = time.perf_counter(), []
    with open(path, "w", encoding="utf-8") as timeline:

        def stamp_and_check(step, row):
            elapsed = time.perf_counter() - start
            timeline.write(json.dumps({"elapsed_s": round(elapsed, 2), **row}) + "\n")
            timeline.flush()
            if on_log is not None:
                on_log(step, row)
            if elapsed >= minutes * 60 and not stopping:
                stopping.append(step)
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer saves after this step and returns

        command = sft.sft if arm == "sft" else rl.rl
        command(config, os.path.join(workdir, "run"), on_log=stamp_and_check)
    return read_timeline(path)


def read_timeline(path: str) -> Points:
    """[(minutes, eval_exact_match)] of one arm's timeline, in order."""
    points = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "eval_exact_match" in row:
                points.append((row["elapsed_s"] / 60, row["eval_exact_match"]))
    if not points:
        raise ValueError(f"{path}: no evaluation rows (the run stopped before its step-0 evaluation?)")
    return points


def finished(workdir: str, minutes: float) -> bool:
    """Whether `workdir` holds a timeline that reached the budget."""
    path = os.path.join(workdir, TIMELINE)
    if not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return bool(rows) and rows[-1]["elapsed_s"] >= minutes * 60


def at_time(points: Points, minutes: float) -> float:
    """The last evaluation at or before `minutes` (the first one's value before it)."""
    value = points[0][1]
    for t, v in points:
        if t <= minutes + 1e-9:
            value = v
    return value


def comparison_table(results: Mapping[tuple[str, int], Points], times: Sequence[float]) -> str:
    """Markdown: held-out exact match (%) of each arm at `times`, mean over seeds, then per seed."""
    arms = list(dict.fromkeys(arm for arm, _ in results))
    lines = ["| arm | " + " | ".join(f"{t:g} min" for t in times) + " |", "| --- |" + " ---: |" * len(times)]
    for arm in arms:
        seeds = sorted(s for a, s in results if a == arm)
        grid = [[100 * at_time(results[arm, s], t) for t in times] for s in seeds]
        cells = []
        for column in zip(*grid, strict=True):
            cells.append(f"{sum(column) / len(column):.1f} ({' / '.join(f'{v:.1f}' for v in column)})")
        lines.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(
    results: Mapping[tuple[str, int], Points], minutes: float, margin: float = 10.0
) -> tuple[bool, list[str]]:
    """Per seed at the budget: GRPO's gain over the SFT start and its lead over the sft arm (points);
    passes when both are >= `margin` for every seed."""
    lines, passed = [], True
    for seed in sorted(s for a, s in results if a == "grpo"):
        start = 100 * results["grpo", seed][0][1]
        grpo = 100 * at_time(results["grpo", seed], minutes)
        line = f"seed {seed}: GRPO {start:.1f} -> {grpo:.1f} % ({grpo - start:+.1f})"
        ok = grpo - start >= margin
        for control in ("sft", "shuffled"):
            if (control, seed) in results:
                other = 100 * at_time(results[control, seed], minutes)
                line += f", {LABELS[control]} {other:.1f} %"
                ok &= control != "sft" or grpo - other >= margin
        passed &= ok
        lines.append(line)
    lines.append(f"GRPO >= {margin:g} points above the start and continued SFT for every seed: {passed}")
    return passed, lines


def plot_arms(ax, results: Mapping[tuple[str, int], Points], minutes: float) -> None:
    """Exact match (%) against minutes on a matplotlib axis, one line per run, a colour per arm."""
    colors = {"grpo": "tab:blue", "sft": "tab:orange", "shuffled": "tab:gray"}
    labelled = set()
    for (arm, _), points in sorted(results.items()):
        t, v = zip(*points, strict=True)
        label = None if arm in labelled else LABELS[arm]
        labelled.add(arm)
        ax.plot(t, [100 * x for x in v], "o-", ms=2.5, lw=1.2, color=colors[arm], alpha=0.85, label=label)
    ax.set(
        xlabel="wall-clock minutes",
        ylabel="held-out greedy exact match (%)",
        xlim=(0, minutes),
        ylim=(0, 100),
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
