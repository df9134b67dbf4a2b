"""One GRPO iteration, and the compiled programs it runs.

    program = build_rl_program(config, model_cfg, mesh)      # jitted update and log-probs
    step = make_grpo_step(program, settings, phases, stream, fmt, reward_spec)
    state, metrics = step(state, records)                      # records: this step's prompts

The RL train state is the trainer's {"params", "opt_state", "step"} plus "reference", the frozen
reference policy (the init_from parameters), so a checkpoint holds everything a resume needs.

One iteration (`make_grpo_step`), on the host around compiled programs:
  1. Phase: the config phase containing this step gives the loss coefficients (beta grows from
     stage I to stage II) and the prompt mixture; coefficients are traced, so no recompile.
  2. Rollouts: G samples per prompt through the generation API (rollouts.py), seeded by
     fold_in(seed, step, round): a resumed run samples exactly what the uninterrupted one did.
  3. Rewards: decoded responses (cut at the stop token) scored by `rewards.score`; failures counted.
  4. Dynamic sampling: groups with no reward spread are dropped and fresh prompts drawn from the
     stream, up to `max_gen_batches` rounds (advantages.collect_groups).
  5. Advantages: group z-scores, optionally sign-anchored; rows of filled-in groups get no loss,
     nor (with mask_truncated) rows that hit max_new_tokens without a stop token.
  6. Log-probs: old = the sampler's (on-policy, mu = 1), or with int8 rollouts the trainer's
     recomputation plus truncated importance weights; reference = the frozen reference's.
  7. The update (grpo_loss.make_rl_step), microbatched by config.grad_accum_steps.
Metrics: the update's (loss, pg_loss, kl, bon_nll, entropy, clip fractions, MoE aux), plus rewards
per component and their failures over every generated response, frac_zero_std, num_gen_batches,
groups_invalid, response length, truncated fraction, |advantage|, and the sampler-vs-trainer gap.

Several processes (multi-host) run the whole iteration alike and end with one global batch: the
same prompts (the same stream and seed everywhere), the same rollouts (one generate program over
the global mesh, its outputs gathered to every host), and process 0's rewards (every process
scores, then takes process 0's: a reward may differ between hosts, e.g. a sandbox wall-clock
limit or a remote reward model). Each process then places only its devices' slices of that batch
(sharding.global_array). Building only each process's rows instead would save host work but not
simplify anything: dynamic sampling and group advantages need every row's reward, and generation
is one global program anyway; the cost kept is that every host runs every reward once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from turbos_jax import sharding
from turbos_jax.posttrain import advantages as adv_lib
from turbos_jax.posttrain import grpo_loss, rewards
from turbos_jax.posttrain import rollouts as ro_lib
from turbos_jax.step import TrainSetup, train_setup


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps (last step included) up to `until_step` use these loss coefficients and mixture."""

    until_step: int
    loss: grpo_loss.LossParams
    mixture: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Settings:
    """config.rl's sampling and batching keys (configs/grpo_tiny.py documents each)."""

    group_size: int
    max_prompt_len: int
    max_new_tokens: int
    temperature: float
    scale_rewards: str
    adv_eps: float
    sign_anchor_tau: float | None
    sign_anchor_min: float
    dynamic_sampling: bool
    max_gen_batches: int
    mask_truncated: bool
    int8_rollouts: bool
    is_cap: float
    seed: int
    shuffle_rewards: bool = False  # control experiment: rewards permuted across the batch


class Text(NamedTuple):
    """How prompts become ids and responses text: the SFT template's prompt rendering, the
    tokenizer (for decoding) and the stop token that ends a response."""

    prompt_ids: Callable[[str], Sequence[int]]
    tokenizer: Any
    stop_id: int


def sft_text(fmt) -> Text:
    """The SFT template (`turbos_jax.data.sft.make_format(config)`) as RL's Text: a prompt is
    rendered exactly as SFT rendered it before the response (role prefixes included)."""
    from turbos_jax.data.sft import render

    def prompt_ids(prompt: str):
        return render({fmt.prompt_key: prompt, fmt.response_key: "."}, fmt).prompt_ids

    return Text(prompt_ids, fmt.tokenizer, fmt.stop_id)


class RLProgram(NamedTuple):
    """Compiled-on-first-call programs over the RL state (shardings from turbos_jax.sharding)."""

    setup: TrainSetup  # graphdef (dropless MoE), tx, schedule, init_state / abstract_state (+ reference)
    state_shardings: Any
    batch_sharding: NamedSharding
    update: Callable  # (state, batch, LossParams) -> (state, metrics), state donated
    logprobs: Callable  # (params, batch) -> (B, T) fp32 token log-probs


def build_rl_program(config, model_cfg, mesh, microbatches: int) -> RLProgram:
    """The RL counterpart of step.build_train_program: same optimizer and shardings; the policy
    forward is dropless (routing as in the sampler); the state adds the frozen "reference"."""
    base = train_setup(config, dataclasses.replace(model_cfg, capacity_factor=0.0))
    graphdef, tx = base.graphdef, base.tx

    def init_state():  # the trainer's fresh state, plus the reference (a copy of the policy)
        return from_params(base.init_state()["params"], tx)

    setup = base._replace(init_state=init_state, abstract_state=jax.eval_shape(init_state))
    state_shardings = sharding.named_shardings(setup.abstract_state, mesh)
    batch_sharding = NamedSharding(mesh, P(("data", "expert")))
    step = grpo_loss.make_rl_step(graphdef, tx, microbatches)
    shardings = {"in_shardings": (state_shardings, None, None), "out_shardings": (state_shardings, None)}
    update = jax.jit(step, donate_argnums=0, **shardings)
    logprobs = jax.jit(lambda params, batch: grpo_loss.token_logprobs(params, graphdef, batch)[0])
    return RLProgram(setup, state_shardings, batch_sharding, update, logprobs)


def from_params(params, tx) -> dict:
    """A fresh RL state whose policy and frozen reference are `params` (an SFT checkpoint's)."""
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "reference": jax.tree.map(jnp.copy, params),
    }


def phase_at(phases: Sequence[Phase], step: int) -> Phase:
    """The phase of `step` (1-based); steps past the last phase's end stay in the last phase."""
    return next((p for p in phases if step <= p.until_step), phases[-1])


def shuffled_rewards(total: np.ndarray, key) -> np.ndarray:
    """The shuffled-reward control (config.rl.shuffle_rewards): one generation round's (R,) total
    rewards permuted across the round, so every reward is kept (same multiset, same mean and
    spread) but no longer belongs to the response it scored. The permutation is seeded by the
    round's key (fold_in(seed, step, round)): reproducible, and the same on every process."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key), np.uint32)).permutation(total)


def decode_responses(text: Text, ro: ro_lib.Rollouts) -> tuple[list[str], list[list[int]]]:
    """Each response cut at its stop token -> (decoded texts, token ids without the stop)."""
    texts, ids = [], []
    for row, n in zip(ro.completions, ro.lengths, strict=True):
        toks = [int(t) for t in row[:n]]
        if toks and toks[-1] == text.stop_id:
            toks = toks[:-1]
        ids.append(toks)
        texts.append(text.tokenizer.decode(toks))
    return texts, ids


class _RewardTally:
    """Reward metrics over every generated response of a step (all dynamic-sampling rounds):
    reward/<component> (mean over the responses) and reward/<component>/<source> (mean over the
    responses to that source's prompts), reward_failures/<component>[/<source>] (counts)."""

    def __init__(self):
        self.sums, self.rows, self.failures = {}, {}, {}

    def add(self, parts: dict, metrics: dict, sources: Sequence[str]):
        sources = np.asarray(sources)
        rows = {"": np.ones(len(sources), bool)} | {f"/{s}": sources == s for s in set(sources.tolist())}
        for suffix, on in rows.items():
            self.rows[suffix] = self.rows.get(suffix, 0) + int(on.sum())
            for k, v in parts.items():
                self.sums[k, suffix] = self.sums.get((k, suffix), 0.0) + float(np.sum(np.asarray(v)[on]))
        for k, v in metrics.items():
            if k.startswith("reward_failures/"):
                self.failures[k] = self.failures.get(k, 0) + v

    def metrics(self) -> dict:
        means = {f"reward/{k}{suffix}": v / self.rows[suffix] for (k, suffix), v in self.sums.items()}
        return means | self.failures


def make_grpo_step(
    program: RLProgram,
    settings: Settings,
    phases: Sequence[Phase],
    stream,
    text: Text,
    reward_spec: rewards.RewardSpec,
    seq_len: int,
) -> Callable[[dict, list[dict]], tuple[dict, dict]]:
    """-> step(state, records) running one iteration (module docstring). `stream` draws refill
    prompts (prompts.PromptStream)."""
    g = settings.group_size
    graphdef = program.setup.graphdef

    def rollout_round(params, records, key):
        texts_in = [r["prompt"] for r in records]
        prompts, lengths = ro_lib.encode_prompts(text.prompt_ids, texts_in, settings.max_prompt_len)
        ro = ro_lib.sample_groups(
            graphdef,
            params,
            prompts,
            lengths,
            group_size=g,
            max_new_tokens=settings.max_new_tokens,
            rng=key,
            eos_id=text.stop_id,
            temperature=settings.temperature,
            int8=settings.int8_rollouts,
            mesh=program.batch_sharding.mesh,
        )
        texts, ids = decode_responses(text, ro)
        meta = [r for r in records for _ in range(g)]
        sources = [m.get("source", "") for m in meta]
        prompts = [m["prompt"] for m in meta]
        scored = rewards.score(reward_spec, prompts, texts, meta, ids, g, labels=sources)
        total, parts, metrics = process_zero_values(scored)  # one batch on every process
        if settings.shuffle_rewards:  # the "any update helps?" control: rewards lose their responses
            total = shuffled_rewards(total, key)
        rows = dataclasses.asdict(ro) | {"rewards": total}
        return rows, parts, metrics

    def collect(state, records, phase, key):
        """Steps 2-4: rollouts, rewards and dynamic sampling -> (rows, stats, reward metrics)."""
        tally = _RewardTally()

        def sample(round_index):
            recs = records if round_index == 0 else stream.draw(len(records), phase.mixture)
            rows, parts, metrics = rollout_round(state["params"], recs, jax.random.fold_in(key, round_index))
            tally.add(parts, metrics, [r.get("source", "") for r in recs for _ in range(g)])
            return rows

        if settings.dynamic_sampling:
            rows, stats = adv_lib.collect_groups(sample, len(records), g, settings.max_gen_batches)
        else:
            rows = sample(0)
            rows["valid"] = np.ones(len(rows["rewards"]), bool)
            flat = adv_lib.zero_std_groups(rows["rewards"], g)
            stats = {"num_gen_batches": 1, "frac_zero_std": float(flat.mean()), "groups_invalid": 0}
        return rows, stats, tally.metrics()

    def logprob_fields(state, batch, sampler_lp, phase):
        """Step 6 -> ({old_logprobs, is_weights, ref_logprobs}, metrics)."""
        out, extra = {"old_logprobs": sampler_lp, "is_weights": np.ones_like(sampler_lp)}, {}
        if settings.int8_rollouts:
            mask = np.asarray(batch["loss_mask"]) > 0
            trainer_lp = sharding.host_value(program.logprobs(state["params"], batch))
            out["old_logprobs"] = trainer_lp
            out["is_weights"] = ro_lib.truncated_is_weights(trainer_lp, sampler_lp, mask, settings.is_cap)
            if mask.any():
                extra["sampler_logprob_gap"] = float(np.abs(trainer_lp - sampler_lp)[mask].mean())
                extra["is_weight_mean"] = float(out["is_weights"][mask].mean())
        if phase.loss.beta > 0:
            out["ref_logprobs"] = sharding.host_value(program.logprobs(state["reference"], batch))
        else:  # no KL term: skip the reference forward (K3 of equal log-probs is 0)
            out["ref_logprobs"] = out["old_logprobs"]
        return out, extra

    def step_fn(state, records):
        step = int(jax.device_get(state["step"])) + 1
        phase = phase_at(phases, step)
        key = jax.random.fold_in(jax.random.key(settings.seed), step)
        rows, stats, reward_metrics = collect(state, records, phase, key)
        advantages = _advantages(rows, settings)
        keep = rows["valid"] & ~(rows["truncated"] if settings.mask_truncated else False)
        ro = ro_lib.Rollouts(**{f.name: rows[f.name] for f in dataclasses.fields(ro_lib.Rollouts)})
        place = lambda tree: jax.tree.map(lambda x: sharding.global_array(x, program.batch_sharding), tree)
        batch = place(ro_lib.training_batch(ro, seq_len, mask_rows=keep))
        fields, extra = logprob_fields(state, batch, ro_lib.at_targets(ro.logprobs, ro, seq_len), phase)
        fields["advantages"] = advantages
        batch = batch | place(fields)
        state, metrics = program.update(state, batch, phase.loss)
        valid = rows["valid"]
        mean = lambda v: float(np.mean(v[valid])) if valid.any() else 0.0
        metrics = dict(metrics) | reward_metrics | stats | extra
        metrics |= {
            "beta": phase.loss.beta,
            "response_tokens": mean(rows["lengths"]),
            "truncated_frac": mean(rows["truncated"]),
            "advantage_abs": mean(np.abs(advantages)),
        }
        return state, metrics

    return step_fn


def process_zero_values(tree):
    """A pytree of host values (numpy arrays, numbers) as process 0 holds it, on every process
    (unchanged with one process). 8-byte values travel as uint32 pairs, so float64 rewards
    arrive bit for bit (JAX without x64 would round them to float32)."""
    if jax.process_count() == 1:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [np.atleast_1d(np.asarray(x)) for x in leaves]
    wire = [a.view(np.uint32) if a.dtype.itemsize == 8 else a for a in arrays]
    got = multihost_utils.broadcast_one_to_all(wire)
    back = lambda w, a, x: np.asarray(w).view(a.dtype).reshape(np.shape(x))
    out = [back(w, a, x) for w, a, x in zip(got, arrays, leaves, strict=True)]
    return jax.tree.unflatten(treedef, out)


def _advantages(rows: dict, settings: Settings) -> np.ndarray:
    """Step 5: group z-scores, sign-anchored when configured; 0 on filled-in (invalid) groups."""
    r = rows["rewards"]
    a = adv_lib.group_advantages(r, settings.group_size, settings.scale_rewards, settings.adv_eps)
    if settings.sign_anchor_tau is not None:
        a = adv_lib.sign_anchor(a, r, settings.sign_anchor_tau, settings.sign_anchor_min)
    return np.where(rows["valid"], a, 0.0).astype(np.float32)
