# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Post-training: SFT, then GRPO with a verifiable reward
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/turbos-jax/turbos-jax/blob/main/notebooks/05_post_training.ipynb)
#
# The two post-training stages of TurboS (docs/post_training.md) on a task whose answers can be
# checked, small enough for a CPU: 3-digit addition answered directly (`478+256=` -> `734`).
#
# 1. Generate the task's data with the built-in arithmetic generator (no download).
# 2. Fine-tune the 1.5M-parameter tiny model from scratch on it (`configs/sft_tiny.py`, the
#    function behind `python -m turbos_jax.sft`), plotting the loss and the held-out greedy exact
#    match live: the first 450 of the config's 1,800 steps here.
# 3. Decode a few held-out prompts greedily and check them with the answer checker, with this
#    notebook's model and with the shipped result of the full 1,800-step run
#    (`turbos_jax/posttrain/shipped/sft_tiny_addition.safetensors`, 46.0 % exact match).
# 4. Continue from the shipped SFT parameters with GRPO (`configs/grpo_tiny.py`, the function
#    behind `python -m turbos_jax.rl`; the checker's verdict is the reward), next to two controls
#    run for the same minutes: continued SFT, and GRPO with shuffled rewards.
#
# GRPO starts from the shipped file rather than from step 2's model because where 800 labels leave
# SFT depends on float rounding: the same 1,800 steps reach 46 % with two XLA threads and 9.6 % with
# one (docs/post_training.md, "The demonstration"). Full run (`TURBOS_NOTEBOOK_SMOKE` unset): 450
# SFT steps, then 4 minutes per arm, one seed; benchmarks/grpo_demo.py runs the same arms for 12
# minutes over three seeds. Measured on the project's shared CPU VM pinned to one core (jax 0.10.2,
# 2026-11-26): 13 min 35 s in all; the 450 SFT steps took 74 s and reached 9.0 % (one XLA thread;
# the two-thread calibration stood at 21 % there); from the shipped 46.0 %, after 4 minutes per arm
# GRPO stood at 63.8 %, continued SFT at 50.2 % and GRPO with shuffled rewards at 26.8 % (one seed;
# measured before the inverse-CDF sampler, which draws other samples for the same seed).
# `TURBOS_NOTEBOOK_SMOKE=1` (set by the tests) runs 6 SFT steps and a few steps per arm with small
# evaluations: the mechanics, not learning.

# %%
# Colab only: install turbos-jax from its repository, with the jax / flax versions its CI tests
# (elsewhere: `pip install -e ".[notebooks]"` in a checkout).
import importlib.util
import os
import shutil
import subprocess
import sys

REPO = "https://github.com/turbos-jax/turbos-jax"
if "google.colab" in sys.modules and importlib.util.find_spec("turbos_jax") is None:
    on_tpu = os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio")
    jax_pin = "jax[cuda12]" if shutil.which("nvidia-smi") else "jax[tpu]" if on_tpu else "jax"
    pins = [f"{jax_pin}==0.10.2", "flax==0.12.8"]
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q", f"turbos-jax[notebooks] @ git+{REPO}", *pins]
    )

# %%
import json
import math
import os
import tempfile
import time

import jax
import matplotlib.pyplot as plt
from absl import logging
from IPython.display import display

from configs import sft_tiny
from turbos_jax import metrics, sft
from turbos_jax.checkpointing import Checkpointer
from turbos_jax.posttrain import arithmetic
from turbos_jax.posttrain.answers import extract_answer, is_correct
from turbos_jax.posttrain.generators import CheckpointGenerator

logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
SMOKE = os.environ.get("TURBOS_NOTEBOOK_SMOKE") == "1"
WORK = tempfile.mkdtemp(prefix="turbos-posttrain-")
print("devices:", jax.devices())
print("files under", WORK)

# %% [markdown]
# ## 1. The task's data
#
# `arithmetic.write_task_files` writes the three files of `python -m turbos_jax.posttrain.arithmetic`
# (the command in `configs/sft_tiny.py`'s docstring): `train.jsonl` (`{"prompt", "response"}`, here
# the bare answer), `eval.jsonl` (distinct held-out problems with their `answer`) and
# `rl_prompts.jsonl` (`{"prompt", "answer"}`, the prompts GRPO samples). A problem's split is fixed by
# a hash of the problem, so no evaluation problem is ever trained on.

# %%
DATA = os.path.join(WORK, "arith")
paths = arithmetic.write_task_files(
    DATA,
    num_train=200 if SMOKE else 800,
    num_eval=100 if SMOKE else 500,
    num_rl=200 if SMOKE else 20_000,
    seed=0,
    levels=(2,),
    operations=("add",),
    response="answer",
)
for split, path in paths.items():
    with open(path) as f:
        lines = f.readlines()
    print(f"{split:5s} {len(lines):6d} lines, e.g. {lines[0].strip()}")

# %% [markdown]
# ## 2. SFT with a live plot
#
# `sft.sft(config, workdir, on_log=...)` is what `python -m turbos_jax.sft` runs. The loss is on the
# response tokens and the `"\n"` stop byte only; at step 0 and every `eval_every_steps` it decodes
# `config.sft.eval_prompts` held-out prompts greedily and logs the fraction answered exactly
# (`eval_exact_match`). `on_log(step, row)` sees each row written to `metrics.jsonl`. The run stops
# after 450 steps (one to two minutes), still on the config's 1,800-step schedule: the documented
# run stood at 21 % there and plateaus at 46 % (`configs/sft_tiny.py`).

# %%
config = sft_tiny.get_config()
config.sft.train_file, config.sft.eval_file = paths["train"], paths["eval"]
config.total_steps = 450
if SMOKE:
    config.total_steps = 6
    config.log_every_steps = 2
    config.eval_every_steps = config.checkpoint_every_steps = 3
    config.eval_batches = 1
    config.sft.eval_prompts = config.sft.eval_batch_size = 16
SFT_DIR = os.path.join(WORK, "sft")


def live_plot(title: str, curves: dict[str, str], total_steps: int):
    """A figure redrawn on every logged row, one line per metric key in `curves` ({key: label}):
    losses in a left panel (if any), rates in [0, 1] (exact match, reward) in a right one."""
    history = {key: ([], []) for key in curves}
    panels = {"loss": [k for k in curves if "loss" in k], "fraction": [k for k in curves if "loss" not in k]}
    panels = {name: keys for name, keys in panels.items() if keys}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    fig.suptitle(title)
    plt.close(fig)  # drawn through the display handle only
    handle = display(fig, display_id=True)

    def on_log(step, row):
        for key in curves:
            if key in row:
                history[key][0].append(step)
                history[key][1].append(row[key])
        for ax, (name, keys) in zip(axes[0], panels.items(), strict=True):
            ax.clear()
            for key in keys:
                ax.plot(*history[key], "o-" if key.startswith("eval") else "-", label=curves[key])
            ax.set(xlabel="step", ylabel=name, xlim=(0, total_steps))
            if name == "fraction":
                ax.set_ylim(0, 1)
            ax.legend(loc="best")
        handle.update(fig)

    return on_log


start = time.perf_counter()
last = sft.sft(
    config,
    SFT_DIR,
    on_log=live_plot(
        "SFT",
        {"loss": "train loss", "eval_loss": "held-out loss", "eval_exact_match": "held-out exact match"},
        config.total_steps,
    ),
)
sft_seconds = time.perf_counter() - start
print(f"SFT: {config.total_steps} steps in {sft_seconds:.0f} s wall (compiles and evaluations included)")

# %% [markdown]
# ## What the SFT run wrote

# %%
rows = metrics.read_jsonl(os.path.join(SFT_DIR, "metrics.jsonl"))
train_rows = [r for r in rows if "loss" in r]
eval_rows = [r for r in rows if "eval_exact_match" in r]
for r in eval_rows:
    print(
        f"step {r['step']:4d}  eval_loss {r['eval_loss']:.3f}  exact match {r['eval_exact_match']:.1%}"
        f"  ({r['eval_response_tokens']:.2f} tokens per response)"
    )
assert train_rows and all(math.isfinite(r["loss"]) for r in train_rows)
assert eval_rows and all(0.0 <= r["eval_exact_match"] <= 1.0 for r in eval_rows)
ckpt = Checkpointer(os.path.join(SFT_DIR, "checkpoints"), keep=config.keep_checkpoints)
print("SFT checkpoints at steps", ckpt.steps())
assert ckpt.steps()[-1] == config.total_steps
ckpt.close()

# %% [markdown]
# ## 3. Greedy answers, checked
#
# `CheckpointGenerator` restores the newest parameters of a workdir, or of a parameters file such as
# the shipped `arithmetic.SFT_PARAMS` (`python -m turbos_jax.convert --to_params` writes one), and
# decodes prompts in the SFT template until the stop byte. `extract_answer` reads the final answer of
# a response (here the whole response; for worked solutions the part after `####`), and `is_correct`
# compares it with the reference after normalisation: the binary reward GRPO uses next.

# %%
with open(paths["eval"]) as f:
    held_out = [json.loads(line) for line in f][:12]
starts = {f"this notebook's {config.total_steps} steps": SFT_DIR, "shipped": arithmetic.SFT_PARAMS}
for name, source in starts.items():
    generator = CheckpointGenerator(config, source, max_new_tokens=config.sft.max_new_tokens, batch_size=12)
    responses = generator([r["prompt"] for r in held_out])
    print(f"SFT parameters: {name} (checkpoint step {generator.step})")
    for record, response in zip(held_out, responses, strict=True):
        verdict = "correct" if is_correct(response, record["answer"]) else "wrong"
        print(
            f"  {record['prompt']:10s} -> {response!r:8s} answer {extract_answer(response)!s:6s}"
            f" reference {record['answer']:5s} {verdict}"
        )

# %% [markdown]
# ## 4. GRPO against two controls, at equal wall-clock
#
# `rl.rl(config, workdir, on_log=...)` is what `python -m turbos_jax.rl` runs. `config.init_from`
# (an SFT workdir or parameters file; `configs/grpo_tiny.py` names the shipped one) gives both the
# policy and the frozen KL reference. Each step samples G = 8 responses at temperature 1 for each
# of 16 prompts, scores each with `is_correct`, drops groups whose 8 rewards are all equal (no
# signal) and draws new prompts for them, and makes one token-level GRPO update (stage I only: math
# prompts, small KL).
#
# A gain means little alone, so `posttrain.grpo_demo` runs three arms from the shipped SFT parameters
# for the same number of minutes each, as `benchmarks/grpo_demo.py` does over three seeds:
#
# * **GRPO**: the verifier's reward on fresh, unlabelled prompts;
# * **continued SFT** on the same 800 labelled examples ("just more training");
# * **GRPO with shuffled rewards**, permuted across the batch ("any update helps").
#
# Each arm's held-out greedy exact match (the same 500 prompts as SFT) is plotted against
# wall-clock minutes, compiles and evaluations included.

# %%
from turbos_jax.posttrain import grpo_demo

MINUTES = 0.05 if SMOKE else 4.0  # per arm
results, arm_dirs = {}, {}
fig, ax = plt.subplots(figsize=(7, 4))
plt.close(fig)
handle = display(fig, display_id=True)


def follow(arm: str, points: list):
    """on_log: appends the arm's evaluations (minutes, exact match) and redraws the figure."""
    start = time.perf_counter()

    def on_log(step, row):
        if "eval_exact_match" in row:
            points.append(((time.perf_counter() - start) / 60, row["eval_exact_match"]))
            ax.clear()
            grpo_demo.plot_arms(ax, {**results, (arm, 0): points}, MINUTES)
            handle.update(fig)

    return on_log


for arm in grpo_demo.ARMS:
    arm_config = grpo_demo.arm_config(
        arm, seed=0, init_from=arithmetic.SFT_PARAMS, data_dir=DATA, minutes=MINUTES, eval_seconds=30,
        eval_prompts=config.sft.eval_prompts,
    )  # fmt: skip
    if SMOKE:  # a few small steps: the mechanics, not learning
        arm_config.total_steps = 2
        arm_config.log_every_steps = arm_config.eval_every_steps = arm_config.checkpoint_every_steps = 1
        if arm != "sft":
            arm_config.rl.num_generations, arm_config.batch_size = 4, 4 * 4
    arm_dirs[arm] = os.path.join(WORK, f"arm-{arm}")
    start = time.perf_counter()
    results[arm, 0] = grpo_demo.run_arm(arm, arm_config, arm_dirs[arm], MINUTES, on_log=follow(arm, []))
    print(f"{grpo_demo.LABELS[arm]}: {time.perf_counter() - start:.0f} s wall")
ax.clear()
grpo_demo.plot_arms(ax, results, MINUTES)
handle.update(fig)
print(grpo_demo.comparison_table(results, [0.0, MINUTES / 2, MINUTES]))
print("\n".join(grpo_demo.verdict(results, MINUTES)[1]))

# %% [markdown]
# ## What the GRPO run wrote
#
# Besides the reward, `metrics.jsonl` holds the KL to the SFT reference, the policy's entropy, the
# share of groups without reward spread (`frac_zero_std`) and how many generation rounds dynamic
# sampling needed. With one update per batch the GRPO loss is about 0 whatever happens, so the
# rewards and the held-out exact match are the numbers to watch.

# %%
RL_DIR = os.path.join(arm_dirs["grpo"], "run")
rl_rows = metrics.read_jsonl(os.path.join(RL_DIR, "metrics.jsonl"))
rl_train = [r for r in rl_rows if "reward/correct" in r]
rl_eval = [r for r in rl_rows if "eval_exact_match" in r]
for r in rl_train[:: max(1, len(rl_train) // 12)]:
    print(
        f"step {r['step']:4d}  reward {r['reward/correct']:.3f}  kl {r['kl']:.4f}  entropy {r['entropy']:.3f}"
        f"  frac_zero_std {r['frac_zero_std']:.2f}  generation rounds {r['num_gen_batches']}"
        f"  updated {r['updated']}"
    )
assert rl_train and all(math.isfinite(r["loss"]) for r in rl_train)
assert all(0.0 <= r["reward/correct"] <= 1.0 for r in rl_train)
assert rl_eval and rl_eval[0]["step"] == 0 and all(0.0 <= r["eval_exact_match"] <= 1.0 for r in rl_eval)
ckpt = Checkpointer(os.path.join(RL_DIR, "checkpoints"), keep=3)
print("GRPO checkpoints at steps", ckpt.steps(), "(the last one where the budget stopped the run)")
assert ckpt.steps()[-1] >= rl_train[-1]["step"]
ckpt.close()
start_match = rl_eval[0]["eval_exact_match"]  # the shipped SFT parameters, before any update
rl_match = grpo_demo.at_time(results["grpo", 0], MINUTES)
print(f"held-out greedy exact match: SFT {start_match:.1%} -> GRPO after {MINUTES:g} min {rl_match:.1%}")
if not SMOKE:
    # One seed, so no gain is asserted here (benchmarks/grpo_demo.py measures three); only that the
    # policy kept its answers (at 500 prompts the binomial noise is about 4 points).
    assert rl_match >= start_match - 0.05, f"GRPO lost exact match: {start_match:.1%} -> {rl_match:.1%}"
