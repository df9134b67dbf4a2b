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
The SFT command itself is `turbos_jax.sft` (its data: `turbos_jax.data.sft`).

Importing this package imports nothing else.
"""
