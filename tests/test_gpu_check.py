"""benchmarks/gpu_check.sh and its wheel folder (benchmarks/gpu_wheelhouse.sh), without a GPU.

* The check runs here in its no-GPU mode (the GPU test classes collected and skipped, a kernels.py
  smoke subset) and writes its report: verdict "NO GPU", every phase recorded, three files out.
* The install plan: missing or unsatisfying packages come from the wheel folder, jax never does.
* The report's verdicts on a GPU, from made-up phase results: a skipped GPU class, a failed test or
  a kernel row with an error is a FAIL.
* The wheel list cannot rot: every third-party import of the code the check runs is pinned (or
  comes with jax, or is imported lazily off the check's path), and the pins are closed under their
  requirements.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402
import gpu_report  # noqa: E402

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
WHEELHOUSE_SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_wheelhouse.sh")
FIRST_PARTY = {
    "turbos_jax",
    "pallas_kernels",
    "configs",
    "benchmarks",
    "tpu_aot",
    "gpu_check",
    "gpu_report",
    "helpers",
}


# --------------------------------------------------------------------------------- the no-GPU run
@pytest.fixture(scope="module")
def no_gpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check_out")
    empty = tmp_path_factory.mktemp("no_wheels")
    env = dict(os.environ, GPU_CHECK_WHEELHOUSE=str(empty), GPU_CHECK_PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", SCRIPT, str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    return proc, out


def test_no_gpu_run_writes_the_report(no_gpu_run):
    proc, out = no_gpu_run
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verdict: NO GPU" in proc.stdout
    # Three files: a device call brings back at most eight.
    assert sorted(os.listdir(out)) == ["logs.tar.gz", "report.json", "report.md"]
    md_text = (out / "report.md").read_text()
    assert md_text.startswith("# GPU check: NO GPU")
    assert "No GPU visible to JAX" in md_text
    rep = json.loads((out / "report.json").read_text())
    assert rep["verdict"] == "NO GPU" and rep["final"] and not rep["pending"]
    assert rep["problems"] == [], rep["problems"]

    phases = {p["name"]: p for p in rep["phases"]}
    files = sorted({c.split("::")[0] for c in gpu_check.gpu_classes(os.path.join(ROOT, "tests"))})
    gpu_steps = [f"gpu_tests:{os.path.basename(f)[:-3]}" for f in files]
    for name in ["env", "install", *gpu_steps, "kernels:smoke"]:
        assert phases[name]["status"] == "ok", phases[name]
    assert phases["model_tests"]["status"] == "skipped"
    assert rep["probe"]["platform"] == "cpu" and rep["probe"]["versions"]["jax"]

    # Every GPU class was collected and skipped (with its reason), none silently missing.
    steps = {s["step"]: s for s in rep["tests"]}
    assert sorted(steps) == sorted(gpu_steps)
    for s in steps.values():
        assert s["source"] == "junit" and s["tests"]
        assert {t["outcome"] for t in s["tests"]} == {"skipped"}, s
        assert all(t["message"] for t in s["tests"])
    # junit's classname is tests.test_file.Class
    ran = {
        t["id"].split("::")[0].rsplit(".", 1)[0].replace(".", "/") + ".py"
        for s in steps.values()
        for t in s["tests"]
    }
    assert ran == set(files)

    rows = {(r["op"], r["impl"]): r for r in rep["kernels"]}
    assert set(rows) == {(op, impl) for op in ("state_update", "moe_permute") for impl in ("xla", "pallas")}
    assert all(r["error"] is None and r["median_s"] > 0 for r in rows.values()), rows
    assert rep["install"]["imports"] and set(rep["install"]["imports"].values()) == {"ok"}

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"phases.tsv", "probe.json", "kernels.jsonl", "env.log"} <= names
    assert {f"junit-{s.replace(':', '-')}.xml" for s in gpu_steps} <= names


# --------------------------------------------------------------------------------------- install
class _Dist:
    def __init__(self, version, requires=()):
        self.version, self.requires = version, list(requires)


def _wheel(folder, name, version, requires=()):
    path = os.path.join(folder, f"{name}-{version}-py3-none-any.whl")
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name}/__init__.py", "")
    return path


def test_install_plan(tmp_path):
    pytest.importorskip("packaging")
    _wheel(tmp_path, "flax", "0.12.8", ["jax>=0.10", "treescope>=0.1", "etils[epath]"])
    _wheel(tmp_path, "treescope", "0.1.10")
    _wheel(tmp_path, "etils", "1.15.0", ["fsspec; extra == 'epath'", "zipp; extra == 'epy'"])
    _wheel(tmp_path, "fsspec", "2026.9.0")
    _wheel(tmp_path, "zipp", "4.1.2")
    _wheel(tmp_path, "rich", "15.0.0")
    _wheel(tmp_path, "optax", "0.2.8", ["rich>=15", "pyyaml; python_version < '3'"])
    _wheel(tmp_path, "pyyaml", "6.0.4")
    wheels = gpu_check.scan_wheelhouse(str(tmp_path))
    installed = {
        "jax": _Dist("0.11.2"),
        "flax": _Dist("0.13.0"),
        "rich": _Dist("14.0"),
        "pyyaml": _Dist("6.0"),
    }
    roots = [("flax>=0.12.8,<0.13", True), ("rich>=13", True), ("pyyaml>=5", True), ("jax>=0.12", True)]
    roots += [("ruff", False), ("optax", True)]
    chosen, notes, problems = gpu_check.plan_install(wheels, installed, roots)
    # flax 0.13 does not satisfy <0.13: the wheel shadows it; pyyaml 6.0 satisfies >=5 and stays.
    assert chosen["flax"] == ("wheel", "0.12.8")
    assert chosen["pyyaml"] == ("installed", "6.0")
    # rich 14 satisfied the project's rich>=13, then not optax's rich>=15: the wheel replaces it.
    assert chosen["rich"] == ("wheel", "15.0.0") and chosen["optax"] == ("wheel", "0.2.8")
    assert chosen["treescope"] == ("wheel", "0.1.10") and chosen["fsspec"] == ("wheel", "2026.9.0")
    assert "zipp" not in chosen  # only the extras asked for are walked
    assert "jax" not in chosen  # never installed, never replaced ...
    assert any(p.startswith("jax 0.11.2 does not satisfy jax>=0.12") for p in problems), problems
    assert len(problems) == 1  # ... only reported; the optional ruff is a note
    assert any(n.startswith("optional, ruff") for n in notes)


def test_unzip_fallback_installs_purelib(tmp_path):
    path = _wheel(tmp_path, "pkg", "1.0")
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("pkg-1.0.data/purelib/extra_mod.py", "X = 1\n")
        z.writestr("pkg-1.0.data/scripts/tool", "#!/bin/sh\n")
    site = tmp_path / "site"
    gpu_check._unzip_wheel(path, str(site))
    assert (site / "pkg" / "__init__.py").exists() and (site / "extra_mod.py").exists()
    assert not (site / "tool").exists()


# ------------------------------------------------------------------------------- GPU-side verdicts
def _work(tmp_path, outcomes, kernel_error=None):
    work = tmp_path / "work"
    work.mkdir()
    (work / "plan.txt").write_text("env\ninstall\nprobe\ngpu_tests:test_x\nkernels:all_ops\n")
    (work / "phases.tsv").write_text(
        "".join(f"{n}\tok\t0\t1.0\t60\t\n" for n in ("env", "install", "probe", "gpu_tests:test_x"))
        + "kernels:all_ops\tok\t0\t5.0\t120\t\n"
    )
    (work / "probe.json").write_text(json.dumps({"platform": "gpu", "devices": [{"kind": "NVIDIA H100"}]}))
    cases = ""
    for i, outcome in enumerate(outcomes):
        child = {"passed": "", "skipped": '<skipped message="no GPU"/>', "failed": '<failure message="bad"/>'}
        cases += f'<testcase classname="tests.test_x.TestOnGpu" name="t{i}">{child[outcome]}</testcase>'
    (work / "junit-gpu_tests-test_x.xml").write_text(
        f"<testsuites><testsuite>{cases}</testsuite></testsuites>"
    )
    rows = [{"run": {"device": "NVIDIA H100", "peak_flops": 9.89e14, "hbm_bytes_per_s": 3.35e12}}]
    for op in gpu_report.kernel_ops():
        for impl in ("xla", "pallas"):
            err = kernel_error if (op, impl) == ("moe_permute", "pallas") else None
            rows.append(
                {"op": op, "shape": "s", "impl": impl, "median_s": 1e-3, "hbm_frac": 0.5, "error": err}
            )
    (work / "kernels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return work


@pytest.mark.parametrize(
    "outcomes,kernel_error,verdict,problem",
    [
        (["passed", "passed"], None, "PASS", None),
        (
            ["passed", "skipped"],
            None,
            "FAIL",
            "GPU CLASS SKIPPED on a GPU: tests.test_x.TestOnGpu::t1: no GPU",
        ),
        (["failed", "passed"], None, "FAIL", "tests.test_x.TestOnGpu::t0: failed: bad"),
        (["passed"], "ValueError: boom", "FAIL", "kernels moe_permute [s] pallas: ValueError: boom"),
    ],
)
def test_report_verdict_on_a_gpu(tmp_path, outcomes, kernel_error, verdict, problem):
    work = _work(tmp_path, outcomes, kernel_error)
    rc = gpu_check.main(["report", "--work", str(work), "--out", str(tmp_path / "out"), "--final"])
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["verdict"] == verdict and rc == (0 if verdict == "PASS" else 1)
    assert rep["problems"] == ([problem] if problem else [])
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.startswith(f"# GPU check: {verdict}") and "| moe_permute | s | pallas | 1 |" in text
    # Written half-way: phases still to run make it INCOMPLETE, not PASS.
    with open(work / "plan.txt", "a") as f:
        f.write("kernels:long_sequences\n")
    gpu_check.main(["report", "--work", str(work), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["verdict"] == "INCOMPLETE"


# ------------------------------------------------------------------------------- the wheel list
def _bash_array(name: str) -> list[str]:
    text = open(WHEELHOUSE_SCRIPT).read()
    m = re.search(rf"^{name}=\((.*?)\)", text, re.S | re.M)
    assert m, name
    body = "\n".join(line.split("#")[0] for line in m.group(1).splitlines())
    return [w.strip("'\"") for w in body.split()]


def _canon(name):
    return re.sub(r"[-_.]+", "-", name).lower()


PINS = {_canon(p.split("==")[0]): p.split("==")[1] for p in _bash_array("PINS")}
EXCLUDED = [_canon(p) for p in _bash_array("EXCLUDED")]
LAZY = {_canon(p) for p in _bash_array("LAZY")}


def _excluded(dist):
    return any(fnmatch.fnmatch(_canon(dist), pat) for pat in EXCLUDED)


def _checked_files():
    """The code the check runs: the packages, the configs, kernels.py, the test files it runs."""
    files = [os.path.join(ROOT, "benchmarks", "kernels.py")]
    for pkg in ("turbos_jax", "pallas_kernels", "configs"):
        for d, _, names in os.walk(os.path.join(ROOT, pkg)):
            files += [os.path.join(d, n) for n in names if n.endswith(".py")]
    tests = {c.split("::")[0] for c in gpu_check.gpu_classes(os.path.join(ROOT, "tests"))}
    tests |= {
        "tests/test_model_pallas.py",
        "tests/test_generation.py",
        "tests/conftest.py",
        "tests/tpu_aot.py",
    }
    return sorted(files) + [os.path.join(ROOT, t) for t in sorted(tests)]


def _imports(path):
    """(top-level module, imported at module level?) for each absolute import in `path`."""
    tree = ast.parse(open(path).read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], not in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], not in_function))
            visit(
                child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            )

    visit(tree, False)
    return found


def test_wheel_list_covers_every_import():
    dists_of = md.packages_distributions()
    uncovered, eager_lazy = [], []
    for path in _checked_files():
        for mod, module_level in _imports(path):
            if mod in sys.stdlib_module_names or mod in FIRST_PARTY:
                continue
            dists = [_canon(d) for d in dists_of.get(mod, [])]
            where = os.path.relpath(path, ROOT)
            if not dists:
                uncovered.append(f"{mod} ({where}): not installed here, so its distribution is unknown")
            elif not any(d in PINS or _excluded(d) or d in LAZY for d in dists):
                uncovered.append(f"{mod} ({where}): distribution {dists} not in gpu_wheelhouse.sh's PINS")
            elif module_level and all(d in LAZY and d not in PINS for d in dists):
                eager_lazy.append(f"{mod} ({where}) is imported at module level but listed as LAZY")
    assert not uncovered, uncovered
    assert not eager_lazy, eager_lazy


def test_helper_needs_only_the_standard_library():
    """gpu_check.py and gpu_report.py run before anything is installed: packaging (or pip's copy)
    only if it is there."""
    for name in ("gpu_check.py", "gpu_report.py"):
        helper = os.path.join(ROOT, "benchmarks", name)
        eager = [
            m
            for m, module_level in _imports(helper)
            if module_level and m not in sys.stdlib_module_names and m != "gpu_check"
        ]
        assert not eager, (name, eager)


def _requires(dist_name, extras):
    from packaging.requirements import Requirement

    try:
        reqs = md.distribution(dist_name).requires or []
    except md.PackageNotFoundError:
        return None
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
    out = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate(env | {"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def test_pins_are_closed_under_their_requirements():
    """Every requirement (by name, with the extras asked for) of the pinned packages, as installed
    here, is pinned too or comes with jax: the wheel folder installs into a bare jax environment."""
    pytest.importorskip("packaging")
    missing, not_here = [], []
    todo = [(name, frozenset()) for name in PINS]
    seen = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        reqs = _requires(name, set(extras))
        if reqs is None:
            not_here.append(name)
            continue
        for req in reqs:
            dep = _canon(req.name)
            if _excluded(dep):
                continue
            if dep not in PINS:
                missing.append(f"{dep} (required by {name})")
            else:
                todo.append((dep, frozenset(req.extras)))
    assert not missing, f"add to PINS in benchmarks/gpu_wheelhouse.sh: {sorted(set(missing))}"
    assert len(not_here) < len(PINS) / 2, f"most pins are not installed here: {not_here}"
