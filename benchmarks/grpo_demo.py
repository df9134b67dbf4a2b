r"""GRPO against its two controls on the arithmetic task, at equal wall-clock, over several seeds.

    python -m turbos_jax.posttrain.arithmetic --out_dir=/tmp/turbos-arith --levels=2 \
        --operations=add --response=answer --num_train=800 --num_eval=500 --num_rl=20000
    python benchmarks/grpo_demo.py --data_dir=/tmp/turbos-arith \
        --out_dir=/tmp/grpo-demo --minutes=12 --seeds=0,1,2 --parallel=2 --cores_per_run=1 \
        --plot=docs/images/grpo_demo.png

The arms (grpo, continued sft, grpo with shuffled rewards) and their configs are
`turbos_jax/posttrain/grpo_demo.py`'s. Each (arm, seed) runs in a spawned child process pinned to
`--cores_per_run` CPUs, `--parallel` at a time (pinning keeps two concurrent runs from fighting
over the same cores, so the arms of a pair see the same machine). Prints the comparison table
(held-out greedy exact match at 0, the report times and the budget; mean and per seed) and the
verdict (GRPO >= 10 points above the start and above continued SFT, every seed). Finished arms in
OUT_DIR are reused, so rerunning after an interruption only runs what is missing.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS


def child(arm: str, seed: int, workdir: str, options: dict, cores: list[int]) -> None:
    if cores:
        os.sched_setaffinity(0, set(cores))  # before jax starts: XLA sizes its thread pool then
    from turbos_jax.posttrain import grpo_demo

    config = grpo_demo.arm_config(arm, seed=seed, **options["config"])
    grpo_demo.run_arm(arm, config, workdir, options["config"]["minutes"])


def run_all(jobs, options: dict) -> None:
    """Runs every (arm, seed) whose workdir has no finished timeline, `parallel` at a time."""
    from turbos_jax.posttrain import grpo_demo

    ctx = multiprocessing.get_context("spawn")
    available = sorted(os.sched_getaffinity(0))
    running: dict[int, multiprocessing.Process] = {}  # slot -> child
    for arm, seed, workdir in jobs:
        if grpo_demo.finished(workdir, options["config"]["minutes"]):
            print(f"{arm} seed {seed}: reusing {workdir}", flush=True)
            continue
        if os.path.exists(workdir):
            raise SystemExit(f"grpo_demo: {workdir} holds an unfinished run; remove it and rerun")
        while len(running) >= FLAGS.parallel:
            _reap(running)
        slot = min(set(range(FLAGS.parallel)) - set(running))
        n = FLAGS.cores_per_run
        cores = [available[(slot * n + i) % len(available)] for i in range(n)]
        proc = ctx.Process(target=child, args=(arm, seed, workdir, options, cores), daemon=True)
        proc.start()
        print(f"{arm} seed {seed}: started in {workdir} (cores {cores or 'all'})", flush=True)
        running[slot] = proc
    while running:
        _reap(running)


def _reap(running: dict) -> None:
    time.sleep(1)
    for slot, proc in list(running.items()):
        if proc.is_alive():
            continue
        del running[slot]
        if proc.exitcode:
            for other in running.values():
                other.terminate()
            raise SystemExit(
                f"grpo_demo: a run failed with exit code {proc.exitcode}; its workdir has the log"
            )


def define_flags() -> None:
    flags.DEFINE_string(
        "init_from", "", "SFT workdir or parameters file every arm starts from (default: the shipped one)."
    )
    flags.DEFINE_string("data_dir", None, "Task files (train, eval, rl_prompts .jsonl).", required=True)
    flags.DEFINE_string("out_dir", None, "Runs go to OUT_DIR/ARM-sSEED.", required=True)
    flags.DEFINE_float("minutes", 12.0, "Wall-clock budget of every run.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (rollouts, prompt and example order).")
    flags.DEFINE_list("arms", ["grpo", "sft", "shuffled"], "Arms to run.")
    flags.DEFINE_integer("parallel", 1, "Runs at a time.")
    flags.DEFINE_integer("cores_per_run", 0, "CPUs each run is pinned to (0: no pinning).")
    flags.DEFINE_float("eval_seconds", 60.0, "About how often each run evaluates.")
    flags.DEFINE_integer("eval_prompts", 500, "Held-out prompts per evaluation.")
    flags.DEFINE_float("learning_rate", 1e-4, "Constant learning rate of every arm.")
    flags.DEFINE_float("beta", 0.001, "KL coefficient of the GRPO arms.")
    flags.DEFINE_list("report_minutes", ["4", "8"], "Table columns besides 0 and the budget.")
    flags.DEFINE_string("plot", "", "PNG file for the plot ('' = none).")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from turbos_jax.posttrain import arithmetic, grpo_demo

    if bad := set(FLAGS.arms) - set(grpo_demo.ARMS) or ({"grpo"} - set(FLAGS.arms)):
        raise app.UsageError(f"--arms: {sorted(bad)} invalid; choose among {grpo_demo.ARMS}, grpo included")
    seeds = [int(s) for s in FLAGS.seeds]
    options = {
        "config": {
            "init_from": FLAGS.init_from or arithmetic.SFT_PARAMS,
            "data_dir": FLAGS.data_dir,
            "minutes": FLAGS.minutes,
            "eval_seconds": FLAGS.eval_seconds,
            "eval_prompts": FLAGS.eval_prompts,
            "learning_rate": FLAGS.learning_rate,
            "beta": FLAGS.beta,
        }
    }
    jobs = [(arm, s, os.path.join(FLAGS.out_dir, f"{arm}-s{s}")) for s in seeds for arm in FLAGS.arms]
    run_all(jobs, options)
    results = {(arm, s): grpo_demo.read_timeline(os.path.join(w, grpo_demo.TIMELINE)) for arm, s, w in jobs}
    times = [0.0, *(float(t) for t in FLAGS.report_minutes if float(t) < FLAGS.minutes), FLAGS.minutes]
    print(grpo_demo.comparison_table(results, times))
    print("\n".join(grpo_demo.verdict(results, FLAGS.minutes)[1]))
    if FLAGS.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        grpo_demo.plot_arms(ax, results, FLAGS.minutes)
        ax.set_title(f"3-digit addition, tiny model: {len(seeds)} seed(s) per arm")
        fig.tight_layout()
        os.makedirs(os.path.dirname(FLAGS.plot) or ".", exist_ok=True)
        fig.savefig(FLAGS.plot, dpi=110)
        print(f"plot: {FLAGS.plot}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
    define_flags()
    app.run(main)
