"""turbos_jax.host_memory: importing turbos_jax keeps large freed blocks in the process (glibc)."""

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
import ctypes, json, threading
import turbos_jax
from turbos_jax import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
out = {"in_effect": host_memory.in_effect()}
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


def _run(code: str, value: str | None):
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_VAR}
    if value is not None:
        env[host_memory.ENV_VAR] = value
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@glibc_only
@pytest.mark.parametrize("value", [None, "keep", " KEEP "])
def test_default_keeps_large_blocks_in_the_heap(value):
    proc = _run(_PROBE, value)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"in_effect": True, "from_main_heap": True}


@glibc_only
def test_system_leaves_glibc_defaults():
    proc = _run(_PROBE, "system")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"in_effect": False, "from_main_heap": False}


def test_bad_value_warns_on_import_and_stops_the_cli_in_one_line(tmp_path):
    message = "TURBOS_JAX_HOST_MALLOC='tcmalloc': expected one of ('keep', 'system')"
    proc = _run(
        "import turbos_jax; from turbos_jax import host_memory; print(host_memory.in_effect())", "tcmalloc"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"  # glibc's defaults
    assert f"UserWarning: {message}; glibc's defaults kept" in proc.stderr
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
