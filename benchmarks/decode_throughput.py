"""Decode cost vs context length: cache bytes per sequence (analytic, full TurboS vs an all-attention
model) and measured decode step time of the tiny config on this machine.

    python benchmarks/decode_throughput.py            # analytic table + tables (a) and (b), markdown
    python benchmarks/decode_throughput.py --contexts=1024,4096 --fixed_context=2048 --batch=4
    python benchmarks/decode_throughput.py --smoke    # tiny sizes: checks the script (CI)

1. Analytic (`turbos_jax.accounting.cache_bytes`, bf16 KV, fp32 SSM state, bf16 conv taps): bytes
   per sequence at context T = T * kv_bytes_per_token + mamba_bytes_per_sequence, for
   configs/turbos.py and for the same config with every Mamba2 slot turned into attention
   (`layout.replace("M", "A")`: same d_model, heads and FFNs; 64 attention layers instead of 7).
2. Measured: the tiny model (fp32, dropless MoE), `TurbosModel.decode_step` in a jitted `lax.scan`
   of --steps steps from a cache preallocated to max_len slots with T tokens already cached (an
   `init_cache` with lengths set: the cached values do not change the cost). The cache is donated
   to the call, so only the steps are timed; a row is the median of --repeats calls after one
   warm-up / compile, in ms per step and tokens/s = batch / step time.
   (a) step time against the context T (default 1K, 2K, ..., 64K) in one cache of max(T) + steps
       slots: decode attention reads the filled blocks only, so time grows with T;
   (b) step time against max_len (default 4K and 64K) at --fixed_context (1K): the same within
       noise, since no step touches the unfilled slots. The max_lens are timed twice in turn and
       the lower median kept.
   --all_attention repeats (a) for tiny with every Mamba2 slot turned into attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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


def decode_timer(cfg: ModelConfig, batch: int, steps: int, repeats: int):
    """A function (context, max_len) -> median seconds per decode step of the tiny model, from a
    cache of max_len slots holding `context` tokens. The cache is donated to the jitted scan (and the
    returned one reused), so no call copies it: only the decode steps themselves are timed."""
    graphdef, params = init_model(cfg, seed=0)

    @functools.partial(jax.jit, donate_argnums=1)
    def run(params, cache, tokens):
        model = nnx.merge(graphdef, params)

        def step(cache, tok):
            logits, cache = model.decode_step(tok, cache)
            return cache, logits[:, 0]

        return jax.lax.scan(step, cache, tokens)

    tokens = jax.random.randint(jax.random.key(0), (steps, batch), 0, cfg.vocab_size)
    caches = {}

    def seconds_per_step(context: int, max_len: int) -> float:
        if context + steps > max_len:
            raise ValueError(f"context {context} + {steps} steps > max_len {max_len}")
        cache = caches.pop(max_len, None) or init_cache(cfg, batch, max_len)
        times = []
        for r in range(repeats + 1):  # the first call compiles (once per max_len)
            cache["lengths"] = jnp.full((batch,), context, jnp.int32)
            t0 = time.perf_counter()
            cache, logits = run(params, cache, tokens)
            jax.block_until_ready(logits)
            if r:
                times.append(time.perf_counter() - t0)
        caches[max_len] = cache
        return float(np.median(times)) / steps

    return seconds_per_step


def tiny_config(all_attention: bool = False) -> ModelConfig:
    cfg = ModelConfig.from_config(tiny.get_config().model)
    cfg = dataclasses.replace(cfg, capacity_factor=0.0, kv_cache_dtype=jnp.float32)
    if all_attention:
        cfg = dataclasses.replace(cfg, layout=cfg.layout.replace("M", "A"))
    return cfg


def context_table(timer, contexts, batch, steps) -> str:
    """(a) Step time against the filled context, all rows in one cache of max(contexts) + steps."""
    max_len = max(contexts) + steps
    rows = [
        f"| context T (max_len {max_len:,}) | batch | decode tokens/s | ms / step |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for t in contexts:
        sec = timer(t, max_len)
        rows.append(f"| {t:,} | {batch} | {batch / sec:,.0f} | {1e3 * sec:.3f} |")
    return "\n".join(rows)


def max_len_table(timer, context, max_lens, batch) -> str:
    """(b) Step time against the preallocated max_len at a fixed context; the max_lens are timed in
    turn, twice over, and each row reports the lower median (shared cores drift)."""
    best = {m: timer(context, m) for m in max_lens}
    for m in max_lens:  # a second pass in the same order
        best[m] = min(best[m], timer(context, m))
    rows = [
        f"| max_len (context {context:,}) | batch | decode tokens/s | ms / step |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for m in max_lens:
        rows.append(f"| {m:,} | {batch} | {batch / best[m]:,.0f} | {1e3 * best[m]:.3f} |")
    return "\n".join(rows)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default=",".join(str(1024 << i) for i in range(7)))  # 1K .. 64K
    ap.add_argument("--fixed_context", type=int, default=1024)
    ap.add_argument("--max_lens", default="4096,65536")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_measure", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CI): checks the script runs")
    ap.add_argument(
        "--all_attention",
        action="store_true",
        help="also measure table (a) for tiny with every Mamba2 slot turned into attention",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        # table (a)'s cache (124 + 4 slots) is also (b)'s first max_len: two compiles in all
        args.contexts, args.fixed_context, args.max_lens = "32,124", 32, "128,512"
        args.steps, args.repeats = 4, 1
    return args


def main(argv=None):
    args = parse_args(argv)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} {jax.devices()[0].platform}"
    )
    print("\n## Cache bytes per sequence (analytic, configs/turbos.py)\n")
    print(analytic_table())
    if args.skip_measure:
        return
    contexts = [int(c) for c in args.contexts.split(",")]
    max_lens = [int(m) for m in args.max_lens.split(",")]
    timer = decode_timer(tiny_config(), args.batch, args.steps, args.repeats)
    head = f"configs/tiny.py, fp32, batch {args.batch}, {args.steps} steps per call"
    print(f"\n## (a) Decode step time vs context ({head})\n")
    print(context_table(timer, contexts, args.batch, args.steps))
    print(f"\n## (b) Decode step time vs max_len at a fixed context ({head})\n")
    print(max_len_table(timer, args.fixed_context, max_lens, args.batch))
    if args.all_attention:
        timer = decode_timer(tiny_config(all_attention=True), args.batch, args.steps, args.repeats)
        print(f"\n## (a) again, all-attention tiny (layout M -> A), batch {args.batch}\n")
        print(context_table(timer, contexts, args.batch, args.steps))


if __name__ == "__main__":
    main()
