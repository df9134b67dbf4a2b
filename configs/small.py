"""Small TurboS (~77M parameters, ~40M active) for Colab or one accelerator.

    python -m turbos_jax.summary --config=configs/small.py

Expected hardware: one GPU or TPU chip; fits a free Colab T4 at short sequence lengths.
Text is tokenized into subwords ("embedded_bpe", 8,192 ids, ~4.5 bytes per token on the bundled
corpus).
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
    # Subword tokens: a byte-level BPE trained on the bundled corpus, shipped with the package
    # (turbos_jax/data/tokenizers.py); every one of its 8,192 ids is an embedding row.
    config.data.tokenizer = "embedded_bpe"
    m.vocab_size = 8192
    m.d_model = 512
    m.num_heads, m.num_kv_heads, m.head_dim = 8, 2, 64
    m.mamba_heads, m.mamba_head_dim, m.mamba_groups = 16, 64, 4
    m.mamba_d_state, m.mamba_chunk = 64, 128
    m.num_experts, m.top_k, m.expert_dim = 8, 2, 512
    m.remat_policy = "dots_no_batch"
    return config
