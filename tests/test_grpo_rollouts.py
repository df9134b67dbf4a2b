"""GRPO rollouts (turbos_jax/posttrain/rollouts.py): group layout, the sampler's log-probs against
the trainer's forward on the same tokens (negative control: a capacity-limited MoE forward), the
trainer batch layout, int8 sampling with truncated importance weights, and the prompt filter's
pass rates."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close

from configs import tiny
from turbos_jax.config import ModelConfig
from turbos_jax.data.tokenizers import ByteTokenizer
from turbos_jax.model import TurbosModel, init_model
from turbos_jax.posttrain import grpo, grpo_loss, prompt_filter, rewards
from turbos_jax.posttrain import rollouts as R

G, NEW, T = 4, 12, 24  # group size, max new tokens, trainer length
PROMPTS = ["478+256=", "7*8=", "1000-1=", "12+5="]
logprobs_fn = jax.jit(lambda p, g, b: grpo_loss.token_logprobs(p, g, b)[0], static_argnums=1)


@pytest.fixture(scope="module")
def setup():
    # The training config's capacity-limited MoE (tiny: 1.5): the RL forward must not use it.
    cfg = dataclasses.replace(ModelConfig.from_config(tiny.get_config().model), mamba_chunk=8)
    assert cfg.capacity_factor > 0 and set("AMF") <= set(cfg.layout)
    graphdef, params = init_model(cfg, seed=0)
    prompts, lengths = R.encode_prompts(ByteTokenizer().encode, PROMPTS, max_prompt_len=10)
    ro = R.sample_groups(
        graphdef, params, prompts, lengths, group_size=G, max_new_tokens=NEW, rng=jax.random.key(3), eos_id=10
    )
    return graphdef, params, ro


def test_groups_are_contiguous_and_batch_layout(setup):
    _, _, ro = setup
    assert ro.prompts.shape == (len(PROMPTS) * G, 10) and ro.completions.shape == (len(PROMPTS) * G, NEW)
    for p, text in enumerate(PROMPTS):
        rows = slice(p * G, (p + 1) * G)
        assert (ro.prompt_lengths[rows] == len(text)).all()
        assert all(bytes(r[: len(text)].tolist()).decode() == text for r in ro.prompts[rows])
    assert len({tuple(c) for c in ro.completions}) > len(PROMPTS)  # T = 1.0 samples differ in a group
    batch = R.training_batch(ro, T)
    for i in range(len(ro.lengths)):
        lp, n = ro.prompt_lengths[i], ro.lengths[i]
        on = np.flatnonzero(batch["loss_mask"][i])
        assert on.tolist() == list(range(lp - 1, lp - 1 + n))  # exactly the completion targets
        assert (batch["targets"][i, on] == ro.completions[i, :n]).all()
        assert (batch["inputs"][i, :lp] == ro.prompts[i, :lp]).all()
    truncated = ro.lengths == NEW
    assert (ro.truncated == (truncated & (ro.completions[:, -1] != 10))).all()


def test_sampler_logprobs_equal_trainer_forward(setup):
    graphdef, params, ro = setup
    batch = R.training_batch(ro, T)
    mask = batch["loss_mask"] > 0
    sampler = R.at_targets(ro.logprobs, ro, T)
    trainer = np.asarray(logprobs_fn(params, R.dropless_graphdef(graphdef, params), batch))
    err = np.abs(trainer - sampler)[mask].max()
    print(f"\nsampler vs trainer log-prob: max |diff| {err:.2e} over {mask.sum()} tokens")
    # Measured: ~1e-6 (fp32 everywhere, fp32 SSM state, dropless MoE in both).
    assert err < 1e-4

    # Negative control: the capacity-limited training MoE (capacity squeezed so tokens drop)
    # routes differently from the dropless sampler, and parity breaks.
    squeezed = dataclasses.replace(nnx.merge(graphdef, params).cfg, capacity_factor=0.25)
    gdef_drop = nnx.split(nnx.eval_shape(lambda: TurbosModel(squeezed, rngs=nnx.Rngs(0))))[0]
    dropped = np.asarray(logprobs_fn(params, gdef_drop, batch))
    assert np.abs(dropped - sampler)[mask].max() > 1e-2


def test_int8_sampling_truncated_importance_weights(setup):
    graphdef, params, ro = setup
    prompts, lengths = ro.prompts[::G], ro.prompt_lengths[::G]
    ro8 = R.sample_groups(
        graphdef,
        params,
        prompts,
        lengths,
        group_size=G,
        max_new_tokens=NEW,
        rng=jax.random.key(3),
        eos_id=10,
        int8=True,
    )
    batch = R.training_batch(ro8, T)
    mask = batch["loss_mask"]
    trainer = np.asarray(logprobs_fn(params, R.dropless_graphdef(graphdef, params), batch))
    sampler = R.at_targets(ro8.logprobs, ro8, T)
    gap = np.abs(trainer - sampler)[mask > 0]
    print(f"\nint8 sampler vs fp32 trainer log-prob: mean |diff| {gap.mean():.2e}, max {gap.max():.2e}")
    assert 1e-6 < gap.max() < 0.5  # int8 weights shift log-probs a little, never wildly
    w = R.truncated_is_weights(trainer, sampler, mask, cap=2.0)
    assert_close(w[mask > 0], np.exp(trainer - sampler)[mask > 0], 1e-5, "untruncated weights")
    assert (w[mask == 0] == 1.0).all()
    # The cap: a token the sampler found 10x less likely than the trainer gets weight 2, not 10.
    spiky = sampler.copy()
    spiky[mask > 0] -= np.log(10.0)
    assert np.allclose(R.truncated_is_weights(trainer, spiky, mask, cap=2.0)[mask > 0], 2.0)


def test_prompt_filter_pass_rates(setup, tmp_path):
    """Pass rates are the per-prompt fraction of the K sampled responses its verifier accepts; the
    filter keeps 0 < rate < 1. The verifier here accepts responses whose first byte is even."""
    graphdef, params, _ = setup
    tok = ByteTokenizer()
    text = grpo.Text(tok.encode, tok, 10)
    even = lambda p, c, m: np.array([float(len(x) > 0 and ord(x[0]) % 2 == 0) for x in c])
    spec = rewards.RewardSpec({"even": (even, 1.0)}, correctness="even")
    records = [{"prompt": p} for p in PROMPTS]
    kwargs = dict(text=text, k=G, max_prompt_len=10, max_new_tokens=NEW, temperature=1.0, seed=5)
    rates, failures = prompt_filter.pass_rates(
        graphdef, params, records, prompts_per_batch=len(PROMPTS), reward_spec=spec, **kwargs
    )
    prompts, lengths = R.encode_prompts(tok.encode, PROMPTS, 10)
    ro = R.sample_groups(
        graphdef, params, prompts, lengths, group_size=G, max_new_tokens=NEW,
        rng=jax.random.fold_in(jax.random.key(5), 0), eos_id=10,
    )  # fmt: skip
    texts, _ = grpo.decode_responses(text, ro)
    expected = even(None, texts, None).reshape(-1, G).mean(1)
    assert rates.tolist() == expected.tolist() and failures == 0
    assert 0 < rates.mean() < 1  # random init: some bytes even, some odd

    rates = np.array([0.0, 0.25, 1.0, 0.5])
    keep = prompt_filter.keep_mask(rates)
    assert keep.tolist() == [False, True, False, True]
    assert prompt_filter.histogram(rates, 4).splitlines()[0].startswith("0/4:      1")
    out = tmp_path / "kept.jsonl"
    assert prompt_filter.write_filtered(str(out), records, rates, keep) == 2
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == [PROMPTS[1], PROMPTS[3]]
