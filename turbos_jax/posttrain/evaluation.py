"""Greedy exact match: decode held-out prompts with the generation API and check the final answers.

    result = exact_match(graphdef, params, prompts, references, tokenizer=tok, stop_id=10,
                         max_new_tokens=96, batch_size=64)
    result.accuracy, result.responses, result.correct, result.mean_tokens

1. Prompts (token id arrays, each >= 1 token) are right-padded to the longest and decoded in batches
   of `batch_size` (the last batch is filled with copies of its first prompt, so one program is
   compiled), greedily, until `stop_id` or `max_new_tokens`.
2. Each continuation is cut at its stop token and decoded; `answers.is_correct(response, reference)`
   scores it (a reference of None never matches).
On a multi-process mesh every process decodes every prompt (the inputs are replicated, the outputs
gathered), so every process returns the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from turbos_jax import sharding
from turbos_jax.generation.api import generate
from turbos_jax.posttrain.answers import is_correct


class ExactMatch(NamedTuple):
    accuracy: float  # fraction of prompts whose final answer matches (0..1)
    responses: list[str]  # decoded continuations, stop token removed
    correct: list[bool]
    mean_tokens: float  # mean generated tokens per prompt (stop token included)


def _replicated(x: np.ndarray, mesh):
    return x if mesh is None else sharding.global_array(x, NamedSharding(mesh, P()))


def decode(
    graphdef,
    params,
    prompts: Sequence[np.ndarray],
    *,
    stop_id: int,
    max_new_tokens: int,
    batch_size: int,
    mesh=None,
    sampling=None,
    rng=None,
) -> list[np.ndarray]:
    """Step 1 of the module docstring -> the continuation of each prompt (stop token kept if made).
    `sampling` (default greedy) and `rng` go to `generate`; batch i samples with fold_in(rng, i)."""
    rng = jax.random.key(0) if rng is None else rng
    if not prompts:
        return []
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[0]] * (batch_size - real)
        tokens = np.zeros((batch_size, width), np.int32)
        for i, p in enumerate(chunk):
            tokens[i, : len(p)] = p
        lengths = np.asarray([len(p) for p in chunk], np.int32)
        gen, n = generate(
            graphdef,
            params,
            _replicated(tokens, mesh),
            _replicated(lengths, mesh),
            max_new_tokens=max_new_tokens,
            eos_id=stop_id,
            sampling=sampling,
            rng=jax.random.fold_in(rng, start),
        )
        gen, n = sharding.host_value(gen), sharding.host_value(n)
        out += [gen[i, : n[i]] for i in range(real)]
    return out


def decode_text(tokenizer, continuation: np.ndarray, stop_id: int) -> str:
    """A continuation's text without its final stop token."""
    ids = continuation[:-1] if len(continuation) and continuation[-1] == stop_id else continuation
    return tokenizer.decode([int(t) for t in ids])


def exact_match(
    graphdef,
    params,
    prompts: Sequence[np.ndarray],
    references: Sequence[str | None],
    *,
    tokenizer,
    stop_id: int,
    max_new_tokens: int,
    batch_size: int,
    mesh=None,
) -> ExactMatch:
    """Steps 1-2 of the module docstring."""
    continuations = decode(
        graphdef,
        params,
        prompts,
        stop_id=stop_id,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        mesh=mesh,
    )
    responses = [decode_text(tokenizer, c, stop_id) for c in continuations]

    correct = [ref is not None and is_correct(r, ref) for r, ref in zip(responses, references, strict=True)]
    accuracy = float(np.mean(correct)) if correct else float("nan")
    mean_tokens = float(np.mean([len(c) for c in continuations])) if continuations else float("nan")
    return ExactMatch(accuracy, responses, correct, mean_tokens)


def examples_exact_match(
    graphdef, params, examples: Sequence, fmt, *, max_new_tokens: int, batch_size: int, mesh=None
) -> ExactMatch:
    """`exact_match` of SFT records (`data.sft.read_examples`: `.prompt_ids`, `.reference`) in the
    tokenizer and stop token of their format `fmt` (`data.sft.make_format`)."""
    return exact_match(
        graphdef,
        params,
        [e.prompt_ids for e in examples],
        [e.reference for e in examples],
        tokenizer=fmt.tokenizer,
        stop_id=fmt.stop_id,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        mesh=mesh,
    )
