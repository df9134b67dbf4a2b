"""The compiled generate loop for RL rollouts and the CLI.

    tokens, n = generate(graphdef, params, prompts, lengths, max_new_tokens=64,
                         sampling=SamplingParams(temperature=0.7, top_p=0.9), rng=jax.random.key(0),
                         eos_id=2)

prompts (B, L) int32 right-padded, lengths (B,) real prompt lengths (>= 1). Returns tokens
(B, max_new_tokens) int32 -- the continuation, `pad_id` after a sequence's EOS -- and n (B,) int32
generated tokens per sequence (an EOS counts; n = max_new_tokens when none was produced).
With `return_logprobs=True` a third output (B, max_new_tokens) fp32 holds each generated token's
log-probability under the distribution it was sampled from (temperature and filters applied; the
raw softmax when greedy), 0 after EOS: RL's "sampler" log-probs, compared with the trainer's.

One jitted program: prefill (chunked SSD scan + full-prompt attention, caches built; or the
prompt folded in `prefill_chunk` tokens at a time, memory bounded by the chunk), a first
sample from each prompt's last real token, then `lax.while_loop` over decode steps (one token per
sequence per step) until every sequence has produced `eos_id` or `max_new_tokens` are generated.
Step i samples with `fold_in(rng, i)`, so a seed reproduces a rollout exactly. On CPU the
period's layers are sliced out of their stacks once, before the loop, and each step runs them
unrolled on per-layer caches: XLA:CPU would otherwise copy every sliced parameter (the scan over
the period) and the Mamba2 states every step (benchmarks/RESULTS.md, "Rollout throughput"); this
costs one extra copy of the period's parameters for the call.

MoE layers run dropless: capacity is a training device (static buffer shapes, per-sequence
overflow dropping) whose drops would make a token's output depend on the other tokens batched with
it; for generation the graphdef is rebuilt with capacity_factor = 0 (same parameters).
`params` may come from `quantize_params` (int8 weights, dequantised layer by layer in the step).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from turbos_jax.config import ModelConfig
from turbos_jax.generation.sampling import SamplingParams, filter_logits, sample


def generation_graphdef(graphdef, params, **overrides):
    """The graphdef of the same model with its ModelConfig changed for generation: dropless MoE,
    no remat, plus `overrides` (e.g. kv_cache_dtype=jnp.float32). Parameters are unchanged."""
    from turbos_jax.model import TurbosModel

    cfg: ModelConfig = nnx.merge(graphdef, params).cfg
    cfg = dataclasses.replace(cfg, capacity_factor=0.0, remat_policy="none", **overrides)
    return nnx.split(nnx.eval_shape(lambda: TurbosModel(cfg, rngs=nnx.Rngs(0))))[0]


def _token_logprob(logits, tok, sampling: SamplingParams):
    """log p(tok) (B,) fp32 under the distribution `sample` drew tok from."""
    scaled = logits.astype(jnp.float32) if sampling.temperature == 0.0 else filter_logits(logits, sampling)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling", "prefill_chunk"))
def _generate(
    graphdef, params, prompts, lengths, rng, eos_id, pad_id, *, max_new_tokens, sampling, prefill_chunk
):
    model = nnx.merge(graphdef, params)
    b, l = prompts.shape
    logits, cache = model.prefill(prompts, lengths, l + max_new_tokens, chunk=prefill_chunk)
    first = sample(logits, jax.random.fold_in(rng, 0), sampling)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    logps = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(_token_logprob(logits, first, sampling))
    eos = eos_id  # -1 = none (traced: a new EOS id does not recompile)
    done = first == eos
    count = jnp.ones((b,), jnp.int32)
    # XLA:CPU copies every parameter a scan slices out of the period's stacks, every step (small
    # config: ~270 MB, 40 % of the step): slice them once here, unroll the period in the step.
    layers = None
    if jax.default_backend() == "cpu":
        layers, cache = model.period_layers(), model.unstack_period_cache(cache)

    def cond(carry):
        i, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, logps, done, count, last, cache = carry
        logits, cache = model.decode_step(last, cache, layers)
        tok = sample(logits, jax.random.fold_in(rng, i), sampling)
        logp = jnp.where(done, 0.0, _token_logprob(logits, tok, sampling))
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        logps = logps.at[:, i].set(logp)
        count = count + (~done).astype(jnp.int32)
        done = done | (tok == eos)
        return i + 1, out, logps, done, count, tok, cache

    carry = (jnp.int32(1), out, logps, done, count, first, cache)
    _, out, logps, _, count, _, _ = jax.lax.while_loop(cond, body, carry)
    return out, count, logps


def generate(
    graphdef,
    params,
    prompts,
    lengths,
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    rng=None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    prefill_chunk: int | None = None,
    return_logprobs: bool = False,
    **cfg_overrides,
):
    """See the module docstring. `prefill_chunk`: prefill the prompts this many tokens at a time
    (memory bounded by the chunk; None = the whole prompt at once). `cfg_overrides` go to
    `generation_graphdef` (cache dtypes)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk}: must be >= 1 (or None for one-shot prefill)")
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.asarray(lengths, jnp.int32)
    if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
        raise ValueError(f"prompts must be (B, L) and lengths (B,); got {prompts.shape}, {lengths.shape}")
    if not isinstance(lengths, jax.core.Tracer):
        lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
        if lo < 1 or hi > prompts.shape[1]:
            raise ValueError(f"lengths must be in [1, {prompts.shape[1]}]; got {lo}..{hi}")
    gdef = generation_graphdef(graphdef, params, **cfg_overrides)
    sampling = SamplingParams() if sampling is None else sampling
    rng = jax.random.key(0) if rng is None else rng
    pad = (eos_id if eos_id is not None else 0) if pad_id is None else pad_id
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    out, count, logps = _generate(
        gdef,
        params,
        prompts,
        lengths,
        rng,
        eos,
        jnp.int32(pad),
        max_new_tokens=int(max_new_tokens),
        sampling=sampling,
        prefill_chunk=None if prefill_chunk is None else int(prefill_chunk),
    )
    return (out, count, logps) if return_logprobs else (out, count)
