"""Small TurboS (~103M parameters, ~65M active) for Colab or one accelerator.

    python -m turbos_jax.summary --config=configs/small.py

Expected hardware: one GPU or TPU chip; fits a free Colab T4 at short sequence lengths.
"""

from configs import turbos


def get_config():
    config = turbos.get_config()
    config.total_steps = 20_000
    config.batch_size, config.grad_accum_steps, config.seq_len = 32, 1, 1024
    config.checkpoint_every_steps = 1000
    config.optim.schedule = (("warmup", 500, 1e-3), ("cosine", 19_500, 1e-4))
    config.mesh.data, config.mesh.expert, config.mesh.model = -1, 1, 1  # all devices on data
    m = config.model
    m.layout = ("AF" + "MF" * 3) * 2  # 2 A, 6 M, 8 F = 16 layers
    m.vocab_size = 32_768
    m.d_model = 512
    m.num_heads, m.num_kv_heads, m.head_dim = 8, 2, 64
    m.mamba_heads, m.mamba_head_dim, m.mamba_groups = 16, 64, 4
    m.mamba_d_state, m.mamba_chunk = 64, 128
    m.num_experts, m.top_k, m.expert_dim = 8, 2, 512
    m.remat_policy = "dots_no_batch"
    return config
