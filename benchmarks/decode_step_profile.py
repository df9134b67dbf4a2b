"""Where one rollout decode step spends its time: the jitted pieces of `sample_groups`' loop body.

    taskset -c 1 python benchmarks/decode_step_profile.py --config=configs/small.py
    python benchmarks/decode_step_profile.py --smoke      # tiny sizes: checks the script (CI)

The model of --config in fp32, dropless, fp32 Mamba2 state and K/V cache (as the rollout benchmark
runs it), a cache prefilled with --batch random prompts of --prompt_len tokens and room for
--new_tokens more. Each row is one jitted function, its cache arguments donated and fed back, so a
call does what the decode loop's body does; the median of --calls calls after a warm-up:

  1. the whole loop body (`generation.api` step: decode_step, sample, log-prob, write the outputs);
  2. `TurbosModel.decode_step` alone;
  3. its parts: the embedding lookup, one layer of each kind (A, M, F, at index 0 of the scanned
     period, reading and writing its slice of the stacked cache), final norm + LM head;
  4. sampling and the sampled token's log-prob, on (batch, vocab) logits.
Rows 3-4 times their layer counts are printed next to row 1, with what is left (scan, loop, copies).
The loop body's HLO is also searched for `copy` ops on buffers of at least 1 MiB (a cache copied
every step would show there).
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--calls", type=int, default=20, help="timed calls per row (median reported)")
    p.add_argument("--smoke", action="store_true", help="tiny config, batch 4, 3 calls (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.config, args.batch, args.prompt_len, args.new_tokens, args.calls = "configs/tiny.py", 4, 8, 8, 3
    return args


def median_ms(fn, state, calls, thread=True):
    """Median ms of `calls` calls fn(state), after a warm-up (compile). With `thread`, fn returns
    the next state (its donated buffers feed the next call); returns (ms, last state)."""
    import jax

    times = []
    for i in range(calls + 1):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(state))
        times.append(time.perf_counter() - start)
        state = out if thread else state
    return 1e3 * statistics.median(times[1:]), state


def big_copies(hlo_text: str, min_bytes: int = 1 << 20) -> list[str]:
    """`copy` instructions whose result holds at least min_bytes (f32/s32/bf16 shapes)."""
    sizes = {"f32": 4, "s32": 4, "bf16": 2, "u32": 4}
    out = []
    for m in re.finditer(r"= (f32|s32|bf16|u32)\[([\d,]*)\][^ ]* copy\(", hlo_text):
        n = 1
        for d in filter(None, m.group(2).split(",")):
            n *= int(d)
        if n * sizes[m.group(1)] >= min_bytes:
            out.append(f"{m.group(1)}[{m.group(2)}]")
    return out


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rollout_throughput import load_model_config  # benchmarks/ on sys.path
    from turbos_jax.generation import api
    from turbos_jax.generation.sampling import SamplingParams, sample
    from turbos_jax.model import init_model

    f32 = jnp.float32
    cfg = dataclasses.replace(load_model_config(args.config), dtype=f32, capacity_factor=0.0)
    graphdef, params = init_model(cfg, seed=0)
    gdef = api.generation_graphdef(graphdef, params, ssm_state_dtype=f32, kv_cache_dtype=f32)
    model = lambda p: nnx.merge(gdef, p)
    b, lp, n_new = args.batch, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (b, lp)), jnp.int32)
    lengths = jnp.full((b,), lp, jnp.int32)
    _, cache = jax.jit(lambda p, t, n: model(p).prefill(t, n, lp + n_new))(params, prompts, lengths)
    sampling = SamplingParams(temperature=1.0)
    key = jax.random.key(0)
    toks = prompts[:, -1]
    rows = {}

    def timed(name, fn, state, *consts, donate=True):
        """Row `name`: fn(*consts, state) -> state, state donated when `donate`."""
        jitted = jax.jit(fn, donate_argnums=len(consts) if donate else ())
        rows[name], state = median_ms(lambda s: jitted(*consts, s), state, args.calls, thread=donate)
        return jitted, state

    # 1. The loop body, as api._generate runs it (outputs written at step i).
    def body(p, state):
        i, out, logps, last, cache = state
        logits, cache = model(p).decode_step(last, cache)
        tok = sample(logits, jax.random.fold_in(key, i), sampling)
        logp = api._token_logprob(logits, tok, sampling)
        return i + 1, out.at[:, i].set(tok), logps.at[:, i].set(logp), tok, cache

    state = (jnp.int32(1), jnp.zeros((b, n_new), jnp.int32), jnp.zeros((b, n_new), f32), toks + 0, cache)
    body_jit, state = timed("loop body: decode_step + sample + log-prob", body, state, params)
    hlo = body_jit.lower(params, state).compile().as_text()
    cache = state[-1]

    # 2. decode_step alone.
    _, cache = timed("decode_step", lambda p, c: model(p).decode_step(toks, c)[1], cache, params)

    # 3. Its parts.
    timed("embedding lookup", lambda p, t: model(p).embed(t[:, None]), toks, params, donate=False)
    counts = {s: cfg.layout.count(s) for s in "AMFD"}
    x = jnp.asarray(rng.normal(size=(b, 1, cfg.d_model)), f32)
    positions = cache["lengths"]
    for j, symbol in enumerate(cfg.layout_split.period):
        name = f"one {symbol} layer (x {counts[symbol]})"
        if name in rows:
            continue
        gd, st = nnx.split(model(params).period[j])
        st0 = jax.tree.map(lambda a: a[0], st)

        def layer(st0, state, gd=gd):  # (x, cache) -> (y, cache): y feeds the next call
            return nnx.merge(gd, st0).decode(*state, positions, jnp.int32(0))

        timed(name, layer, (x + 0, cache["layers"]["period"][j]), st0)
    timed("final norm + LM head", lambda p, h: model(p)._head()(model(p).final_norm(h)), x, params, donate=False)
    logits = jnp.asarray(rng.normal(size=(b, cfg.padded_vocab)), f32)
    timed("sample (categorical, T = 1)", lambda lg, k: sample(lg, k, sampling), key, logits, donate=False)
    timed("sampled token's log-prob", lambda lg, t: api._token_logprob(lg, t, sampling), toks, logits, donate=False)

    # Report.
    total = rows["loop body: decode_step + sample + log-prob"]
    mult = lambda name: int(m.group(1)) if (m := re.search(r"\(x (\d+)\)", name)) else 1
    first_part = list(rows).index("embedding lookup")
    parts = sum(mult(k) * v for k, v in list(rows.items())[first_part:])
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}; "
        f"config {args.config}, batch {b}, cache {lp} + {n_new} slots (prefilled {lp}), fp32\n"
    )
    print("| piece | ms per call | ms per step (x layers) | share of the loop body |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {mult(name) * ms:.2f} | {100 * mult(name) * ms / total:.0f} % |")
    print(f"| sum of the parts (embedding .. log-prob) | | {parts:.2f} | {100 * parts / total:.0f} % |")
    copies = big_copies(hlo)
    print(f"\nloop body HLO: {len(copies)} copy ops of >= 1 MiB" + (f": {', '.join(copies)}" if copies else ""))


if __name__ == "__main__":
    main()
