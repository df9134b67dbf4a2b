"""A Python code sandbox for rewards: run a response's code against unit tests in a separate process.

    result = run_python_tests(code, ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"])
    result.passed, result.total, result.status   # 2, 2, "ok"

Each call starts a fresh `python -I` child (isolated mode: no user site, no PYTHON* variables) in
a private temporary directory, removed afterwards. Before any untrusted code runs, the child's
trusted bootstrap:
  1. sets resource limits: CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS, the memory cap),
     file size (RLIMIT_FSIZE) and no core dumps;
  2. moves into new user + network namespaces where the kernel allows it (then no network
     interface exists but loopback, which is down); `network_namespace` in the result says whether it did;
  3. installs an audit hook (PEP 578) that refuses sockets, process creation (fork, exec, spawn,
     subprocess, os.system), ctypes, signals to other processes, gc object walks, and
     any write, rename, removal or mode change of a path outside the temporary directory;
  4. runs the code, then each test in the same namespace, counting passes; a SystemExit from the
     code counts as a failure. The last stdout line carries a nonce the parent sent on stdin
     (consumed before the code runs), so code that exits early with status 0 cannot fake a pass
     (code that walks the interpreter's frames could still read it: deliberate attack, not slip).
The parent enforces a wall-clock timeout and kills the whole process group.

Reads outside the directory are allowed (the interpreter must import its standard library). This
blocks runaway and careless code and casual reward hacking; it is not a boundary against a kernel
exploit (run a remote sandbox service for that, as the report's 36-language cluster does).
Every failure is a result, never an exception in the caller: status "ok" (all tests passed),
"failed", "timeout", "memory", "error" (the code did not run, or the child died).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

STATUSES = ("ok", "failed", "timeout", "memory", "error")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-run limits: wall and CPU seconds, address space in MiB, largest file written in MiB."""

    wall_seconds: float = 10.0  # verl's per-test sandbox timeout
    cpu_seconds: int = 10
    memory_mib: int = 512
    file_mib: int = 16


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str  # one of STATUSES
    passed: int  # tests passed
    total: int  # tests run
    seconds: float  # wall time of the child
    detail: str  # last lines of stderr, or why the run failed
    network_namespace: bool  # whether the child ran without network interfaces

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


# The trusted bootstrap, run with `python -I -c`; argv: root, limits JSON. It reads the nonce from
# stdin, the code and tests from files in root.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, sys
root = os.path.realpath(sys.argv[1]); lim = json.loads(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
resource.setrlimit(resource.RLIMIT_AS, (lim["mem"], lim["mem"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (lim["fsize"], lim["fsize"]))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
netns = False
try:
    netns = ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0  # USER | NET
except Exception:
    pass
os.chdir(root)
nonce = sys.stdin.readline().strip()
sys.stdin.close()
code = open("solution.py").read(); tests = json.load(open("tests.json"))
del ctypes
sys.modules.pop("ctypes", None)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
               "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "os.chdir"}
DENY = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
        "os.system", "os.startfile", "ctypes.", "gc.get_",
        "pty.", "os.setuid", "resource.setrlimit", "os.putenv", "mmap.")
def inside(p):
    try:
        p = os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    if p is None:
        return True
    return os.path.commonpath([root, os.path.realpath(p)]) == root  # relative to the real cwd
def hook(event, args, _inside=inside, _own=os.getpid()):
    if event.startswith(DENY):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & WRITE)
        if writes and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory")
    elif event in PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                raise PermissionError(f"sandbox: {event} on {a!r} outside the sandbox directory")
    elif event == "os.kill" and args[0] not in (_own, 0):
        raise PermissionError("sandbox: signalling other processes is not allowed")
sys.addaudithook(hook)
def run(nonce=nonce):
    scope = {"__name__": "__main__"}
    try:
        exec(compile(code, "solution.py", "exec"), scope)
    except BaseException as e:
        print(f"solution raised {type(e).__name__}: {e}"[:500], file=sys.stderr)
        return 0, nonce
    passed = 0
    for i, t in enumerate(tests):
        try:
            exec(compile(t, f"test_{i}", "exec"), scope)
            passed += 1
        except BaseException as e:
            print(f"test {i} raised {type(e).__name__}: {e}"[:500], file=sys.stderr)
    return passed, nonce
del nonce
passed, n = run()
sys.stdout.flush()
print("\n" + json.dumps({"nonce": n, "passed": passed, "netns": netns}), flush=True)
"""


def _child_status(returncode: int, stderr: str) -> str:
    if returncode in (-signal.SIGXCPU, -signal.SIGKILL) or "SIGXCPU" in stderr:
        return "timeout"
    if "MemoryError" in stderr:
        return "memory"
    return "error"


def run_python_tests(code: str, tests: list[str], limits: Limits = Limits()) -> SandboxResult:
    """Runs `code`, then each test snippet (e.g. an `assert`), in a sandboxed child; see the module
    docstring. Never raises for anything the code does."""
    start = time.perf_counter()
    root = tempfile.mkdtemp(prefix="turbos-sandbox-")
    try:
        with open(os.path.join(root, "solution.py"), "w") as f:
            f.write(code)
        with open(os.path.join(root, "tests.json"), "w") as f:
            json.dump(list(tests), f)
        mib = 1024 * 1024
        lim = {"cpu": limits.cpu_seconds, "mem": limits.memory_mib * mib, "fsize": limits.file_mib * mib}
        nonce = secrets.token_hex(16)
        env = {"PATH": os.environ.get("PATH", "/bin"), "HOME": root, "TMPDIR": root, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, root, json.dumps(lim)],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
            text=True,
        )
        try:
            out, err = proc.communicate(nonce + "\n", timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            seconds = time.perf_counter() - start
            return SandboxResult("timeout", 0, len(tests), seconds, "wall-clock limit", False)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        seconds = time.perf_counter() - start
        report = _last_json_line(out)
        if proc.returncode != 0 or report is None or report.get("nonce") != nonce:
            status = _child_status(proc.returncode, err)
            return SandboxResult(status, 0, len(tests), seconds, err[-1000:], False)
        passed = int(report["passed"])
        status = "ok" if passed == len(tests) and "solution raised" not in err else "failed"
        if "MemoryError" in err:
            status = "memory" if passed < len(tests) else status
        return SandboxResult(status, passed, len(tests), seconds, err[-1000:], bool(report["netns"]))
    except OSError as e:  # could not start the child at all
        return SandboxResult("error", 0, len(tests), time.perf_counter() - start, str(e), False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _last_json_line(text: str) -> dict | None:
    lines = text.strip().splitlines()
    try:
        value = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
