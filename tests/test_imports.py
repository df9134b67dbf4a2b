"""A library with no import-time side effects, and command lines without TPU start-up noise.

Every module of `turbos_jax` and `pallas_kernels` (found with pkgutil, so new modules are covered)
imports in one fresh interpreter without defining absl flags, parsing them, changing os.environ or
glibc's allocator; the process-wide settings happen only in the `python -m turbos_jax.*` entry points
(turbos_jax/cli.py). Each check runs in a subprocess: this pytest process has imported modules and
parsed nothing the checks could see.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from turbos_jax import distributed, host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_IMPORT_EVERYTHING = r"""
import ctypes, importlib, json, os, pkgutil, sys, threading

import jax  # JAX itself sets TPU_SKIP_MDS_QUERY on import when the host has no TPU: not ours to check
from absl import flags

env_before = dict(os.environ)
parsed_before = flags.FLAGS.is_parsed()
modules = []
for package in ("turbos_jax", "pallas_kernels"):
    root = importlib.import_module(package)
    modules.append(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(info.name)
        modules.append(info.name)

from turbos_jax import host_memory

ours = sorted(
    f"{module}: --{flag.name}"
    for module, defined in flags.FLAGS.flags_by_module_dict().items()
    if module.split(".")[0] in ("turbos_jax", "pallas_kernels", "__main__")
    for flag in defined
)
mmapped = None
if host_memory._glibc() is not None:
    # glibc's defaults: a 128 MB block requested from a thread is mmap'd (above the heap's break);
    # with the allocator setting it would come from the main heap.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
    out = {}

    def work():
        p = libc.malloc(128 << 20)
        out["mmapped"] = p > libc.sbrk(0)
        libc.free(p)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    mmapped = out["mmapped"]
env_after = dict(os.environ)
print(json.dumps({
    "modules": modules,
    "flags_defined": ours,
    "config_flag": "config" in flags.FLAGS,
    "parsed": [parsed_before, flags.FLAGS.is_parsed()],
    "env_changed": sorted(k for k in env_before.keys() | env_after.keys()
                          if env_before.get(k) != env_after.get(k)),
    "host_malloc_in_effect": host_memory.in_effect(),
    "large_block_mmapped": mmapped,
}))
"""


def _python(code: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_module_imports_together_without_side_effects():
    proc = _python(_IMPORT_EVERYTHING)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # The walk found the packages' modules (a broken walk would make every check below vacuous).
    for name in ("turbos_jax.train", "turbos_jax.generate", "turbos_jax.aot", "turbos_jax.data.pipeline"):
        assert name in r["modules"]
    assert any(m.startswith("pallas_kernels.moe.") for m in r["modules"])
    assert r["flags_defined"] == []
    assert r["config_flag"] is False
    assert r["parsed"] == [False, False]
    assert r["env_changed"] == []
    assert r["host_malloc_in_effect"] is False
    if host_memory._glibc() is not None:
        assert r["large_block_mmapped"] is True  # glibc's defaults


def test_trainer_and_generator_import_into_one_process():
    """A notebook imports both (each used to define --config on import: DuplicateFlagError)."""
    proc = _python(
        "from turbos_jax.train import train_and_evaluate\n"
        "from turbos_jax.generate import restore_params\n"
        "from turbos_jax import aot, summary\n"
        "print(callable(train_and_evaluate) and callable(restore_params))\n"
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "True"


# What libtpu (installed with the test extra's jax[tpu]) prints when JAX probes for a TPU on a host
# without one, as observed with libtpu 0.0.42 / jax 0.10.2; and JAX's own line when that probe fails.
TPU_NOISE = (
    "TPU accelerator type",
    "TPU worker hostnames",
    "TPU_WORKER_HOSTNAMES",
    "Logging before InitGoogle",
    "common_lib.cc",
    "libtpu",
    "Unable to initialize backend 'tpu'",
    "metadata.google.internal",
)


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(s in line for s in TPU_NOISE)]


def _no_platform_env() -> dict:
    """This environment without the settings that keep JAX off the TPU (conftest sets JAX_PLATFORMS,
    JAX sets TPU_SKIP_MDS_QUERY in this process): what a user's shell has."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_PLATFORMS", "TPU_SKIP_MDS_QUERY", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE")
    }


@pytest.mark.skipif(distributed.tpu_present(), reason="a host with TPU chips: JAX is meant to use them")
def test_cli_prints_no_tpu_startup_noise(tmp_path):
    env = _no_platform_env()
    if importlib.util.find_spec("libtpu") is not None:  # the control: bare JAX does print the noise
        bare = _python("import jax; print(jax.default_backend())", env)
        assert bare.returncode == 0, bare.stderr[-4000:]
        assert _noise(bare.stderr), "bare JAX printed no TPU start-up noise: update TPU_NOISE"
    # The shared entry-point wrapper, and a real command that starts the backend (a 1-step train).
    wrapped = _python(
        "import jax\nfrom turbos_jax import cli\ncli.run(lambda argv: print(jax.default_backend()))\n", env
    )
    assert wrapped.returncode == 0, wrapped.stderr[-4000:]
    assert wrapped.stdout.strip() == "cpu"
    assert _noise(wrapped.stderr) == []
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "turbos_jax.train",
            "--config=configs/tiny.py",
            f"--workdir={tmp_path / 'w'}",
            "--config.total_steps=1",
            "--config.batch_size=8",
            "--config.seq_len=32",
            "--config.model.layout=AFMF",
            "--config.eval_every_steps=0",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    assert _noise(train.stdout + train.stderr) == []


def test_an_explicit_platform_is_left_to_jax():
    """JAX_PLATFORMS set by the user: the entry points neither narrow it nor hide JAX's error."""
    env = {**_no_platform_env(), "JAX_PLATFORMS": "tpu"}
    if distributed.tpu_present():
        pytest.skip("a host with TPU chips: JAX_PLATFORMS=tpu would work")
    proc = _python(
        "import jax\nfrom turbos_jax import cli\ncli.run(lambda argv: print(jax.default_backend()))\n", env
    )
    assert proc.returncode != 0
    assert "tpu" in proc.stderr.lower()
