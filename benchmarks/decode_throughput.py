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
   to the call, so only the steps are timed. Each table times its rows one call each in turn,
   --repeats rounds (load on the shared cores hits every row alike), after a warm-up call per
   max_len; a row is the median, in ms per step and tokens/s = batch / step time.
   (a) step time against the context T (default 1K, 2K, ..., 64K) in one cache of max(T) + steps
       slots: decode attention reads the filled blocks only, so time grows with T;
   (b) step time against max_len (default 4K and 64K) at --fixed_context (1K): the same within
       noise, since no step touches the unfilled slots; the last column, XLA's cost analysis of
       the compiled program ("bytes accessed", loop bodies counted once), shows it without noise.
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


class DecodeTimer:
    """Times the tiny model's decode steps from a cache of max_len slots holding `context` tokens.

    One ahead-of-time compiled program per max_len: a jitted `lax.scan` of `steps` decode steps.
    The cache is donated to each call (and the returned one reused), so no call copies it and only
    the decode steps themselves are timed."""

    def __init__(self, cfg: ModelConfig, batch: int, steps: int, repeats: int):
        self.cfg, self.batch, self.steps, self.repeats = cfg, batch, steps, repeats
        graphdef, self.params = init_model(cfg, seed=0)

        @functools.partial(jax.jit, donate_argnums=1)
        def run(params, cache, tokens):
            model = nnx.merge(graphdef, params)

            def step(cache, tok):
                logits, cache = model.decode_step(tok, cache)
                return cache, logits[:, 0]

            return jax.lax.scan(step, cache, tokens)

        self.run = run
        self.tokens = jax.random.randint(jax.random.key(0), (steps, batch), 0, cfg.vocab_size)
        self.programs, self.caches = {}, {}

    def program(self, max_len: int):
        if max_len not in self.programs:
            cache = jax.eval_shape(lambda: init_cache(self.cfg, self.batch, max_len))
            self.programs[max_len] = self.run.lower(self.params, cache, self.tokens).compile()
        return self.programs[max_len]

    def bytes_accessed(self, max_len: int) -> float:
        """XLA's cost analysis of the compiled program (loop bodies counted once): no timing noise."""
        cost = self.program(max_len).cost_analysis()
        return float((cost[0] if isinstance(cost, list) else cost)["bytes accessed"])

    def seconds_per_step(self, context: int, max_len: int, calls: int) -> list[float]:
        """Call time / steps of `calls` timed calls; the first use of a max_len adds a warm-up."""
        if context + self.steps > max_len:
            raise ValueError(f"context {context} + {self.steps} steps > max_len {max_len}")
        if max_len not in self.caches:
            self.caches[max_len] = init_cache(self.cfg, self.batch, max_len)
            self._call(context, max_len)
        return [self._call(context, max_len) for _ in range(calls)]

    def _call(self, context: int, max_len: int) -> float:
        program, cache = self.program(max_len), self.caches.pop(max_len)
        cache["lengths"] = jnp.full((self.batch,), context, jnp.int32)
        t0 = time.perf_counter()
        cache, logits = program(self.params, cache, self.tokens)  # the cache is donated
        jax.block_until_ready(logits)
        self.caches[max_len] = cache
        return (time.perf_counter() - t0) / self.steps


def tiny_config(all_attention: bool = False) -> ModelConfig:
    cfg = ModelConfig.from_config(tiny.get_config().model)
    cfg = dataclasses.replace(cfg, capacity_factor=0.0, kv_cache_dtype=jnp.float32)
    if all_attention:
        cfg = dataclasses.replace(cfg, layout=cfg.layout.replace("M", "A"))
    return cfg


def round_robin(timer: DecodeTimer, cases) -> list[float]:
    """Median seconds per step of each (context, max_len) case over `repeats` rounds, each round
    timing one call per case in turn, so load on shared cores hits every case alike."""
    times = [[] for _ in cases]
    for _ in range(timer.repeats):
        for i, (context, max_len) in enumerate(cases):
            times[i] += timer.seconds_per_step(context, max_len, calls=1)
    return [float(np.median(t)) for t in times]


def context_table(timer: DecodeTimer, contexts) -> str:
    """(a) Step time against the filled context, all rows in one cache of max(contexts) + steps."""
    batch, max_len = timer.batch, max(contexts) + timer.steps
    rows = [
        f"| context T (max_len {max_len:,}) | batch | decode tokens/s | ms / step |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for t, sec in zip(contexts, round_robin(timer, [(t, max_len) for t in contexts]), strict=True):
        rows.append(f"| {t:,} | {batch} | {batch / sec:,.0f} | {1e3 * sec:.3f} |")
    return "\n".join(rows)


def max_len_table(timer: DecodeTimer, context, max_lens) -> str:
    """(b) Step time against the preallocated max_len at a fixed context; the last column is XLA's
    count of bytes the compiled program accesses."""
    rows = [
        f"| max_len (context {context:,}) | batch | decode tokens/s | ms / step | compiled MB accessed |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, sec in zip(max_lens, round_robin(timer, [(context, m) for m in max_lens]), strict=True):
        mb = timer.bytes_accessed(m) / 1e6
        rows.append(f"| {m:,} | {timer.batch} | {timer.batch / sec:,.0f} | {1e3 * sec:.3f} | {mb:,.1f} |")
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
    if args.smoke:  # tiny sizes for the flags left at their defaults
        # table (a)'s cache (1020 + 4 slots) is also (b)'s first max_len: two compiles in all; both
        # max_lens hold two or more 512-slot blocks, so (b)'s bytes accessed must be equal
        smoke = dict(contexts="32,1020", fixed_context=32, max_lens="1024,4096", steps=4, repeats=1)
        for key, value in smoke.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
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
    timer = DecodeTimer(tiny_config(), args.batch, args.steps, args.repeats)
    head = f"configs/tiny.py, fp32, batch {args.batch}, {args.steps} steps per call"
    print(f"\n## (a) Decode step time vs context ({head})\n")
    print(context_table(timer, contexts))
    print(f"\n## (b) Decode step time vs max_len at a fixed context ({head})\n")
    print(max_len_table(timer, args.fixed_context, max_lens))
    if args.all_attention:
        timer = DecodeTimer(tiny_config(all_attention=True), args.batch, args.steps, args.repeats)
        print(f"\n## (a) again, all-attention tiny (layout M -> A), batch {args.batch}\n")
        print(context_table(timer, contexts))


if __name__ == "__main__":
    main()
