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
# # turbos-jax quickstart: train, resume, generate
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/turbos-jax/turbos-jax/blob/main/notebooks/01_quickstart.ipynb)
#
# Trains the 1.5M-parameter `configs/tiny.py` TurboS (2 attention, 4 Mamba2 and 6 MoE layers) on
# the text bundled with Python, with the loss plotted live while it trains; then resumes from the
# checkpoint and samples text from it. Any runtime works: on a laptop CPU or a free Colab CPU
# runtime the 300 steps take a few minutes. `TURBOS_NOTEBOOK_SMOKE=1` (set by the tests) cuts the
# run to 12 steps.

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
import math
import os
import tempfile

import jax
import matplotlib.pyplot as plt
from absl import logging
from IPython.display import display

from configs import tiny
from turbos_jax import accounting, metrics, summary, train
from turbos_jax.checkpointing import Checkpointer
from turbos_jax.config import ModelConfig
from turbos_jax.data import ByteTokenizer
from turbos_jax.generate import restore_params
from turbos_jax.generation.api import generate
from turbos_jax.generation.sampling import SamplingParams

logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
SMOKE = os.environ.get("TURBOS_NOTEBOOK_SMOKE") == "1"
print("devices:", jax.devices())

# %% [markdown]
# ## The config
#
# `tiny.get_config()` is an `ml_collections.ConfigDict`; change it in place as
# `--config.KEY=VALUE` would on the command line. Every run here writes to a fresh directory.

# %%
config = tiny.get_config()
if SMOKE:
    config.total_steps = 12
    config.log_every_steps = 3
    config.eval_every_steps = config.checkpoint_every_steps = 6
    config.eval_batches = 1
    config.optim.schedule = (("warmup", 4, 3e-3), ("cosine", 8, 3e-4))
WORKDIR = tempfile.mkdtemp(prefix="turbos-quickstart-")
model_cfg = ModelConfig.from_config(config.model)
print(summary.format_table(accounting.summarize(model_cfg, config.seq_len)))
print("workdir:", WORKDIR)

# %% [markdown]
# ## Train with a live loss plot
#
# `train_and_evaluate(config, workdir, on_log=...)` calls `on_log(step, row)` with every row it
# writes to `metrics.jsonl`: training rows (`loss`, `lr`, throughput) every `log_every_steps` and
# `eval_loss` rows at evaluations. The figure below is redrawn on each call.

# %%
history = {"step": [], "loss": [], "eval_step": [], "eval_loss": []}
fig, ax = plt.subplots(figsize=(7, 3.5))
plt.close(fig)  # drawn through the display handle only
handle = display(fig, display_id=True)


def plot_live(step, row):
    if "loss" in row:
        history["step"].append(step)
        history["loss"].append(row["loss"])
    if "eval_loss" in row:
        history["eval_step"].append(step)
        history["eval_loss"].append(row["eval_loss"])
    ax.clear()
    ax.plot(history["step"], history["loss"], label="train loss")
    ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out loss")
    ax.axhline(math.log(256), color="grey", ls=":", label="ln 256 (uniform over bytes)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / byte)", xlim=(0, config.total_steps))
    ax.legend(loc="upper right")
    handle.update(fig)


last = train.train_and_evaluate(config, WORKDIR, on_log=plot_live)
print({k: round(v, 4) for k, v in last.items() if k in ("step", "loss", "eval_loss", "lr")})

# %% [markdown]
# ## What the run wrote
#
# `metrics.jsonl` holds the same rows (also in TensorBoard event files: in Colab,
# `%load_ext tensorboard` then `%tensorboard --logdir <workdir>`). Step time excludes compilation.

# %%
rows = metrics.read_jsonl(os.path.join(WORKDIR, "metrics.jsonl"))
train_rows = [r for r in rows if "loss" in r]
for r in train_rows:
    rate = f"{r['tokens_per_sec']:8.0f} tokens/s  {r['step_time_s']:.3f} s/step"
    print(f"step {r['step']:4d}  loss {r['loss']:.3f}  {rate}")
assert train_rows and all(math.isfinite(r["loss"]) for r in train_rows)
assert train_rows[-1]["loss"] < train_rows[0]["loss"], "the loss did not fall"

ckpt = Checkpointer(os.path.join(WORKDIR, "checkpoints"), keep=config.keep_checkpoints)
print("checkpoints at steps", ckpt.steps())
ckpt.close()

# %% [markdown]
# ## Resume
#
# Calling `train_and_evaluate` again with the same workdir continues from the newest checkpoint
# (parameters, optimizer and the data iterator's position); here it trains 10 % more steps.

# %%
config.total_steps += max(config.total_steps // 10, 2)
resumed = train.train_and_evaluate(config, WORKDIR)
assert resumed["step"] == config.total_steps
ckpt = Checkpointer(os.path.join(WORKDIR, "checkpoints"), keep=config.keep_checkpoints)
print("checkpoints at steps", ckpt.steps())
assert ckpt.steps()[-1] == config.total_steps
ckpt.close()

# %% [markdown]
# ## Generate
#
# `restore_params` reads only the parameters of the newest checkpoint; `generate` runs one compiled
# prefill and decode loop over right-padded prompts. Greedy first, then nucleus sampling.

# %%
tokenizer = ByteTokenizer()
graphdef, params, step = restore_params(model_cfg, WORKDIR)
prompts = ["The ", "A class ", "Python "]
ids = [tokenizer.encode(p) for p in prompts]
width = max(map(len, ids))
padded = [x + [0] * (width - len(x)) for x in ids]
new_tokens = 16 if SMOKE else 80
for name, sampling in [
    ("greedy", SamplingParams()),
    ("top-p 0.9", SamplingParams(temperature=0.8, top_p=0.9)),
]:
    out, counts = generate(
        graphdef,
        params,
        padded,
        [len(x) for x in ids],
        max_new_tokens=new_tokens,
        sampling=sampling,
        rng=jax.random.key(0),
    )
    print(f"--- {name}, checkpoint step {step}")
    for prompt, row, n in zip(prompts, out.tolist(), counts.tolist(), strict=True):
        assert n == new_tokens  # the byte tokenizer has no EOS
        print(repr(prompt + tokenizer.decode(row[:n])))
