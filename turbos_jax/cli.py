"""Shared entry-point wrapper: bad input ends in one `error: ...` line, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app

from turbos_jax.config import ConfigError


class UserError(Exception):
    """Base for errors caused by the user's input that carry a complete one-line message."""


def run(main: Callable[[list[str]], None], *user_errors: type[BaseException]) -> None:
    """`app.run(main)`, reporting config/data mistakes as one line and exiting with status 1.

    ml_collections applies `--config.KEY=VALUE` overrides while absl parses flags, before `main`
    runs, and raises a bare KeyError/AttributeError for a KEY the config does not have.
    """
    from turbos_jax import host_memory

    if host_memory.setting_error:  # rejected when `import turbos_jax` ran, before any flag
        sys.exit(f"error: {host_memory.setting_error}")
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
