"""turbos_jax.host_memory: the entry points keep large freed blocks in the process (glibc, CPU backends).

`cli.prepare_process` (which `cli.run`, every `python -m turbos_jax.*`, calls first) applies the
setting when JAX's backend will be the CPU; importing turbos_jax changes nothing."""

import json
import os
import subprocess
import sys

import pytest

from turbos_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A 128 MB block requested from a non-main thread, as XLA:CPU's worker threads request each
# execution's temporaries: with glibc's defaults it is mmap'd (above the heap's break, unmapped on
# free, page-faulted in again next time); with the setting it comes from the main heap.
_PROBE = """
import ctypes, json, sys, threading
import turbos_jax.train
from turbos_jax import cli, host_memory
out = {}
if sys.argv[1] == "cli":
    out["platform"] = cli.prepare_process()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
out["in_effect"] = host_memory.in_effect()
def work():
    p = libc.malloc(128 << 20)
    out["from_main_heap"] = p <= libc.sbrk(0)
    libc.free(p)
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(out))
"""

glibc_only = pytest.mark.skipif(host_memory._glibc() is None, reason="the setting is glibc-specific")


def _run(code: str, value: str | None, *args: str, platforms: str | None = "cpu"):
    env = {k: v for k, v in os.environ.items() if k not in (host_memory.ENV_VAR, "JAX_PLATFORMS")}
    if value is not None:
        env[host_memory.ENV_VAR] = value
    if platforms is not None:
        env["JAX_PLATFORMS"] = platforms
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@glibc_only
@pytest.mark.parametrize("value", [None, "keep", " KEEP "])
def test_entry_points_keep_large_blocks_in_the_heap_on_cpu(value):
    proc = _run(_PROBE, value, "cli")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"platform": "cpu", "in_effect": True, "from_main_heap": True}


@glibc_only
def test_system_leaves_glibc_defaults():
    proc = _run(_PROBE, "system", "cli")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"platform": "cpu", "in_effect": False, "from_main_heap": False}


@glibc_only
def test_import_alone_changes_nothing():
    proc = _run(_PROBE, None, "import")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"in_effect": False, "from_main_heap": False}


@glibc_only
@pytest.mark.parametrize("platforms,expected", [("tpu", "tpu"), ("cuda,cpu", "gpu"), ("rocm", "gpu")])
def test_not_applied_for_an_accelerator_backend(platforms, expected):
    """Decided from JAX_PLATFORMS without starting a backend (there is no such device here)."""
    proc = _run(_PROBE, None, "cli", platforms=platforms)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"platform": expected, "in_effect": False, "from_main_heap": False}


@pytest.mark.parametrize(
    "tpu,gpu_file,expected", [(False, False, "cpu"), (True, False, "tpu"), (False, True, "gpu")]
)
def test_expected_platform_without_jax_platforms(tpu, gpu_file, expected):
    """No JAX_PLATFORMS: the accelerator device files decide (all of them faked here, so the answer
    is the same on any host), no backend is started."""
    code = (
        "import os\n"
        "from turbos_jax import cli, distributed\n"
        f"distributed.tpu_present = lambda: {tpu}\n"
        "exists = os.path.exists\n"
        f"os.path.exists = lambda p: {gpu_file} if p in cli._GPU_DEVICE_FILES else exists(p)\n"
        "print(cli.expected_platform())\n"
        "from jax._src import xla_bridge\n"
        "print(xla_bridge.backends_are_initialized())\n"
    )
    proc = _run(code, None, platforms=None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [expected, "False"]


def test_bad_value_is_ignored_on_import_and_stops_the_cli_in_one_line(tmp_path):
    message = "TURBOS_JAX_HOST_MALLOC='tcmalloc': expected one of ('keep', 'system')"
    proc = _run(
        "import turbos_jax.train; from turbos_jax import host_memory; print(host_memory.in_effect())",
        "tcmalloc",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"  # glibc's defaults
    assert "TURBOS_JAX_HOST_MALLOC" not in proc.stderr  # importing does not read the variable
    proc = subprocess.run(
        [sys.executable, "-m", "turbos_jax.train", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, host_memory.ENV_VAR: "tcmalloc"},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "w").exists()  # stopped before anything was written
