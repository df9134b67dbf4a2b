"""turbos-jax: Hunyuan-TurboS (hybrid Mamba2 + attention + MoE) in JAX / Flax NNX."""

from turbos_jax import host_memory as _host_memory

# Before JAX creates its thread pools; see host_memory.py for why and how to opt out.
_host_memory.keep_freed_memory()
