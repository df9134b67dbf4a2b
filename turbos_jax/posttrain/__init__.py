"""Post-training: supervised fine-tuning and GRPO on verifiable tasks (docs/post_training.md).

* `arithmetic`: a seeded generator of graded arithmetic problems with worked solutions, split into
  disjoint train / eval / RL-prompt sets, and its JSONL writer and command line.
* `answers`: the answer-consistency checker (final-answer extraction and normalised comparison)
  that serves as the binary reward and the evaluation metric.

Importing this package imports nothing else.
"""
