"""Inference for TurboS: decode caches, prefill + decode, sampling and int8 weight-only quantisation.

    from turbos_jax.generation.api import generate          # (graphdef, params, prompts, lengths)
    python -m turbos_jax.generate --config=... --workdir=... --prompt="..."

Modules: `cache` (cache layout and sizes), `sampling` (greedy / temperature / top-k / top-p / min-p),
`quantize` (int8 per-output-channel weights), `api` (the compiled generate loop). The per-layer
prefill/decode math lives next to the training math: `Attention.prefill/decode`,
`Mamba2.prefill/decode`, `Block.prefill/decode`, `TurbosModel.prefill/decode_step`.
See docs/generation.md.
"""
