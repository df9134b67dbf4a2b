"""turbos-jax: Hunyuan-TurboS (hybrid Mamba2 + attention + MoE) in JAX / Flax NNX.

Importing the package or any of its modules changes nothing process-wide (no absl flags, environment
variables or allocator settings): the `python -m turbos_jax.*` entry points do that in their `main`
path (turbos_jax/cli.py).
"""
