"""config.compilation_cache_dir: where compiled programs go, who wins, and bad paths.

JAX reads its cache settings once per process and the test process has its own cache configured
(conftest.py), so every check runs in a fresh interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import ROOT, subprocess_env

from configs import tiny
from turbos_jax import train
from turbos_jax.config import ConfigError

_PROBE = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp
    from turbos_jax import compile_cache
    from turbos_jax.config import ConfigError
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        used = compile_cache.enable(sys.argv[1])
    except ConfigError as e:
        print("ConfigError:", e)
        sys.exit(0)
    print("used:", used)
    # A program big enough to be worth caching, different from the other tests' programs.
    x = jnp.arange(4096.0).reshape(64, 64) / float(sys.argv[2])
    jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0))(x).block_until_ready()
""")


def _probe(path, *, env_dir=None, salt=3.0):
    env = subprocess_env(share_cache=False, fast_compile=True, JAX_PLATFORMS="cpu")
    if env_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = env_dir
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, path, str(salt)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def _entries(path):
    return [f for f in os.listdir(path) if not f.startswith(".")] if os.path.isdir(path) else []


def test_config_dir_is_created_and_receives_compiled_programs(tmp_path):
    cache = tmp_path / "nested" / "cache"
    assert _probe(str(cache)) == f"used: {cache}"
    assert _entries(str(cache)), "nothing was written to the cache directory"


def test_environment_variable_outranks_config(tmp_path):
    env_dir, cfg_dir = tmp_path / "from_env", tmp_path / "from_config"
    assert _probe(str(cfg_dir), env_dir=str(env_dir), salt=5.0) == f"used: {env_dir}"
    assert _entries(str(env_dir)) and not cfg_dir.exists()


def test_empty_path_turns_the_cache_off(tmp_path):
    assert _probe("", salt=7.0) == "used: None"


def test_uncreatable_path_is_a_one_line_config_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = _probe(str(blocker / "cache"))
    assert line.startswith(
        f"ConfigError: config.compilation_cache_dir='{blocker}/cache': cannot create the directory"
    ), line


def test_non_string_value_names_the_key():
    config = tiny.get_config()
    config.compilation_cache_dir = None  # ml_collections' type check lets None through
    with pytest.raises(ConfigError, match=r"^config\.compilation_cache_dir=None: expected"):
        train.train_and_evaluate(config, "/tmp/unused-turbos-workdir")


def test_trainer_fills_the_configured_cache(tmp_path):
    """The CLI wires config.compilation_cache_dir through (no JAX cache variable set)."""
    env = subprocess_env(share_cache=False, fast_compile=True, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cache = tmp_path / "xla"
    cmd = [
        sys.executable,
        "-m",
        "turbos_jax.train",
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'work'}",
        "--config.total_steps=2",
        "--config.batch_size=2",
        "--config.seq_len=32",
        "--config.eval_every_steps=0",
        "--config.log_every_steps=1",
        f"--config.compilation_cache_dir={cache}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(_entries(str(cache))) >= 2  # at least the init and the train step
