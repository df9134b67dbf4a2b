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
# # turbos-jax kernels: the Mamba2 chunked scan, reference against Pallas
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/turbos-jax/turbos-jax/blob/main/notebooks/03_kernels.ipynb)
#
# `pallas_kernels.mamba2.chunk_scan` (the SSD chunked scan of every Mamba2 layer, training and
# prefill) and `state_update` (one decode step) each have a pure-JAX reference (`impl="xla"`) and
# Pallas kernels (`impl="pallas"`): Mosaic on TPU, Triton on NVIDIA GPUs of compute capability 8.0
# or later. On a CPU the same kernels run in Pallas interpret mode, which checks them but is far
# too slow to time. The notebook compares outputs and gradients over packed documents in fp32 and
# bf16, then times both implementations where an accelerator is present (on a CPU: the reference
# alone). Colab: Runtime > Change runtime type > TPU (v5e-1 / v6e-1) or an A100/L4 GPU compiles the
# kernels; a T4 (compute capability 7.5) cannot run them and the notebook says so.

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
import os
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from pallas_kernels import resolve_impl
from pallas_kernels.mamba2 import chunk_scan, state_update

SMOKE = os.environ.get("TURBOS_NOTEBOOK_SMOKE") == "1"
BACKEND = jax.default_backend()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    auto = resolve_impl("auto")  # what config.model.kernel_impl = "auto" picks on this runtime
for w in caught:
    print("note:", w.message)
# On a CPU "pallas" is interpret mode (correctness only); on an older GPU the kernels cannot run.
RUN_KERNELS = BACKEND == "cpu" or auto == "pallas"
ACCELERATOR = BACKEND != "cpu"
print(f"backend {BACKEND} ({jax.devices()[0].device_kind}); kernel_impl='auto' -> {auto!r}")
if not RUN_KERNELS:
    print("the Pallas GPU kernels need compute capability 8.0 (jax-ml/jax#26799): reference only")

# %% [markdown]
# ## Inputs: packed documents
#
# Layouts follow mamba_ssm: x `(b, l, h, p)`, dt `(b, l, h)`, A `(h,)`, B and C `(b, l, g, n)`.
# `seq_idx` numbers the documents packed into each row; the scan state resets where it changes,
# also inside a chunk. Raw `dt` goes through `softplus(dt + dt_bias)`, and `D` adds a skip path,
# as in the model's Mamba2 layer.

# %%
if SMOKE:
    b, l, h, p, g, n, chunk = 1, 64, 2, 16, 1, 16, 16
else:
    b, l, h, p, g, n, chunk = 2, 256, 4, 32, 2, 32, 64


def make_inputs(key, b, l, h, p, g, n, dtype):
    ks = jax.random.split(key, 7)
    x = jax.random.normal(ks[0], (b, l, h, p)).astype(dtype)
    dt = jax.random.normal(ks[1], (b, l, h)) - 1.0
    A = -jnp.exp(0.5 * jax.random.normal(ks[2], (h,)))
    B = jax.random.normal(ks[3], (b, l, g, n)).astype(dtype)
    C = jax.random.normal(ks[4], (b, l, g, n)).astype(dtype)
    D = jax.random.normal(ks[5], (h,))
    dt_bias = 0.1 * jax.random.normal(ks[6], (h,))
    # Documents of random lengths (some shorter than a chunk), the same layout for every row.
    starts = np.sort(np.random.default_rng(0).choice(np.arange(1, l), size=max(l // 12, 2), replace=False))
    seq_idx = jnp.broadcast_to(jnp.asarray(np.searchsorted(starts, np.arange(l), side="right")), (b, l))
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias, seq_idx=seq_idx.astype(jnp.int32))


def scan(inputs, impl, chunk_size=chunk):
    """(y, final_state) of the chunked scan."""
    return chunk_scan(
        inputs["x"],
        inputs["dt"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        chunk_size,
        D=inputs["D"],
        dt_bias=inputs["dt_bias"],
        seq_idx=inputs["seq_idx"],
        dt_softplus=True,
        return_final_states=True,
        impl=impl,
    )


def rel_err(got, want):
    """max |got - want| / max |want|, in fp32."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def as_f32(inputs):
    return {k: v.astype(jnp.float32) if v.dtype == jnp.bfloat16 else v for k, v in inputs.items()}


# The kernel tests' tolerances (tests/test_mamba2_tpu_kernel.py), relative to the largest value.
TOL = {"float32": 1e-4, "bfloat16": 2e-2}
documents = int(make_inputs(jax.random.key(0), b, l, h, p, g, n, jnp.float32)["seq_idx"][0, -1]) + 1
print(
    f"b={b} l={l} heads={h} head_dim={p} groups={g} d_state={n} chunk={chunk}; {documents} documents per row"
)

# %% [markdown]
# ## Forward: y and the final state
#
# The reference runs on the fp32 values of the inputs; the kernel on the inputs as given (bf16
# x, B, C in the bf16 case, with fp32 accumulation inside).

# %%
results = {}
for dtype in ("float32", "bfloat16"):
    inputs = make_inputs(jax.random.key(1), b, l, h, p, g, n, jnp.dtype(dtype))
    y_ref, final_ref = scan(as_f32(inputs), "xla")
    if RUN_KERNELS:
        y, final = scan(inputs, "pallas")
        results[dtype] = {"y": rel_err(y, y_ref), "final state": rel_err(final, final_ref)}
        print(
            f"{dtype:9} "
            + "  ".join(f"{k} {v:.1e}" for k, v in results[dtype].items())
            + f"  (tolerance {TOL[dtype]:.0e})"
        )
        assert all(e < TOL[dtype] for e in results[dtype].values()), results[dtype]

# %% [markdown]
# ## Gradients
#
# `jax.grad` of a random projection of both outputs, through each implementation: the kernel's
# backward is its own Pallas kernel (a `custom_vjp`), the reference's is JAX autodiff.

# %%
WRT = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def grads(inputs, impl):
    ky, kf = jax.random.split(jax.random.key(2))

    def loss(diff):
        y, final = scan({**inputs, **diff}, impl)
        wy = jax.random.normal(ky, y.shape)
        wf = jax.random.normal(kf, final.shape)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(final * wf)

    return jax.jit(jax.grad(loss))({k: inputs[k] for k in WRT})


for dtype in ("float32", "bfloat16"):
    inputs = make_inputs(jax.random.key(3), b, l, h, p, g, n, jnp.dtype(dtype))
    want = grads(as_f32(inputs), "xla")
    if RUN_KERNELS:
        got = grads(inputs, "pallas")
        errs = {k: rel_err(got[k], want[k]) for k in WRT}
        print(f"{dtype:9} " + "  ".join(f"d{k} {v:.1e}" for k, v in errs.items()))
        assert all(e < TOL[dtype] for e in errs.values()), errs

# %% [markdown]
# ## One decode step
#
# `state_update` advances the fp32 state `(b, h, p, n)` by one token; generation calls it once per
# Mamba2 layer per token.

# %%
ks = jax.random.split(jax.random.key(4), 6)
state = jax.random.normal(ks[0], (b, h, p, n))
step_inputs = dict(
    x=jax.random.normal(ks[1], (b, h, p)),
    dt=jax.random.normal(ks[2], (b, h)) - 1.0,
    A=-jnp.exp(0.5 * jax.random.normal(ks[3], (h,))),
    B=jax.random.normal(ks[4], (b, g, n)),
    C=jax.random.normal(ks[5], (b, g, n)),
)
y_ref, state_ref = state_update(state, **step_inputs, dt_softplus=True, impl="xla")
if RUN_KERNELS:
    y, new_state = state_update(state, **step_inputs, dt_softplus=True, impl="pallas")
    errs = {"y": rel_err(y, y_ref), "state": rel_err(new_state, state_ref)}
    print("decode step " + "  ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert all(e < TOL["float32"] for e in errs.values()), errs

# %% [markdown]
# ## Timing
#
# Forward plus backward of the scan at growing sequence lengths (bf16 inputs, TurboS's head
# shape: 64 heads of 64 channels, 16 groups, state 128, chunk 128) on an accelerator. On a CPU only
# the reference is timed, at small shapes: interpret mode measures nothing about the kernels.

# %%
if ACCELERATOR:
    tb, th, tp, tg, tn, tchunk = 1, 64, 64, 16, 128, 128
    lengths = [1024, 2048, 4096, 8192]
else:
    tb, th, tp, tg, tn, tchunk = 1, 4, 32, 2, 32, 64
    lengths = [128, 256] if SMOKE else [256, 512, 1024, 2048]
impls = ["xla", "pallas"] if ACCELERATOR and RUN_KERNELS else ["xla"]


def time_fwd_bwd(impl, length, repeats=5):
    """Median wall time (ms) of one jitted forward + backward, compiled beforehand."""
    inputs = make_inputs(jax.random.key(5), tb, length, th, tp, tg, tn, jnp.bfloat16)
    loss = lambda diff: jnp.sum(scan({**inputs, **diff}, impl, tchunk)[0].astype(jnp.float32))
    fn = jax.jit(jax.grad(loss))
    diff = {k: inputs[k] for k in ("x", "B", "C")}
    jax.block_until_ready(fn(diff))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(diff))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


timings = {impl: [time_fwd_bwd(impl, length) for length in lengths] for impl in impls}
fig, ax = plt.subplots(figsize=(6, 3.5))
for impl, ms in timings.items():
    ax.plot(lengths, ms, "o-", label=impl)
ax.set_xscale("log", base=2)
ax.set_xticks(lengths, [str(length) for length in lengths])
ax.minorticks_off()
ax.set(xlabel="sequence length", ylabel="forward + backward (ms)", ylim=(0, None))
ax.set_title(f"{jax.devices()[0].device_kind}: heads {th} x {tp}, state {tn}, chunk {tchunk}", fontsize=9)
ax.legend()
plt.show()
for i, length in enumerate(lengths):
    row = "  ".join(f"{impl} {timings[impl][i]:8.2f} ms" for impl in impls)
    speedup = (
        f"  pallas speed-up {timings['xla'][i] / timings['pallas'][i]:.2f}x" if "pallas" in impls else ""
    )
    print(f"L={length:5d}  {row}{speedup}")
