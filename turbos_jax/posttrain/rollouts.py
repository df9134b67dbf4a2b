"""Group rollouts through the generation API, and the trainer batch built from them.

    prompts, lengths = encode_prompts(tokenizer.encode, texts, max_prompt_len)
    ro = sample_groups(graphdef, params, prompts, lengths, group_size=8, max_new_tokens=16,
                       rng=key, eos_id=ord("\n"))
    batch = training_batch(ro, seq_len)            # inputs / targets / ... (B, T), loss mask
    sampler_lp = at_targets(ro.logprobs, ro, seq_len)   # (B, N) -> (B, T), aligned with targets

Rollouts use `generation.api.generate`: prefill + cached decode with the fp32 Mamba2 state (the
report keeps the SSM state fp32 at inference), K/V cached in the compute dtype, dropless MoE,
temperature 1.0 and no top-k / top-p (so the sampler's distribution is the policy's), and the
log-probability of every sampled token (measured: within 1e-6 of the trainer's, fp32 tiny model).
Each prompt is repeated G times contiguously: rows p*G .. p*G+G-1 are prompt p's group.

With `int8=True` the sampler runs on int8 weights (`quantize_params`, as TurboS samples with int8).
Its log-probs then differ from the full-precision policy's, so the trainer recomputes the old
log-probs and weights each token by the truncated importance ratio
min(exp(log pi_old - log pi_sampler), cap) (`truncated_is_weights`, cap 2.0 as tunix and verl).

Trainer rows: row i is prompt_i[:lp] + completion_i[:n] right-padded; inputs = row[:-1],
targets = row[1:], so completion token j is target position lp + j - 1; `loss_mask` is 1 exactly
there. The RL forward is dropless too (`dropless_graphdef`), so routing matches the sampler's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from turbos_jax import sharding
from turbos_jax.generation.api import generate
from turbos_jax.generation.quantize import quantize_params
from turbos_jax.generation.sampling import SamplingParams
from turbos_jax.model import segment_positions


@dataclasses.dataclass
class Rollouts:
    """Group-major rollouts, all numpy: R = prompts * G rows."""

    prompts: np.ndarray  # (R, L) int32, right-padded
    prompt_lengths: np.ndarray  # (R,) int32
    completions: np.ndarray  # (R, N) int32, pad after EOS
    lengths: np.ndarray  # (R,) int32 generated tokens (an EOS counts)
    logprobs: np.ndarray  # (R, N) fp32 sampler log-probs, 0 after EOS
    truncated: np.ndarray  # (R,) bool: no EOS within N tokens


def dropless_graphdef(graphdef, params):
    """The same model with capacity_factor = 0 (dropless MoE; remat kept): the RL forward's routing
    then equals the sampler's, which batch composition could otherwise change (token drops)."""
    from turbos_jax.model import TurbosModel

    cfg = dataclasses.replace(nnx.merge(graphdef, params).cfg, capacity_factor=0.0)
    return nnx.split(nnx.eval_shape(lambda: TurbosModel(cfg, rngs=nnx.Rngs(0))))[0]


def encode_prompts(encode, texts: list[str], max_prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`encode(text) -> ids` (the SFT template's rendering) over texts -> (prompts (N,
    max_prompt_len) int32 right-padded with 0, lengths (N,)); a prompt that is empty or longer than
    max_prompt_len raises ValueError naming it."""
    ids = [list(encode(t)) for t in texts]
    out = np.zeros((len(ids), max_prompt_len), np.int32)
    for i, (t, x) in enumerate(zip(texts, ids, strict=True)):
        if not 1 <= len(x) <= max_prompt_len:
            raise ValueError(f"prompt {t[:40]!r}: {len(x)} tokens; max_prompt_len={max_prompt_len}")
        out[i, : len(x)] = x
    return out, np.array([len(x) for x in ids], np.int32)


def sample_groups(
    graphdef,
    params,
    prompts,
    lengths,
    *,
    group_size: int,
    max_new_tokens: int,
    rng,
    eos_id: int | None,
    temperature: float = 1.0,
    int8: bool = False,
    mesh=None,
) -> Rollouts:
    """G samples per prompt (contiguous groups) with the sampler's per-token log-probs. With
    `mesh` (params on it, possibly spanning processes) the prompts go in replicated and every
    process gets the whole of the outputs: given the same prompts and rng, every process returns
    the same Rollouts."""
    prompts = np.repeat(np.asarray(prompts, np.int32), group_size, axis=0)
    lengths = np.repeat(np.asarray(lengths, np.int32), group_size)
    sampler_params = quantize_params(params) if int8 else params
    compute_dtype = nnx.merge(graphdef, params).cfg.dtype
    place = lambda x: x if mesh is None else sharding.global_array(x, NamedSharding(mesh, P()))
    tokens, n, logps = generate(
        graphdef,
        sampler_params,
        place(prompts),
        place(lengths),
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=temperature),
        rng=rng,
        eos_id=eos_id,
        return_logprobs=True,
        ssm_state_dtype=jnp.float32,  # the report: a bf16 SSM state drifts and repeats
        kv_cache_dtype=compute_dtype,  # K/V exactly as the trainer's attention computes them
    )
    tokens, n, logps = (sharding.host_value(x) for x in (tokens, n, logps))
    last = tokens[np.arange(len(n)), n - 1]
    truncated = (n == max_new_tokens) & ((last != eos_id) if eos_id is not None else True)
    return Rollouts(prompts, lengths, tokens, n.astype(np.int32), logps.astype(np.float32), truncated)


def training_batch(ro: Rollouts, seq_len: int, mask_rows: np.ndarray | None = None) -> dict:
    """Trainer batch (B, seq_len) from rollouts (layout in the module docstring). `mask_rows`
    (R,) bool: rows kept in the loss (e.g. dynamic sampling's `valid`); others get loss_mask 0."""
    r = len(ro.lengths)
    rows = np.zeros((r, seq_len + 1), np.int32)
    seg = np.zeros((r, seq_len), np.int32)
    mask = np.zeros((r, seq_len), np.float32)
    for i in range(r):
        lp, n = int(ro.prompt_lengths[i]), int(ro.lengths[i])
        if lp + n > seq_len + 1:
            raise ValueError(f"prompt {lp} + completion {n} tokens exceed seq_len + 1 = {seq_len + 1}")
        rows[i, :lp] = ro.prompts[i, :lp]
        rows[i, lp : lp + n] = ro.completions[i, :n]
        seg[i, : lp + n - 1] = 1
        if mask_rows is None or mask_rows[i]:
            mask[i, lp - 1 : lp + n - 1] = 1.0
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "segment_ids": seg,
        "positions": np.asarray(segment_positions(jnp.asarray(seg))),
        "loss_mask": mask,
    }


def at_targets(values: np.ndarray, ro: Rollouts, seq_len: int) -> np.ndarray:
    """Per-completion-token values (R, N) -> (R, seq_len) at their target positions, 0 elsewhere."""
    out = np.zeros((len(ro.lengths), seq_len), np.float32)
    for i, (lp, n) in enumerate(zip(ro.prompt_lengths, ro.lengths, strict=True)):
        out[i, lp - 1 : lp - 1 + n] = values[i, :n]
    return out


def truncated_is_weights(trainer_logprobs, sampler_logprobs, loss_mask, cap: float = 2.0) -> np.ndarray:
    """(B, T) token-level truncated importance weights min(exp(trainer - sampler), cap); 1 off the
    mask. Corrects for sampling from int8 weights while the loss assumes the trainer's policy."""
    log_ratio = np.clip(np.asarray(trainer_logprobs) - np.asarray(sampler_logprobs), -20.0, 20.0)
    w = np.minimum(np.exp(log_ratio), cap)
    return np.where(np.asarray(loss_mask) > 0, w, 1.0).astype(np.float32)
