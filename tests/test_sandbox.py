"""The code sandbox (turbos_jax/posttrain/sandbox.py): passing and failing tests are counted, and a
loop, an unbounded allocation, a write outside its directory, a socket, a subprocess and an early
exit(0) each fail cleanly while the caller goes on (the next run still works)."""

import os
import tempfile

import pytest

from turbos_jax.posttrain.sandbox import Limits, run_python_tests

LIMITS = Limits(wall_seconds=10.0, cpu_seconds=1, memory_mib=256)
ADD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]


def test_counts_passing_and_failing_tests():
    ok = run_python_tests(ADD, TESTS, LIMITS)
    assert (ok.status, ok.passed, ok.total, ok.fraction) == ("ok", 3, 3, 1.0)
    wrong = run_python_tests("def add(a, b):\n    return a * b\n", TESTS, LIMITS)
    assert (wrong.status, wrong.passed) == ("failed", 1)  # 2 * 2 == 4 passes by accident
    assert "test 0 raised AssertionError" in wrong.detail
    broken = run_python_tests("def add(a, b) return", TESTS, LIMITS)
    assert (broken.status, broken.passed) == ("failed", 0) and "SyntaxError" in broken.detail


@pytest.mark.parametrize(
    "name, code, status, detail",
    [
        ("cpu loop", "while True:\n    pass\n", "timeout", ""),
        ("allocation", "x = []\nwhile True:\n    x.append(bytearray(10**7))\n", "memory", "MemoryError"),
        (
            "socket",
            "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
            "failed",
            "socket",
        ),
        ("subprocess", "import subprocess\nsubprocess.run(['true'])\n", "failed", "subprocess.Popen"),
        ("early exit", "import os\nos._exit(0)\n", "error", ""),
        ("sys.exit", "import sys\nsys.exit(0)\n", "failed", "SystemExit"),
    ],
    ids=["loop", "allocation", "socket", "subprocess", "os._exit", "sys.exit"],
)
def test_hostile_code_fails_cleanly(name, code, status, detail):
    result = run_python_tests(code + ADD, TESTS, LIMITS)
    assert (result.status, result.passed) == (status, 0), (name, result)
    assert detail in result.detail, (name, result.detail)
    assert run_python_tests(ADD, TESTS[:1], LIMITS).status == "ok"  # the caller goes on


def test_writes_stay_in_the_private_directory():
    outside = os.path.join(tempfile.mkdtemp(prefix="sandbox-test-"), "escaped.txt")
    code = f"open({outside!r}, 'w').write('x')\n" + ADD
    result = run_python_tests(code, TESTS, LIMITS)
    assert result.status == "failed" and "outside the sandbox directory" in result.detail
    assert not os.path.exists(outside)
    rename = f"open('a.txt', 'w').write('x')\nimport os\nos.rename('a.txt', {outside!r})\n" + ADD
    assert "outside the sandbox directory" in run_python_tests(rename, TESTS, LIMITS).detail
    assert not os.path.exists(outside)
    inside = "open('scratch.txt', 'w').write('x')\nimport os\nos.makedirs('d/e')\n" + ADD
    assert run_python_tests(inside, ["assert open('scratch.txt').read() == 'x'"], LIMITS).status == "ok"
