"""Tiny TurboS for CPU: the quickstart default. Same layer family (A, M, F), a few of each.

    python -m turbos_jax.train --config=configs/tiny.py --workdir=/tmp/turbos-tiny

Expected hardware: 2 CPU cores; ~15 s to compile, ~0.2 s per step, ~2 minutes for 300 steps on
the bundled corpus (byte-level tokens; see turbos_jax/data); about half that on a rerun, which
loads the compiled step from config.compilation_cache_dir. Loss falls from ~5.5 to below 3.
"""

from configs import turbos


def get_config():
    config = turbos.get_config()
    config.total_steps = 300
    config.batch_size = 8
    config.grad_accum_steps = 1
    config.seq_len = 128
    config.log_every_steps = 10
    config.eval_every_steps = 100
    config.eval_batches = 4
    config.checkpoint_every_steps = 100
    config.optim.schedule = (("warmup", 20, 3e-3), ("cosine", 280, 3e-4))
    config.mesh.data, config.mesh.expert, config.mesh.model = -1, 1, 1  # all devices on data
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
    # Unrolled period loop (2 repeats here): a lax.scan stacks every saved residual into
    # (repeats, ...) buffers and slices them back in the backward, which on 2 CPU cores cost 14-22 %
    # of the training step (benchmarks/RESULTS.md); unrolling 2 periods does not lengthen the
    # compile (13-16 s either way, measured 2026-11-22). Parameters stay stacked per period position,
    # so checkpoints are the same as with the scan. The full config keeps scan_layers=True.
    m.scan_layers = False
    m.kernel_impl = "xla"
    return config
