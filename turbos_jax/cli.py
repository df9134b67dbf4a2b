"""Shared entry-point wrapper: bad input ends in one `error: ...` line, not a traceback.

`run` is also the one place where a command-line run changes process-wide state (`prepare_process`):
the host allocator setting on CPU backends (turbos_jax/host_memory.py) and, on a host with libtpu
installed but no TPU attached, JAX's platform list narrowed to the CPU so that the TPU plugin is not
probed (it prints start-up warnings and errors). Importing any module of the package does neither.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable

from absl import app

from turbos_jax import host_memory
from turbos_jax.config import ConfigError

# Device files whose presence means JAX may pick a GPU backend (NVIDIA, NVIDIA in Docker, WSL2, AMD).
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


class UserError(Exception):
    """Base for errors caused by the user's input that carry a complete one-line message."""


def run(main: Callable[[list[str]], None], *user_errors: type[BaseException]) -> None:
    """`app.run(main)`, reporting config/data mistakes as one line and exiting with status 1.

    ml_collections applies `--config.KEY=VALUE` overrides while absl parses flags, before `main`
    runs, and raises a bare KeyError/AttributeError for a KEY the config does not have.
    """
    try:
        prepare_process()
    except ValueError as e:  # a bad TURBOS_JAX_HOST_MALLOC, before any flag is parsed
        sys.exit(f"error: {e}")
    started = []

    def wrapped(argv):
        started.append(True)
        try:
            main(argv)
        except (ConfigError, UserError, *user_errors) as e:
            sys.exit(f"error: {e}")

    try:
        app.run(wrapped)
    except (KeyError, AttributeError) as e:
        if started:
            raise
        overrides = [a.split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")]
        key = str(e).strip("'\"")
        culprit = next((o for o in overrides if o.endswith("." + key)), ", ".join(overrides))
        sys.exit(f"error: {culprit}: the config has no key {key!r}")


def expected_platform() -> str:
    """The platform of JAX's default backend ("cpu", "tpu", "gpu", or another name JAX_PLATFORMS
    gives), told without starting a backend: the first entry of JAX_PLATFORMS (or of
    `jax.config.jax_platforms`) when set, else "tpu" / "gpu" when the host has TPU chips
    (`distributed.tpu_present`) / GPU device files, else "cpu". Errs away from "cpu" (a GPU device file
    without a CUDA-enabled jaxlib still says "gpu"): "cpu" is what turns the settings below on."""
    import jax

    from turbos_jax import distributed

    configured = (jax.config.jax_platforms or "").split(",")[0].strip().lower()
    if configured:
        return {"cuda": "gpu", "rocm": "gpu"}.get(configured, configured)
    if distributed.tpu_present():
        return "tpu"
    if any(os.path.exists(f) for f in _GPU_DEVICE_FILES):
        return "gpu"
    return "cpu"


def prepare_process() -> str:
    """The process-wide settings of a command-line run; returns `expected_platform()`. Call before
    absl parses flags and before anything starts a JAX backend (`run` does).

    * TURBOS_JAX_HOST_MALLOC is checked (ValueError, one line, for a bad value) and, on a CPU backend
      only, the host allocator setting is applied (turbos_jax/host_memory.py; opt out with
      TURBOS_JAX_HOST_MALLOC=system).
    * On a CPU-only host with libtpu installed (`jax[tpu]`) and no JAX_PLATFORMS set, JAX would load
      libtpu to look for a TPU, and libtpu prints warnings and an INVALID_ARGUMENT error about TPU
      worker hostnames / accelerator type before JAX falls back to the CPU. `jax_platforms` is set to
      "cpu" instead (this process only; the environment is untouched). Not on a host with TPU chips,
      GPU device files or PJRT_NAMES_AND_LIBRARY_PATHS, nor when JAX_PLATFORMS is set: asking for a
      TPU that is not there still fails loudly.
    """
    import jax

    host_memory.check_setting()
    platform = expected_platform()
    if platform != "cpu":
        return platform
    host_memory.keep_freed_memory()
    libtpu = importlib.util.find_spec("libtpu") is not None or bool(os.environ.get("TPU_LIBRARY_PATH"))
    if libtpu and not jax.config.jax_platforms and not os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
        jax.config.update("jax_platforms", "cpu")
    return platform


def config_or_tiny(config_flag_value):
    """A benchmark's --config value, or configs/tiny.py's config when no --config was given.

    Benchmark scripts define --config with no default file: ml_collections would parse a default,
    and apply --config.KEY=VALUE overrides to it, while the flags are being defined, where a bad key
    cannot be reported in one line. So overrides need an explicit --config=FILE.
    """
    if config_flag_value is not None:
        return config_flag_value
    from configs import tiny

    return tiny.get_config()
