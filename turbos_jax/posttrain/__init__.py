"""Post-training: supervised fine-tuning and GRPO on verifiable tasks (docs/post_training.md).

* `arithmetic`: a seeded generator of graded arithmetic problems with worked solutions, split into
  disjoint train / eval / RL-prompt sets, and its JSONL writer and command line.
* `answers`: the answer-consistency checker (final-answer extraction and normalised comparison)
  that serves as the binary reward and the evaluation metric.
* `evaluation`: greedy exact match through the generation API (SFT's `eval_exact_match`).
* `generators`: `prompts -> responses` callables; `CheckpointGenerator` wraps a trained workdir.
* `cot_fusion`: adaptive long-short CoT fusion (report §3.2.1), a command line.
* `deliberate`: deliberation rounds (report §3.3): judged pairwise comparisons, weakness profile,
  next-round SFT data; a command line.
* GRPO (report §3.4-3.5): `grpo` (one iteration: rollouts, rewards, dynamic sampling, advantages,
  update), `grpo_loss` (token-level clipped objective, K3 KL, best-of-N, microbatched gradient),
  `advantages` (group z-scores, sign anchoring, dynamic sampling), `rewards` (components, shaping,
  aggregator), `sandbox` (Python unit tests in a limited child process), `rollouts` (group sampling
  and the trainer batch), `prompts` (resumable prompt mixture), `prompt_filter` (a command line),
  `grpo_config` (config.rl).
The SFT command itself is `turbos_jax.sft` (its data: `turbos_jax.data.sft`); GRPO's is
`turbos_jax.rl`.

Importing this package imports nothing else.
"""
