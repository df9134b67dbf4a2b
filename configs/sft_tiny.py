"""SFT of the tiny model from scratch on the embedded arithmetic task (CPU demonstration).

    python -m turbos_jax.posttrain.arithmetic --out_dir=/tmp/turbos-arith --levels=2 \
        --operations=add --response=answer --num_train=800 --num_eval=500 --num_rl=20000
    python -m turbos_jax.sft --config=configs/sft_tiny.py --workdir=/tmp/turbos-sft

3-digit addition answered directly (`478+256=` -> `734`, then the "\\n" stop byte), from 800
labelled examples: the short-CoT format, with few enough labels that SFT stops generalising inside
the 20-60 % band that leaves room for RL. Expected hardware: 2 CPU cores, about 5 minutes.
Calibration (same schedule and seed, held-out greedy exact match of 500 prompts at steps
450 / 900 / 1350 / 1800; benchmarks/RESULTS.md "SFT on the arithmetic task"): 800 examples
21 / 38 / 42 / 46 % while the held-out loss rises from step 600 on (memorised, a plateau, so more
SFT on these labels does not help: the GRPO demonstration's control); 650 examples stay under 5 %
and 1,000 reach 86 %. The band therefore comes from the label count and the plateau, not from
stopping a steep curve early (as this config did before, on 20,000 examples). 800 labels sit on
the edge, so numerics matter: these figures are two XLA threads (2 cores); pinned to one core the
same command never found the carry rule and ended at 9.6 %. The 46 % run ships as
`turbos_jax/posttrain/shipped/sft_tiny_addition.safetensors` (configs/grpo_tiny.py's start), so
GRPO does not depend on repeating it. Start from a pre-trained workdir or parameters file instead
with --config.init_from=...
"""

import ml_collections

from configs import tiny


def get_config():
    config = tiny.get_config()
    config.total_steps = 1800  # the schedule's end (calibration in the docstring)
    config.batch_size = 8
    config.seq_len = 128  # whole examples packed per row (an example is at most 13 bytes here)
    config.log_every_steps = 25
    config.eval_every_steps = 150  # eval_loss and eval_exact_match (also at step 0)
    config.eval_batches = 8  # packed held-out batches for eval_loss
    config.checkpoint_every_steps = 300
    config.optim.schedule = (("warmup", 30, 3e-3), ("cosine", 1770, 3e-4))
    config.data.tokenizer = "bytes"  # the only data key SFT reads; the records come from config.sft

    s = config.sft = ml_collections.ConfigDict()
    s.train_file = "/tmp/turbos-arith/train.jsonl"  # JSONL file or glob of SFT records
    s.eval_file = "/tmp/turbos-arith/eval.jsonl"  # held-out records: eval_loss and exact match
    s.prompt_key = "prompt"  # record keys (docs/post_training.md, "SFT data")
    s.response_key = "response"
    s.messages_key = "messages"  # chat records: [{"role", "content"}, ...] instead of prompt/response
    s.answer_key = "answer"  # exact-match reference; absent: the response's final answer
    s.role_prefixes = {"system": "", "user": "", "assistant": ""}  # the template: text before a turn
    s.stop_text = "\n"  # one token ending every response ("" = the tokenizer's EOS)
    s.eval_prompts = 500  # held-out prompts decoded greedily per evaluation (0 = no exact match)
    s.eval_batch_size = 250  # prompts decoded at once
    s.max_new_tokens = 8  # decoding limit (answers are at most 4 digits + the stop byte)
    return config
