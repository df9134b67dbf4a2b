"""turbos-jax: Hunyuan-TurboS (hybrid Mamba2 + attention + MoE) in JAX / Flax NNX."""

import warnings as _warnings

from turbos_jax import host_memory as _host_memory

# Before JAX creates its thread pools; see host_memory.py for why and how to opt out.
try:
    _host_memory.keep_freed_memory()
except ValueError as _e:
    # A bad TURBOS_JAX_HOST_MALLOC must not break `import turbos_jax` (a notebook gets a warning
    # and glibc's defaults); the command-line entry points stop with it as a one-line error.
    _host_memory.setting_error = str(_e)
    _warnings.warn(f"{_e}; glibc's defaults kept", stacklevel=2)
