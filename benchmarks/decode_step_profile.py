"""Where one rollout decode step spends its time: `sample_groups`' loop body, piece by piece.

    taskset -c 1 python benchmarks/decode_step_profile.py --config=configs/small.py
    python benchmarks/decode_step_profile.py --smoke      # tiny sizes: checks the script (CI)

Setting (as benchmarks/rollout_throughput.py runs the model): --config's model in fp32, dropless,
fp32 Mamba2 state and K/V cache; a cache prefilled with --batch random prompts of --prompt_len
tokens, room for --new_tokens more. Every row is one jitted function, its cache donated and fed
back call after call; the median of --calls calls after a warm-up call:

  1. the loop body as `generation.api` runs it on CPU (period layers sliced before the loop,
     per-layer caches, unrolled period) and, for comparison, with the period scanned over its
     stacked parameters and caches (what it ran before, and still runs on accelerators);
  2. the cost of each layer kind in the loop body: row 1 minus the same body with that kind's
     layers replaced by the identity (parameters and caches untouched), so fusion with the
     neighbours is counted as in the real step; "no layers" is the rest: embedding, final norm, LM
     head, sampling, log-prob. These shares add up to more than 100 %: without a kind, the other
     layers' weights and states stay in cache more. The last column is the other bound: the body
     with only that kind's layers, minus "no layers";
  3. sampling alone on (batch, vocab) logits: the inverse-CDF `categorical` the sampler uses, and
     `jax.random.categorical` (Gumbel-max over threefry bits) it replaced.
The loop body's optimised HLO is searched for `copy` ops of at least 1 MiB (a cache or a parameter
copied every step would show there).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import platform
import re
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--calls", type=int, default=10, help="timed calls per row (median reported)")
    p.add_argument("--smoke", action="store_true", help="tiny config, batch 4, 2 calls (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.batch, args.prompt_len, args.new_tokens, args.calls = "configs/tiny.py", 4, 8, 8, 2
    return args


def median_ms(fn, state, calls):
    """fn(state) -> state (donated buffers fed back): median ms of `calls` calls after a warm-up."""
    import jax

    times = []
    for _ in range(calls + 1):
        start = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[1:]), state


def big_copies(hlo_text: str, min_bytes: int = 1 << 20) -> list[str]:
    """Shapes of the `copy` instructions whose result holds at least min_bytes."""
    sizes = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2}
    out = []
    for m in re.finditer(r"= (f32|s32|u32|bf16)\[([\d,]*)\]\S* copy\(", hlo_text):
        n = 1
        for d in filter(None, m.group(2).split(",")):
            n *= int(d)
        if n * sizes[m.group(1)] >= min_bytes:
            out.append(f"{m.group(1)}[{m.group(2)}]")
    return out


@contextlib.contextmanager
def skipped(symbols: str):
    """Layers whose symbol is in `symbols` decode as the identity (x and cache unchanged)."""
    from turbos_jax.model import Block

    decode = Block.decode

    def identity_or_decode(self, x, cache, positions, layer=None):
        if self.symbol in symbols:
            return x, cache
        return decode(self, x, cache, positions, layer)

    Block.decode = identity_or_decode
    try:
        yield
    finally:
        Block.decode = decode


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from rollout_throughput import load_model_config  # benchmarks/ on sys.path

    from turbos_jax.generation import api
    from turbos_jax.generation.sampling import SamplingParams, categorical, sample
    from turbos_jax.model import init_model

    f32 = jnp.float32
    cfg = dataclasses.replace(load_model_config(args.config), dtype=f32, capacity_factor=0.0)
    graphdef, params = init_model(cfg, seed=0)
    gdef = api.generation_graphdef(graphdef, params, ssm_state_dtype=f32, kv_cache_dtype=f32)
    b, lp, n_new = args.batch, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, lp)), jnp.int32)
    lengths = jnp.full((b,), lp, jnp.int32)
    prefill = jax.jit(lambda p: nnx.merge(gdef, p).prefill(prompts, lengths, lp + n_new)[1])
    layers = jax.jit(lambda p: nnx.merge(gdef, p).period_layers())(params)
    unstack = jax.jit(lambda p, c: nnx.merge(gdef, p).unstack_period_cache(c))
    sampling = SamplingParams(temperature=1.0)
    key = jax.random.key(0)

    def time_body(unrolled: bool):
        def body(p, layers, state):  # api._generate's loop body, outputs written at step i
            i, out, logps, last, cache = state
            logits, cache = nnx.merge(gdef, p).decode_step(last, cache, layers)
            tok = sample(logits, jax.random.fold_in(key, i), sampling)
            logp = api._token_logprob(logits, tok, sampling)
            return i + 1, out.at[:, i].set(tok), logps.at[:, i].set(logp), tok, cache

        cache = prefill(params)
        cache = unstack(params, cache) if unrolled else cache
        state = (
            jnp.int32(1),
            jnp.zeros((b, n_new), jnp.int32),
            jnp.zeros((b, n_new), f32),
            prompts[:, 0],
            cache,
        )
        step = jax.jit(body, donate_argnums=2)  # traced anew: `skipped` applies
        lay = layers if unrolled else None
        ms, state = median_ms(lambda s: step(params, lay, s), state, args.calls)
        return ms, step.lower(params, lay, state).compile().as_text()

    rows = {}
    rows["loop body, CPU path (period unrolled, sliced once)"], hlo = time_body(True)
    rows["loop body, period scanned (stacked parameters and caches)"], _ = time_body(False)
    total = rows["loop body, CPU path (period unrolled, sliced once)"]
    counts = {s: cfg.layout.count(s) for s in "AMFD" if s in cfg.layout}
    with skipped("AMFD"):
        bare, _ = time_body(True)
    alone = {}
    for symbol, n in counts.items():
        with skipped(symbol):
            ms, _ = time_body(True)
        rows[f"{symbol} layers (x {n}), in the body"] = total - ms
        with skipped("".join(set(counts) - {symbol})):
            alone[symbol] = time_body(True)[0] - bare
    rows["no layers: embedding, norm, LM head, sampling, log-prob"] = bare
    logits = jnp.asarray(rng.normal(size=(b, cfg.padded_vocab)) * 2.0, f32)
    for name, fn in [
        ("sampling alone: inverse-CDF `categorical` (used)", categorical),
        ("sampling alone: `jax.random.categorical` (Gumbel, before)", jax.random.categorical),
    ]:
        draw = jax.jit(fn)  # logits an argument: as a constant XLA would fold the exp and sums
        rows[name], _ = median_ms(lambda s, draw=draw: (draw(s[1], logits), s[1]), (None, key), args.calls)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__}; config {args.config}, batch {b}, cache {lp} + {n_new} slots, fp32\n"
    )
    print("| piece | ms per step | share of the CPU loop body | the kind alone (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms in rows.items():
        only = f"{alone[name[0]]:.2f}" if " layers (x " in name else ""
        print(f"| {name} | {ms:.2f} | {100 * ms / total:.0f} % | {only} |")
    copies = big_copies(hlo)
    listed = f": {', '.join(copies)}" if copies else ""
    print(f"\nCPU loop body HLO: {len(copies)} copy ops of >= 1 MiB{listed}")


if __name__ == "__main__":
    main()
