"""Decode cost vs context length: cache bytes per sequence (analytic, full TurboS vs an all-attention
model) and measured decode tokens/s of the tiny config on this machine.

    python benchmarks/decode_throughput.py                      # both parts, markdown to stdout
    python benchmarks/decode_throughput.py --contexts=128,1024,4096 --batch=1 --steps=64

1. Analytic (`turbos_jax.accounting.cache_bytes`, bf16 KV, fp32 SSM state, bf16 conv taps): bytes
   per sequence at context T = T * kv_bytes_per_token + mamba_bytes_per_sequence, for
   configs/turbos.py and for the same config with every Mamba2 slot turned into attention
   (`layout.replace("M", "A")`: same d_model, heads and FFNs; 64 attention layers instead of 7).
2. Measured: the tiny model (fp32), `TurbosModel.decode_step` in a jitted `lax.scan` of --steps
   steps from a cache preallocated to T positions with T - steps - 1 tokens already cached (an
   `init_cache` with lengths set: the cached values do not change the cost). Decode attends over
   the whole preallocated cache with a length mask, so the attention term grows with T. Reported:
   median of --repeats timed scans (after one warm-up/compile), tokens/s = batch * steps / time.
   --all_attention repeats this for tiny with every Mamba2 slot turned into attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from configs import tiny, turbos  # noqa: E402
from turbos_jax.accounting import cache_bytes  # noqa: E402
from turbos_jax.config import ModelConfig  # noqa: E402
from turbos_jax.generation.cache import init_cache  # noqa: E402
from turbos_jax.model import init_model  # noqa: E402

ANALYTIC_CONTEXTS = (1024, 4096, 16384, 32768, 65536, 131072, 262144)


def analytic_table() -> str:
    cfg = ModelConfig.from_config(turbos.get_config().model)
    attn = dataclasses.replace(cfg, layout=cfg.layout.replace("M", "A"))
    hy, aa = cache_bytes(cfg), cache_bytes(attn)
    gib = 2.0**30
    rows = [
        "| context | TurboS cache / seq (GiB) | all-attention cache / seq (GiB) | ratio |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for t in ANALYTIC_CONTEXTS:
        a = t * hy["kv_bytes_per_token"] + hy["mamba_bytes_per_sequence"]
        b = t * aa["kv_bytes_per_token"] + aa["mamba_bytes_per_sequence"]
        rows.append(f"| {t:,} | {a / gib:.3f} | {b / gib:.3f} | {b / a:.1f}x |")
    rows.append("")
    rows.append(
        f"TurboS: {cfg.layer_counts()['A']} attention layers -> "
        f"{hy['kv_bytes_per_token']:,} KV bytes/token; {cfg.layer_counts()['M']} Mamba2 "
        f"layers -> {hy['mamba_bytes_per_sequence']:,} bytes/sequence of SSM + conv state. "
        f"All-attention: {attn.layer_counts()['A']} attention layers -> "
        f"{aa['kv_bytes_per_token']:,} KV bytes/token."
    )
    return "\n".join(rows)


def measure(contexts, batch, steps, repeats, all_attention=False) -> str:
    cfg = ModelConfig.from_config(tiny.get_config().model)
    cfg = dataclasses.replace(cfg, capacity_factor=0.0, kv_cache_dtype=jnp.float32)
    if all_attention:
        cfg = dataclasses.replace(cfg, layout=cfg.layout.replace("M", "A"))
    graphdef, params = init_model(cfg, seed=0)

    @jax.jit
    def run(params, cache, tokens):
        model = nnx.merge(graphdef, params)

        def step(cache, tok):
            logits, cache = model.decode_step(tok, cache)
            return cache, logits[:, 0]

        return jax.lax.scan(step, cache, tokens)[1]

    rows = ["| context T | batch | decode tokens/s | ms / step |", "| ---: | ---: | ---: | ---: |"]
    for t in contexts:
        cache = init_cache(cfg, batch, t)
        cache["lengths"] = jnp.full((batch,), t - steps - 1, jnp.int32)
        tokens = jax.random.randint(jax.random.key(0), (steps, batch), 0, cfg.vocab_size)
        jax.block_until_ready(run(params, cache, tokens))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(run(params, cache, tokens))
            times.append(time.perf_counter() - t0)
        sec = float(np.median(times))
        rows.append(f"| {t:,} | {batch} | {batch * steps / sec:,.0f} | {1e3 * sec / steps:.2f} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="256,1024,4096,16384")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip_measure", action="store_true")
    ap.add_argument(
        "--all_attention",
        action="store_true",
        help="also measure tiny with every Mamba2 slot turned into attention",
    )
    args = ap.parse_args()
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} {jax.devices()[0].platform}"
    )
    print("\n## Cache bytes per sequence (analytic, configs/turbos.py)\n")
    print(analytic_table())
    if not args.skip_measure:
        print(f"\n## Measured decode throughput (configs/tiny.py, fp32, batch {args.batch})\n")
        contexts = [int(c) for c in args.contexts.split(",")]
        print(measure(contexts, args.batch, args.steps, args.repeats))
        if args.all_attention:
            print(
                f"\n## Measured decode throughput, all-attention tiny (layout M -> A), batch {args.batch}\n"
            )
            print(measure(contexts, args.batch, args.steps, args.repeats, all_attention=True))


if __name__ == "__main__":
    main()
