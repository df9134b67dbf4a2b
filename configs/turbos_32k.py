"""TurboS long-context stage 1: 32K tokens, NTK alpha 50 (report §2.4), from the 4K run's workdir.

    python -m turbos_jax.train --config=configs/turbos_32k.py --workdir=W32K --config.init_from=W4K

`init_from` restores the 4K run's newest checkpoint (parameters and AdamW state, the step counted
on: this stage's steps follow the 4K run's 1.8M) into this stage's mesh; the data pipeline starts
fresh on this stage's mixture. Rerunning the command resumes from W32K's own checkpoints.
Stage values (docs/training.md, "Long-context stages"): 30B tokens at a constant LR of 5e-6, short
and long documents 3:1 by tokens, 256 rows of 32,768 tokens (8.4M tokens) per step in 8
microbatches, context parallelism 2 on 512 v5p chips (memory plan in docs/sharding.md).
"""

from configs import turbos

STEPS_BEFORE = 1_800_000  # the 4K run's total_steps (configs/turbos.py): this stage counts on from it
STAGE_STEPS = 3_600  # 30B tokens / (256 x 32,768 tokens per step)


def get_config():
    config = turbos.get_config()
    config.total_steps = STEPS_BEFORE + STAGE_STEPS
    config.batch_size = 256
    config.grad_accum_steps = 8  # 8 microbatches of 32 rows
    config.seq_len = 32_768
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 250
    # 512 chips (v5p-1024): context 2 splits each row's 32K tokens over 2 chips; data x context is
    # the FSDP group, so parameters and optimizer state stay as sharded as at 4K.
    config.mesh.data, config.mesh.expert, config.mesh.model, config.mesh.context = 4, 8, 8, 2
    # Point the sources at your corpora: "short" the pre-training corpus (packed into long rows),
    # "long" curated long documents (and those deferred from pre-training for exceeding 4K).
    config.data.sources = {"short": "embedded", "long": "embedded"}
    config.data.mixture = ((0, {"short": 3.0, "long": 1.0}),)  # short:long = 3:1 by tokens
    # Constant 5e-6 for every step up to the end of this stage (the restored AdamW count starts at
    # the 4K run's last step, so the phase must cover it).
    config.optim.schedule = (("constant", STEPS_BEFORE + STAGE_STEPS, 5e-6),)
    config.model.rope_alpha = 50.0  # NTK-aware RoPE scaling for 32K
    return config
