"""TurboS long-context stage 2: 256K tokens, NTK alpha 1000 (report §2.4), from the 32K stage.

    python -m turbos_jax.train --config=configs/turbos_256k.py --workdir=W256K --config.init_from=W32K

As in configs/turbos_32k.py: `init_from` restores the 32K stage's newest checkpoint (parameters,
AdamW state, step counted on) into this mesh, the data pipeline starts fresh, and rerunning resumes
from W256K. Stage values (docs/training.md, "Long-context stages"): 20B tokens at a constant LR of
5e-6, short and long documents 3:1 by tokens, 36 rows of 262,144 tokens (9.4M tokens) per step in 9
microbatches of 4 rows, each row split over 16 chips by context parallelism (memory plan in
docs/sharding.md).
"""

from configs import turbos_32k

STEPS_BEFORE = turbos_32k.STEPS_BEFORE + turbos_32k.STAGE_STEPS  # where the 32K stage ends
STAGE_STEPS = 2_130  # 20B tokens / (36 x 262,144 tokens per step)


def get_config():
    config = turbos_32k.get_config()
    config.total_steps = STEPS_BEFORE + STAGE_STEPS
    config.batch_size = 36
    config.grad_accum_steps = 9  # 9 microbatches of 4 rows
    config.seq_len = 262_144
    config.eval_every_steps = 250
    config.checkpoint_every_steps = 100
    # 512 chips (v5p-1024): context 16 gives each chip 16,384 tokens of a row; data x context (16)
    # is the FSDP group; expert 4 keeps 8 experts per shard; the 4 rows of a microbatch go one per
    # expert shard.
    config.mesh.data, config.mesh.expert, config.mesh.model, config.mesh.context = 1, 4, 8, 16
    config.optim.schedule = (("constant", STEPS_BEFORE + STAGE_STEPS, 5e-6),)
    config.model.rope_alpha = 1000.0  # NTK-aware RoPE scaling for 256K
    return config
