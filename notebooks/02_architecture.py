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
# # turbos-jax architecture: layouts, parameters, FLOPs and caches
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/turbos-jax/turbos-jax/blob/main/notebooks/02_architecture.ipynb)
#
# The layer layouts of the tiny, small and full (560B) configs, the tiny model's module tree, and
# parameter, FLOP and decode-cache accounting, with the cache drawn against context length beside
# an all-attention model. Nothing is trained and the large models are never allocated (abstract
# shapes only), so any runtime, CPU included, runs it in under a minute.

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
import dataclasses

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from configs import small, tiny, turbos
from turbos_jax import accounting
from turbos_jax.config import ModelConfig
from turbos_jax.generation.cache import cache_nbytes
from turbos_jax.model import TurbosModel

CONFIGS = {
    name: ModelConfig.from_config(m.get_config().model)
    for name, m in [("tiny", tiny), ("small", small), ("turbos", turbos)]
}

# %% [markdown]
# ## Layouts
#
# `config.model.layout` has one symbol per layer: `A` attention, `M` Mamba2, `F` MoE feed-forward.
# The model finds the longest run of one repeated period and builds it as stacked parameters run
# by `lax.scan` (the full model: `AFMFMFMFMFMFMFMFMF` x 7, then `MF` applied on its own), so 128
# layers compile as one loop body.

# %%
COLORS = {"A": "tab:red", "M": "tab:blue", "F": "tab:gray"}
fig, axes = plt.subplots(len(CONFIGS), 1, figsize=(11, 1.1 * len(CONFIGS) + 0.6))
for ax, (name, cfg) in zip(axes, CONFIGS.items(), strict=True):
    split = cfg.layout_split
    for i, symbol in enumerate(cfg.layout):
        ax.add_patch(plt.Rectangle((i, 0), 0.9, 1, color=COLORS[symbol]))
    first = len(split.prefix)
    for r in range(split.repeats + 1):  # boundaries of the scanned periods
        ax.axvline(first + r * len(split.period) - 0.05, color="black", lw=1.2)
    counts = cfg.layer_counts()
    ax.set(xlim=(0, len(cfg.layout)), ylim=(0, 1), yticks=[])
    ax.set_ylabel(name, rotation=0, ha="right", va="center")
    ax.set_title(
        f"{split.prefix or ''}[{split.period}] x {split.repeats} {split.suffix or ''}   "
        f"(A {counts['A']}, M {counts['M']}, F {counts['F']})",
        fontsize=9,
        loc="left",
    )
handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
fig.legend(handles, ["attention", "Mamba2", "MoE FFN"], loc="lower center", ncol=3)
axes[-1].set_xlabel("layer (black lines: scanned period boundaries)")
fig.tight_layout(rect=(0, 0.08, 1, 1))
plt.show()

# %% [markdown]
# ## The tiny model's modules
#
# `nnx.display` draws the module tree (treescope in a notebook), here of the abstract model
# (`nnx.eval_shape`: shapes and dtypes, no values); the period's layers hold stacked parameters
# with a leading axis of size `repeats`.

# %%
tiny_model = nnx.eval_shape(lambda: TurbosModel(CONFIGS["tiny"], rngs=nnx.Rngs(0)))
nnx.display(tiny_model)

# %% [markdown]
# ## Parameters
#
# Counted from abstract shapes (`nnx.eval_shape`: nothing is allocated, so the full model costs
# seconds). Active parameters are those one token passes through: the shared expert and `top_k` of
# the routed experts. The report gives 560B total and 56B active for TurboS.

# %%
summaries = {name: accounting.summarize(cfg, 4096) for name, cfg in CONFIGS.items()}


def human(n):
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


kinds = ["embed", "attention", "mamba2", "moe", "lm_head"]
print(f"{'':8}" + "".join(f"{k:>10}" for k in ["total", "active", *kinds]))
for name, s in summaries.items():
    values = [s["params_total"], s["params_active"], *(s["params_by_kind"][k] for k in kinds)]
    print(f"{name:8}" + "".join(f"{human(v):>10}" for v in values))
print(f"{'report':8}{'560B':>10}{'56B':>10}")
assert abs(summaries["turbos"]["params_total"] / 560e9 - 1) < 0.01
assert abs(summaries["turbos"]["params_active"] / 56e9 - 1) < 0.03

# %% [markdown]
# ## Training FLOPs per token
#
# Model FLOPs (a multiply-add = 2, training = 3 x forward; `turbos_jax/accounting.py`). Only the
# 7 attention layers grow with the context; the Mamba2 scan costs the same per token at any length.

# %%
lengths = [4096 * 2**i for i in range(7)]  # 4K .. 256K
counts = accounting.count_params(CONFIGS["turbos"])  # abstract shapes, counted once
flops = [accounting.training_flops_per_token(CONFIGS["turbos"], n, counts) for n in lengths]
parts = ["matmul", "attention", "mamba2_scan"]
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.stackplot(lengths, *[[f[p] / 1e9 for f in flops] for p in parts], labels=parts)
ax.set(xscale="log", xlabel="sequence length (tokens)", ylabel="training GFLOPs / token", title="TurboS")
ax.set_xticks(lengths, [f"{n // 1024}K" for n in lengths])
ax.legend(loc="lower right")
plt.show()
for n, f in zip(lengths, flops, strict=True):
    share = f["attention"] / f["total"]
    print(f"L={n // 1024:4d}K  {f['total'] / 1e9:7.1f} GFLOPs/token, attention {share:5.1%}")

# %% [markdown]
# ## Decode cache against context length
#
# Generation keeps a K/V cache per attention layer (grows with the context) and a fixed-size state
# per Mamba2 layer (the fp32 SSM state and the conv taps). Beside TurboS: the same model with every
# Mamba2 layer replaced by attention, an all-attention model of nearly the same active size. Its
# cache grows 64 / 7 = 9.1 times as fast, so the ratio (labels) tends to 9.1x at long contexts;
# at short ones TurboS's fixed Mamba2 state (57 layers x 2.0 MiB = 117 MiB) is most of its cache.

# %%
turbos_cfg = CONFIGS["turbos"]
all_attention = dataclasses.replace(turbos_cfg, layout=turbos_cfg.layout.replace("M", "A"))
active = {
    name: accounting.count_params(cfg).active
    for name, cfg in [("TurboS", turbos_cfg), ("all-attention", all_attention)]
}
print({k: f"{v / 1e9:.1f}B active" for k, v in active.items()})
assert abs(active["all-attention"] / active["TurboS"] - 1) < 0.02

contexts = np.array([2**k for k in range(10, 19)])  # 1K .. 256K tokens


def cache_gib(cfg, n_tokens):
    """Bytes of one sequence's decode cache (bf16 K/V, fp32 SSM state, bf16 conv taps), in GiB."""
    c = accounting.cache_bytes(cfg)
    return (c["kv_bytes_per_token"] * n_tokens + c["mamba_bytes_per_sequence"]) / 2**30


hybrid, dense = cache_gib(turbos_cfg, contexts), cache_gib(all_attention, contexts)
for n in (1024, 32768):  # the analytic sizes against the cache the generate loop allocates
    for cfg in (turbos_cfg, all_attention):
        measured = cache_nbytes(cfg, batch=1, max_len=n)["total_bytes"] / 2**30
        assert np.isclose(measured, cache_gib(cfg, n), rtol=1e-6), (n, measured)

fig, ax = plt.subplots(figsize=(7, 4))
ax.loglog(contexts, hybrid, "o-", label="TurboS (7 A + 57 M)")
ax.loglog(contexts, dense, "s-", label="all-attention (64 A)")
ax.set(xlabel="context length (tokens)", ylabel="decode cache per sequence (GiB)")
ax.set_xticks(contexts[::2], [f"{n // 1024}K" for n in contexts[::2]])
for n, h, d in zip(contexts[::2], hybrid[::2], dense[::2], strict=True):
    ax.annotate(f"{d / h:.1f}x", (n, d), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
ax.legend()
plt.show()
print(f"at 256K tokens: TurboS {hybrid[-1]:.1f} GiB, all-attention {dense[-1]:.1f} GiB per sequence")
