"""TurboS with the full model's execution settings at CPU-test sizes (the production path under test).

    python -m turbos_jax.train --config=configs/turbos_mini.py --workdir=/tmp/turbos-mini

Starts from `turbos.py` and changes sizes only (tests/test_production_path.py checks the list):
bf16 compute over fp32 parameters, `scan_layers=True` over a repeated period plus a suffix, the
"full" remat policy, capacity factor 1.5, gradient accumulation, kernel_impl "auto" (XLA reference
ops on CPU, Pallas kernels on TPU/GPU), Mamba2 chunks of 128 (a 384-token sequence spans 3), the
warmup -> cosine -> anneal schedule. Expected hardware: 2 CPU cores; about a minute for the 20
steps (measured 54 s, most of it compiling; 0.2-0.4 s per step), less on a rerun from
config.compilation_cache_dir. Byte-level loss falls from ~5.5 (= ln 256) to ~3.7 (eval ~3.7).
"""

from configs import turbos


def get_config():
    config = turbos.get_config()
    config.total_steps = 20
    config.batch_size = 4
    config.grad_accum_steps = 2  # 2 microbatches of 2 sequences
    config.seq_len = 384  # 3 Mamba2 chunks of 128
    config.log_every_steps = 5
    config.eval_every_steps = 10
    config.eval_batches = 2
    config.checkpoint_every_steps = 10
    config.optim.schedule = (("warmup", 5, 3e-3), ("cosine", 12, 5e-4), ("anneal", 3, 1e-4))
    config.mesh.data, config.mesh.expert, config.mesh.model = -1, 1, 1  # all devices on data
    m = config.model
    m.layout = ("AF" + "MF" * 2) * 2 + "MF"  # 2 A, 5 M, 7 F = 14 layers; period "AFMFMF" x2 + "MF"
    m.vocab_size = 256  # byte-level tokenizer
    m.d_model = 64
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 2, 16
    m.mamba_heads, m.mamba_head_dim, m.mamba_groups = 4, 16, 2
    m.mamba_d_state = 16
    m.num_experts, m.top_k, m.expert_dim = 8, 2, 128
    return config
