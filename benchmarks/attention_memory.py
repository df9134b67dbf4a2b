"""Attention memory and time: dense (L x L fp32 scores) against blockwise (`pallas_kernels.attention`,
the `xla` path) for forward + backward, on the current device (meant for CPU).

    python benchmarks/attention_memory.py                          # tiny config shapes, L = 1K..32K
    python benchmarks/attention_memory.py --seq_lens=1024,2048 --steps=1
    python benchmarks/attention_memory.py --config=configs/turbos.py --batch=1

Per sequence length and implementation, one jitted `jax.grad` of sum(attention(q, k, v)^2) with
respect to q, k and v (B, L, H, Dh) / (B, L, K, Dh) at the config's attention shapes, with two packed
documents per row. Columns: the compiled temp memory (XLA's `memory_analysis().temp_size_in_bytes`:
buffers the program allocates beyond its inputs and outputs), the size of one (B, H, L, L) fp32 score
matrix for scale, the first call (compile + run) and the median of --steps timed calls. The dense
rows are skipped (not compiled) where one score matrix alone exceeds --dense_cap_gib; the blockwise
rows are compiled first and skipped when their temp memory exceeds --cap_gib.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.attention import reference  # noqa: E402
from pallas_kernels.attention.reference import BlockSizes  # noqa: E402

GIB, MIB = 2**30, 2**20


def _load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _fwd_bwd(impl: str, block_sizes: BlockSizes):
    if impl == "dense":
        attn = reference.attention_dense
    else:
        attn = lambda q, k, v, s: reference.attention(q, k, v, s, block_sizes)
    loss = lambda q, k, v, s: jnp.sum(attn(q, k, v, s).astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _inputs(b, l, h, kv, dh, dtype):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, l, h, dh), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, l, kv, dh), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, l, kv, dh), jnp.float32).astype(dtype)
    seg = jnp.where(jnp.arange(l) < l // 3, 1, 2).astype(jnp.int32)  # two documents per row
    return q, k, v, jnp.broadcast_to(seg, (b, l))


def measure(impl, b, l, h, kv, dh, dtype, block_sizes, steps, cap_gib):
    args = _inputs(b, l, h, kv, dh, dtype)
    fn = _fwd_bwd(impl, block_sizes)
    compiled = fn.lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    row = {"impl": impl, "L": l, "temp_mib": temp / MIB, "first_s": None, "step_s": None}
    if temp > cap_gib * GIB:
        row["note"] = f"not run: temp > {cap_gib} GiB"
        return row
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    row["first_s"] = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    row["step_s"] = statistics.median(times) if times else None
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.py", help="attention shapes from config.model")
    p.add_argument("--seq_lens", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block_q", type=int, default=reference.DEFAULT_BLOCK_SIZES.block_q)
    p.add_argument("--block_k", type=int, default=reference.DEFAULT_BLOCK_SIZES.block_k)
    p.add_argument("--steps", type=int, default=2, help="timed calls after the first")
    p.add_argument("--dense_cap_gib", type=float, default=2.0, help="skip dense above this score size")
    p.add_argument("--cap_gib", type=float, default=8.0, help="do not run a program needing more temp")
    args = p.parse_args(argv)

    m = _load_config(args.config).model
    h, kv, dh, dtype = m.num_heads, m.num_kv_heads, m.head_dim, jnp.dtype(m.dtype)
    blocks = BlockSizes(args.block_q, args.block_k)
    print(
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}; B={args.batch} H={h} K={kv} "
        f"Dh={dh} {dtype.name}; blocks {blocks.block_q} x {blocks.block_k}; forward + backward (grad q, k, v)"
    )
    cols = f"{'L':>6} | {'impl':<9} | {'temp MiB':>9} | {'scores MiB':>10} | {'first s':>8} | {'step s':>8}"
    print(f"| {cols} | note")
    print("|" + "|".join("-" * (len(c) + 2) for c in cols.split(" | ")) + "|------")
    for l in (int(s) for s in args.seq_lens.split(",")):
        scores = args.batch * h * l * l * 4 / GIB
        for impl in ("dense", "blockwise"):
            if impl == "dense" and scores > args.dense_cap_gib:
                row = {"temp_mib": None, "first_s": None, "step_s": None}
                row["note"] = f"skipped: one score matrix {scores:.1f} GiB > {args.dense_cap_gib} GiB"
            else:
                row = measure(impl, args.batch, l, h, kv, dh, dtype, blocks, args.steps, args.cap_gib)
            fmt = lambda x, spec: ("-" if x is None else format(x, spec)).rjust(int(spec.split(".")[0]))
            print(
                f"| {l:>6} | {impl:<9} | {fmt(row['temp_mib'], '9.1f')} | {scores * 1024:>10.1f} | "
                f"{fmt(row['first_s'], '8.2f')} | {fmt(row['step_s'], '8.2f')} | {row.get('note', '')}",
                flush=True,
            )


if __name__ == "__main__":
    main()
