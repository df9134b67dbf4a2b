"""Tiny TurboS for CPU: the quickstart default. Same layer family (A, M, F), a few of each.

    python -m turbos_jax.summary --config=configs/tiny.py

Expected hardware: 2 CPU cores; a training step takes well under a second.
"""

from configs import turbos


def get_config():
    config = turbos.get_config()
    m = config.model
    m.layout = ("AF" + "MF" * 2) * 2  # 2 A, 4 M, 6 F = 12 layers; period "AFMFMF" x2
    m.vocab_size = 256  # byte-level tokenizer
    m.d_model = 64
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 16
    m.mamba_heads, m.mamba_head_dim, m.mamba_groups = 4, 16, 2
    m.mamba_d_state, m.mamba_chunk = 16, 32
    m.num_experts, m.top_k, m.expert_dim = 8, 2, 128
    m.dtype = "float32"
    m.remat_policy = "none"
    m.kernel_impl = "xla"
    return config
