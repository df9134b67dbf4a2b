"""GRPO of the tiny model on the embedded arithmetic task, from an SFT run (CPU demonstration).

    python -m turbos_jax.posttrain.arithmetic --out_dir=/tmp/turbos-arith --levels=2 \
        --operations=add --response=answer --num_train=800 --num_eval=500 --num_rl=20000
    python -m turbos_jax.posttrain.arithmetic --out_dir=/tmp/turbos-arith-general --levels=1 \
        --num_train=0 --num_eval=10 --num_rl=2000
    python -m turbos_jax.rl --config=configs/grpo_tiny.py --workdir=/tmp/turbos-grpo

Same model, tokenizer and prompt template (config.sft) as configs/sft_tiny.py, whose shipped result
(`turbos_jax/posttrain/shipped/sft_tiny_addition.safetensors`: 3-digit addition answered directly,
`478+256=` -> `734` + "\n", 46.0 % held-out exact match) loads as the policy and the frozen
reference; `--config.init_from=/tmp/turbos-sft` starts from an SFT run of your own instead
(`python -m turbos_jax.sft --config=configs/sft_tiny.py --workdir=/tmp/turbos-sft`). Each step
samples G = 8 responses to 16 prompts (128 sequences, temperature 1.0), scores them with the answer
checker, drops groups without reward spread and refills them (dynamic sampling), and makes one
token-level GRPO update.

Two stages as phases (TurboS §3.5.1): stage I on reasoning prompts with a small KL (the report's
mixture is code : math : logic = 2 : 2 : 1; this tiny task has math only), stage II on "general"
prompts keeping 10 % reasoning, with a larger KL. The tiny demo has no general task: level-1
arithmetic stands in for it. Expected hardware: 2 CPU cores; 1.6 s per step on one core.
Measured (benchmarks/grpo_demo.py: stage I only, 12 minutes per run, 3 seeds, against continued
SFT and shuffled rewards; benchmarks/RESULTS.md "GRPO on the arithmetic task"): held-out greedy
exact match 46 % -> 65.6 / 82.8 / 83.4 % in 12 minutes on one core each, while continued SFT
stayed at 48-51 % and shuffled rewards fell to 5-14 %.
"""

import ml_collections

from configs import sft_tiny
from turbos_jax.posttrain import arithmetic


def get_config():
    config = sft_tiny.get_config()
    # Policy and frozen reference: an SFT workdir or parameters file (default: the shipped one).
    config.init_from = arithmetic.SFT_PARAMS
    config.total_steps = 200
    config.log_every_steps = 5
    config.eval_every_steps = 25  # eval_exact_match (greedy, held out) at step 0 and this cadence
    config.checkpoint_every_steps = 25
    config.optim.schedule = (("constant", 200, 1e-4),)  # 2e-4: no gain in a 60-step trial
    config.optim.weight_decay = 0.0  # no decay toward 0 away from the reference
    # The update's batch: batch_size = prompts per step x num_generations sequences of seq_len
    # = max_prompt_len + max_new_tokens - 1 tokens (a prompt and its response, shifted by one).
    config.batch_size = 128
    config.seq_len = 10 + 8 - 1
    config.grad_accum_steps = 1  # microbatches of the update (the same update however split)
    config.sft.eval_prompts = 200  # held-out prompts decoded greedily per evaluation

    r = config.rl = ml_collections.ConfigDict()
    # name -> (kind, JSONL file): kind "answer" (records {"prompt", "answer"}, the answer checker)
    # or "code" (records {"prompt", "tests": [assert snippets]}, the sandbox).
    r.sources = {
        "math": ("answer", "/tmp/turbos-arith/rl_prompts.jsonl"),
        "general": ("answer", "/tmp/turbos-arith-general/rl_prompts.jsonl"),
    }
    # (last step, beta, {source: weight}): stage I reasoning with a small KL, stage II mostly
    # general prompts with 10 % reasoning kept and a larger KL (TurboS raises it; values ours).
    r.phases = (
        (150, 0.001, {"math": 1.0}),
        (200, 0.01, {"math": 0.1, "general": 0.9}),
    )
    r.num_generations = 8  # G responses per prompt
    r.max_prompt_len = 10  # prompt tokens (the template included); longer prompts are an error
    r.max_new_tokens = 8  # response limit (answers are at most 4 digits + the stop byte)
    r.temperature = 1.0  # TurboS: 1.0; lower made entropy collapse. No top-k / top-p in RL
    r.epsilon_low = 0.2  # PPO clip range below 1
    r.epsilon_high = 0.28  # ... and above 1 ("clip-higher", DAPO)
    r.kl_clip = 10.0  # K3 KL clipped to [0, kl_clip] (TurboS)
    r.bon_coef = 0.1  # best-of-N NLL on responses with positive advantage (report silent; ours)
    r.loss_agg = "token-mean"  # "token-mean" (TurboS) or "seq-mean-token-mean" (original GRPO)
    r.scale_rewards = "group"  # advantage scale: "group" std, "batch" std, or "none"
    r.sign_anchor_tau = 0.5  # group reward adjustment: reward >= tau keeps A >= a_min (-1 = off)
    r.sign_anchor_min = 0.05  # a_min; below 1/sqrt(G) so binary-reward groups are unchanged
    r.dynamic_sampling = True  # drop groups without reward spread and draw new prompts ...
    r.max_gen_batches = 4  # ... at most this many generation rounds per step
    r.mask_truncated = False  # no loss on responses cut at max_new_tokens
    r.length_weight = 0.0  # long-CoT compression reward among correct responses (0 = off)
    r.difficulty_adaptive = True  # scale the length reward by the group's pass rate
    r.repetition_weight = 0.0  # repetition penalty (repeated 3-grams) weight (0 = off)
    r.reward_model = ""  # "module:function" of a model-based reward (rewards.RewardFn), or ""
    r.reward_model_weight = 0.0  # its weight in the total reward
    r.int8_rollouts = False  # sample with int8 weights (truncated importance correction)
    r.is_cap = 2.0  # cap of the truncated importance weights
    r.shuffle_rewards = False  # control run only: rewards permuted across the batch (no signal)
    return config
