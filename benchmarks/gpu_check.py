"""Helper of benchmarks/gpu_check.sh: probe the machine, install missing wheels, find the GPU test
classes, and write the report. Standard library only (packaging where the interpreter has it), so
it runs before anything is installed and when jax itself is broken.

    python benchmarks/gpu_check.py probe --out probe.json [--site DIR]
    python benchmarks/gpu_check.py install --wheelhouse DIR --site DIR --out install.json
    python benchmarks/gpu_check.py gpu-classes            # tests/FILE.py::Class, one a line
    python benchmarks/gpu_check.py report --work DIR --out OUTDIR [--final]

The report (OUTDIR/report.md, report.json, logs.tar.gz: three files, as a device call brings back
at most eight) is rewritten after every phase, so a check killed half-way still leaves one.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import traceback
import xml.etree.ElementTree as ET
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Distributions that come with jax on a jax machine: never installed or replaced by the check.
NEVER_TOUCH = re.compile(r"^(jax|jaxlib|numpy|ml-dtypes|opt-einsum|scipy|libtpu.*|jax-cuda.*|nvidia-.*)$")
VERSIONS = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "grain",
    "tensorstore",
    "ml-collections",
    "numpy",
    "ml-dtypes",
    "pytest",
    "hypothesis",
)
# Imported after the install, with the repository and the wheels on the path.
IMPORT_CHECKS = (
    "flax.nnx",
    "optax",
    "orbax.checkpoint",
    "grain",
    "tensorstore",
    "ml_collections",
    "absl.flags",
    "tensorboardX",
    "rich",
    "pytest",
    "hypothesis",
    "configs.turbos",
    "pallas_kernels.mamba2",
    "pallas_kernels.moe",
    "turbos_jax.model",
    "turbos_jax.step",
    "turbos_jax.checkpointing",
    "turbos_jax.metrics",
    "turbos_jax.generation.api",
)


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def first_line(text: str | None, limit: int = 200) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""


def load_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def installed_dists() -> dict[str, md.Distribution]:
    """canonical name -> the distribution that import would see first (sys.path order)."""
    out: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name and canon(name) not in out:
            out[canon(name)] = dist
    return out


# ------------------------------------------------------------------------------------------- probe
def cmd_probe(a) -> int:
    """Versions, devices and CUDA facts as JAX sees them under the current JAX_PLATFORMS."""
    dists = installed_dists()
    site = os.path.realpath(a.site) if a.site else None
    rec: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "env": {
            k: os.environ[k]
            for k in sorted(os.environ)
            if k.startswith(("JAX_", "XLA_", "CUDA_VISIBLE", "NVIDIA_VISIBLE", "TF_CPP")) or k == "PYTHONPATH"
        },
        "versions": {},
    }
    for name in VERSIONS + tuple(n for n in dists if n.startswith(("jax-cuda", "jax-rocm"))):
        dist = dists.get(canon(name))
        if dist is not None:
            where = str(dist.locate_file(""))
            from_site = bool(site and os.path.realpath(where).startswith(site))
            rec["versions"][canon(name)] = dist.version + (" (from the wheelhouse)" if from_site else "")
    t0 = time.perf_counter()
    try:
        import jax

        devices = jax.devices()
        rec["jax_import_and_init_s"] = round(time.perf_counter() - t0, 2)
        rec["platform"] = devices[0].platform
        rec["devices"] = [{"id": d.id, "kind": d.device_kind, "platform": d.platform} for d in devices]
        try:
            stats = devices[0].memory_stats() or {}
            rec["memory_bytes_limit"] = stats.get("bytes_limit")
        except Exception:  # noqa: BLE001 - not every backend has memory stats
            pass
        try:
            from jax._src.lib import cuda_versions  # jaxlib's CUDA build facts, when it has CUDA

            if cuda_versions is not None:
                rec["cuda"] = {
                    k: getattr(cuda_versions, k)()
                    for k in (
                        "cuda_runtime_get_version",
                        "cuda_runtime_build_version",
                        "cuda_driver_get_version",
                        "cudnn_get_version",
                        "cudnn_build_version",
                    )
                    if hasattr(cuda_versions, k)
                }
        except Exception as e:  # noqa: BLE001 - private module: record what it says and go on
            rec["cuda"] = {"error": first_line(str(e))}
    except Exception as e:  # noqa: BLE001 - "no GPU" is a result, not a crash
        traceback.print_exc()
        rec["platform"] = None
        why = first_line(str(e), 400) or f"no backend for JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')}"
        rec["error"] = f"{type(e).__name__}: {why}"
    if a.gpu_attempt:  # this probe follows a failed one on the CUDA backend: keep its reason
        rec["gpu_error"] = (load_json(a.gpu_attempt, {}) or {}).get("error") or "the CUDA probe wrote nothing"
    write_json(a.out, rec)
    print(
        f"python {rec['python']}, jax {rec['versions'].get('jax', '-')}, platform {rec['platform']}, "
        f"devices {[d['kind'] for d in rec.get('devices', [])]} {rec.get('error', '')}"
    )
    return 0 if rec["platform"] else 1


# ----------------------------------------------------------------------------------------- install
def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
            from pip._vendor.packaging.version import Version
        except ImportError:
            return None, None
    return Requirement, Version


def _wheel_requires(path: str) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def _wanted(req, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras | {""}))


def plan_install(wheels: dict, installed: dict, roots: list[tuple[str, bool]]):
    """Which wheels to install: a package is taken from the wheelhouse when it is missing or its
    installed version does not satisfy a requirement of the project or of a package taken, walking
    requirements (with extras) from `roots` [(requirement, required)]. Returns (chosen, notes,
    problems); chosen maps canonical names to ("installed" | "wheel", version)."""
    Requirement, Version = _packaging()
    chosen: dict[str, tuple[str, str]] = {}
    notes, problems = [], []
    extras_done: dict[str, set[str]] = {}
    queue = [(Requirement(r), required, "pyproject.toml") for r, required in roots]
    queue = [q for q in queue if _wanted(q[0], set())]
    while queue:
        req, required, parent = queue.pop(0)
        name = canon(req.name)
        have = installed.get(name)
        if NEVER_TOUCH.match(name):
            if have is None or not req.specifier.contains(Version(have.version), prereleases=True):
                problems.append(
                    f"{name} {have.version if have else 'missing'} does not satisfy {req} (from {parent}); "
                    "left as it is (the check never replaces jax or its own dependencies)"
                )
            continue
        if name not in chosen:
            if have is not None and req.specifier.contains(Version(have.version), prereleases=True):
                chosen[name] = ("installed", have.version)
            elif name in wheels and req.specifier.contains(
                Version(wheels[name]["version"]), prereleases=True
            ):
                chosen[name] = ("wheel", wheels[name]["version"])
                why = "missing" if have is None else f"installed {have.version} does not satisfy {req}"
                notes.append(f"{name} {wheels[name]['version']} from the wheelhouse: {why} (from {parent})")
            else:
                msg = (
                    f"{req} (from {parent}): installed {have.version if have else 'nothing'}, "
                    f"wheelhouse {wheels.get(name, {}).get('version', 'nothing')}"
                )
                (problems if required else notes).append(
                    ("unsatisfied: " if required else "optional, ") + msg
                )
                continue
        elif not req.specifier.contains(Version(chosen[name][1]), prereleases=True):
            wheel = wheels.get(name)
            if (
                chosen[name][0] == "installed"
                and wheel
                and req.specifier.contains(Version(wheel["version"]), True)
            ):
                chosen[name] = ("wheel", wheel["version"])
                notes.append(
                    f"{name} {wheel['version']} from the wheelhouse: installed {have.version} "
                    f"does not satisfy {req} (from {parent})"
                )
                extras_done.pop(name, None)  # walk the wheel's own requirements
            else:
                problems.append(f"{name} {chosen[name][1]} does not satisfy {req} (from {parent})")
        extras = set(req.extras)
        if name in extras_done and extras <= extras_done[name]:
            continue
        extras_done[name] = extras_done.get(name, set()) | extras
        source, _ = chosen[name]
        requires = (
            _wheel_requires(wheels[name]["path"]) if source == "wheel" else (installed[name].requires or [])
        )
        for text in requires:
            dep = Requirement(text)
            if _wanted(dep, extras_done[name]):
                queue.append((dep, required, name))
    return chosen, notes, problems


def scan_wheelhouse(folder: str) -> dict:
    wheels = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".whl"):
            name, version = f.split("-")[:2]
            wheels[canon(name)] = {"version": version, "path": os.path.join(folder, f), "file": f}
    return wheels


def _unzip_wheel(path: str, site: str) -> None:
    """A wheel unpacked as pip would for imports: its root, and .data/purelib|platlib, in `site`."""
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = os.path.join(site, *parts)
            if info.is_dir():
                os.makedirs(target, exist_ok=True)
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as dst:
                dst.write(src.read())


def cmd_install(a) -> int:
    import tomllib

    rec: dict = {"python": sys.executable, "wheelhouse": a.wheelhouse, "site": a.site, "installed": []}
    os.makedirs(a.site, exist_ok=True)
    wheels = scan_wheelhouse(a.wheelhouse) if os.path.isdir(a.wheelhouse) else {}
    if not wheels:
        rec["notes"] = [
            f"no wheels in {a.wheelhouse}: nothing can be installed (benchmarks/gpu_wheelhouse.sh)"
        ]
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    roots = [(r, True) for r in project["dependencies"]]
    roots += [(r, False) for r in project.get("optional-dependencies", {}).get("test", [])]
    installed = installed_dists()
    if _packaging()[0] is None:  # no packaging anywhere: install what is missing, unchecked
        chosen = {n: ("wheel", w["version"]) for n, w in wheels.items() if n not in installed}
        notes, problems = ["no 'packaging' module: versions not checked, missing packages installed"], []
    else:
        try:
            chosen, notes, problems = plan_install(wheels, installed, roots)
        except Exception as e:  # noqa: BLE001 - a bad version string must not stop the check
            chosen = {n: ("wheel", w["version"]) for n, w in wheels.items() if n not in installed}
            notes = [
                f"install plan failed ({type(e).__name__}: {first_line(str(e))}): missing packages installed"
            ]
            problems = []
    rec["notes"] = rec.get("notes", []) + notes
    rec["problems"] = problems
    rec["kept"] = sorted(f"{n} {v}" for n, (s, v) in chosen.items() if s == "installed")
    paths = [wheels[n]["path"] for n, (s, _) in sorted(chosen.items()) if s == "wheel"]
    rec["installed"] = [os.path.basename(p) for p in paths]
    if paths:
        pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile"]
        pip += ["--disable-pip-version-check", "--upgrade", "--target", a.site, *paths]
        try:
            out = subprocess.run(pip, capture_output=True, text=True, timeout=600)
            rec["pip_rc"], ok = out.returncode, out.returncode == 0
            rec["pip_output_tail"] = (out.stdout + out.stderr)[-2000:]
        except (OSError, subprocess.SubprocessError) as e:
            rec["pip_rc"], ok = None, False
            rec["pip_output_tail"] = str(e)
        rec["method"] = "pip --no-index --no-deps --target"
        if not ok:  # no pip, or pip failed: a wheel is a zip file
            for p in paths:
                _unzip_wheel(p, a.site)
            rec["method"] = "unzipped (pip unavailable or failed)"
    # Import checks in a fresh interpreter with the path the phases use.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, a.site, os.environ.get("PYTHONPATH", "")]))
    env.setdefault("JAX_PLATFORMS", "cpu")  # importing needs no device
    code = (
        "import importlib, json, sys\nres = {}\nfor m in sys.argv[1:]:\n"
        "    try:\n        importlib.import_module(m); res[m] = 'ok'\n"
        "    except BaseException as e:\n        res[m] = f'{type(e).__name__}: {e}'.splitlines()[0][:200]\n"
        "print(json.dumps(res))"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", code, *IMPORT_CHECKS], capture_output=True, text=True, env=env, timeout=300
        )
        rec["imports"] = json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - the check itself failing is recorded
        rec["imports"] = {"(import check)": f"{type(e).__name__}: {first_line(str(e))}"}
    bad = {m: r for m, r in rec["imports"].items() if r != "ok"}
    write_json(a.out, rec)
    print(
        f"installed {len(paths)} wheels ({rec.get('method', 'none needed')}); kept {len(rec['kept'])}; "
        f"{len(problems)} problems; imports failing: {bad or 'none'}"
    )
    for line in problems:
        print("problem:", line)
    return 1 if problems or bad else 0


# ------------------------------------------------------------------------------------- gpu classes
def gpu_classes(tests_dir: str) -> list[str]:
    """tests/FILE.py::Class for each class that a skipif about a GPU (or CUDA) guards, or whose name
    says GPU: the classes that run only on a GPU."""
    found = []
    for f in sorted(os.listdir(tests_dir)):
        if not (f.startswith("test_") and f.endswith(".py")):
            continue
        tree = ast.parse(open(os.path.join(tests_dir, f)).read())
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            decos = [ast.unparse(d) for d in node.decorator_list]
            guarded = any("skipif" in d and re.search(r"gpu|cuda", d, re.I) for d in decos)
            if guarded or re.search(r"gpu", node.name, re.I):
                found.append(f"tests/{f}::{node.name}")
    return found


def cmd_gpu_classes(a) -> int:
    print("\n".join(gpu_classes(os.path.join(REPO, "tests"))))
    return 0


# ------------------------------------------------------------------------------------------ report
_VERBOSE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_junit(path: str) -> list[dict]:
    tests = []
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[child.tag]
                message = first_line(child.get("message") or child.text)
                break
        cls = case.get("classname", "")
        tests.append(
            {
                "id": f"{cls}::{case.get('name')}" if cls else case.get("name"),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0),
                "message": message,
            }
        )
    return tests


def parse_verbose_log(path: str) -> list[dict]:
    """Fallback when pytest died before writing its junit file: its -v lines."""
    tests, seen = [], set()
    try:
        lines = open(path, errors="replace").read().splitlines()
    except OSError:
        return tests
    for line in lines:
        m = _VERBOSE.match(line.strip())
        if m and m.group(1) not in seen:
            seen.add(m.group(1))
            tests.append({"id": m.group(1), "outcome": m.group(2).lower(), "seconds": None, "message": ""})
    return tests


def read_phases(work: str) -> list[dict]:
    phases = []
    try:
        lines = open(os.path.join(work, "phases.tsv")).read().splitlines()
    except OSError:
        return phases
    for line in lines:
        name, status, rc, seconds, limit, note = (line.split("\t") + [""] * 6)[:6]
        phases.append(
            {
                "name": name,
                "status": status,
                "rc": rc,
                "seconds": float(seconds or 0),
                "limit": limit,
                "note": note,
            }
        )
    return phases


def read_kernels(path: str) -> tuple[list[dict], list[dict]]:
    runs, rows = [], []
    try:
        lines = open(path).read().splitlines()
    except OSError:
        return runs, rows
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        (runs.append(obj["run"]) if "run" in obj else rows.append(obj))
    med = {(r["op"], r["shape"], r["impl"]): r.get("median_s") for r in rows}
    for r in rows:
        x = med.get((r["op"], r["shape"], "xla"))
        r["speedup_vs_xla"] = x / r["median_s"] if r["impl"] != "xla" and x and r.get("median_s") else None
    return runs, rows


def kernel_ops() -> list[str]:
    """benchmarks/kernels.py's OPS, read without importing it (no jax needed)."""
    tree = ast.parse(open(os.path.join(REPO, "benchmarks", "kernels.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "OPS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def _f(v, scale=1.0, fmt="{:.3g}", pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else fmt.format(v * scale)


def build_report(work: str, final: bool) -> dict:
    plan = (
        [ln for ln in open(os.path.join(work, "plan.txt")).read().split() if ln]
        if os.path.exists(os.path.join(work, "plan.txt"))
        else []
    )
    phases = read_phases(work)
    probe = load_json(os.path.join(work, "probe.json"), {}) or {}
    install = load_json(os.path.join(work, "install.json"), None)
    smi = {}
    for key, fname in (("query", "nvidia-smi-query.txt"), ("full", "nvidia-smi.txt")):
        try:
            smi[key] = open(os.path.join(work, fname), errors="replace").read().strip()
        except OSError:
            pass
    m = re.search(r"CUDA Version:\s*([\d.]+)", smi.get("full", ""))
    smi["cuda_version"] = m.group(1) if m else None
    m = re.search(r"Driver Version:\s*([\d.]+)", smi.get("full", ""))
    smi["driver_version"] = m.group(1) if m else None
    gpu = probe.get("platform") == "gpu"

    test_steps = []
    for ph in phases:
        if not ph["name"].startswith(("gpu_tests:", "model_tests")) or ph["status"] == "skipped":
            continue
        junit = os.path.join(work, f"junit-{ph['name'].replace(':', '-')}.xml")
        log = os.path.join(work, f"{ph['name'].replace(':', '-')}.log")
        tests, source = [], "junit"
        if os.path.exists(junit):
            try:
                tests = parse_junit(junit)
            except ET.ParseError:
                tests = []
        if not tests:
            tests, source = parse_verbose_log(log), "log"
        counts = {}
        for t in tests:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        test_steps.append({"step": ph["name"], "source": source, "counts": counts, "tests": tests})

    runs, rows = read_kernels(os.path.join(work, "kernels.jsonl"))
    done = {ph["name"] for ph in phases}
    pending = [p for p in plan if p not in done]

    problems = []
    for ph in phases:
        if ph["name"] == "probe" and not gpu:
            continue  # the failed CUDA probe is the "no GPU" verdict, with its reason
        if ph["status"] not in ("ok", "skipped"):
            problems.append(
                f"phase {ph['name']}: {ph['status']} (rc {ph['rc']}, {ph['seconds']:.0f} s) {ph['note']}"
            )
    if install:
        problems += [f"install: {p}" for p in install.get("problems", [])]
        problems += [f"import {m}: {r}" for m, r in (install.get("imports") or {}).items() if r != "ok"]
    if gpu:
        if plan and not any(name.startswith("gpu_tests:") for name in plan):
            problems.append("no GPU test class found in tests/ (gpu_check.py gpu-classes)")
        for st in test_steps:
            if not st["tests"]:
                problems.append(f"{st['step']}: no test ran (none selected, or pytest died first)")
            for t in st["tests"]:
                if t["outcome"] in ("failed", "error"):
                    problems.append(f"{t['id']}: {t['outcome']}: {t['message']}")
                elif t["outcome"] == "skipped" and st["step"].startswith("gpu_tests:"):
                    problems.append(f"GPU CLASS SKIPPED on a GPU: {t['id']}: {t['message']}")
        for r in rows:
            if r.get("error"):
                problems.append(f"kernels {r['op']} [{r['shape']}] {r['impl']}: {r['error']}")
        if "kernels" in done or any(p.startswith("kernels") for p in done):
            missing = sorted(set(kernel_ops()) - {r["op"] for r in rows})
            if missing:
                problems.append(f"kernels: no row for {missing}")
    smi_gpus = [ln for ln in smi.get("query", "").splitlines() if ln.strip() and "fail" not in ln.lower()]
    if probe and not gpu and smi_gpus and "not found" not in smi.get("query", ""):
        problems.insert(0, f"nvidia-smi lists {smi_gpus} but JAX sees no GPU: {probe.get('gpu_error')}")
    if not probe:
        verdict = "INCOMPLETE"
    elif not gpu:
        verdict = "FAIL" if smi_gpus and final else "NO GPU"
    elif pending and not final:
        verdict = "INCOMPLETE"
    else:
        verdict = "FAIL" if problems or pending else "PASS"
    if final and pending:
        problems.append(f"phases that never ran: {pending}")
    return {
        "verdict": verdict,
        "final": final,
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "problems": problems,
        "no_gpu_reason": None
        if gpu
        else (probe.get("gpu_error") or probe.get("error") or f"platform {probe.get('platform')}"),
        "nvidia_smi": smi,
        "probe": probe,
        "install": install,
        "phases": phases,
        "pending": pending,
        "tests": test_steps,
        "kernel_runs": runs,
        "kernels": rows,
    }


def render_md(r: dict) -> str:
    p = r["probe"]
    out = [f"# GPU check: {r['verdict']}", ""]
    if not r["final"]:
        out += ["*Written while the check was still running (or after it was killed): partial.*", ""]
    if r["verdict"] == "NO GPU":
        out += [f"No GPU visible to JAX: {r['no_gpu_reason']}", ""]
    if r["problems"]:
        out += ["## Problems", ""] + [f"- {x}" for x in r["problems"]] + [""]
    smi = r["nvidia_smi"]
    out += ["## Machine and software", "", "| what | value |", "| --- | --- |"]
    dev = p.get("devices") or []
    kinds = sorted({d["kind"] for d in dev})
    facts = [
        ("nvidia-smi", (smi.get("query") or "not available").replace("\n", "; ")),
        (
            "driver / CUDA (driver's)",
            f"{smi.get('driver_version') or '-'} / {smi.get('cuda_version') or '-'}",
        ),
        ("jax devices", f"{len(dev)} x {', '.join(kinds) or '-'} (platform {p.get('platform')})"),
        ("jaxlib CUDA", ", ".join(f"{k} {v}" for k, v in (p.get("cuda") or {}).items()) or "-"),
        ("python", f"{p.get('python', '-')} ({p.get('executable', '-')})"),
    ]
    facts += [(k, v) for k, v in (p.get("versions") or {}).items()]
    facts += [(k, v) for k, v in (p.get("env") or {}).items()]
    out += [f"| {k} | {v} |" for k, v in facts] + [""]

    out += [
        "## Phases",
        "",
        "| phase | status | rc | seconds | limit | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for ph in r["phases"]:
        cells = [ph["name"], ph["status"], ph["rc"], f"{ph['seconds']:.1f}", ph["limit"], ph["note"]]
        out.append("| " + " | ".join(cells) + " |")
    out += [f"| {name} | not run{' yet' if not r['final'] else ''} | | | | |" for name in r["pending"]]
    total = sum(ph["seconds"] for ph in r["phases"])
    out += ["", f"Total {total:.0f} s over the phases.", ""]

    inst = r["install"]
    if inst:
        out += ["## Install", ""]
        out += [f"- wheels installed into `{inst.get('site')}` ({inst.get('method', 'none needed')}): "]
        out[-1] += ", ".join(inst.get("installed") or []) or "none"
        out += [
            f"- already there and kept: {len(inst.get('kept') or [])} packages (report.json: install.kept)"
        ]
        out += [f"- {n}" for n in inst.get("notes") or []]
        bad = {m: v for m, v in (inst.get("imports") or {}).items() if v != "ok"}
        out += [
            f"- imports: {len(inst.get('imports') or {}) - len(bad)} ok"
            + (f", failing: {bad}" if bad else "")
        ]
        out += [""]

    out += ["## Tests", ""]
    for st in r["tests"]:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(st["counts"].items())) or "none"
        out += [f"### {st['step']}: {counts} (from the {st['source']})", ""]
        if st["tests"]:
            out += ["| test | outcome | s | message |", "| --- | --- | --- | --- |"]
            for t in st["tests"]:
                secs = "-" if t["seconds"] is None else f"{t['seconds']:.1f}"
                msg = t["message"].replace("|", "\\|")
                out.append(f"| {t['id']} | {t['outcome'].upper()} | {secs} | {msg} |")
        out += [""]

    out += ["## Kernels (benchmarks/kernels.py)", ""]
    for run in r["kernel_runs"]:
        out += [
            f"- {run.get('device')} ({run.get('platform')}), bf16 peak "
            f"{_f(run.get('peak_flops'), 1e-12, '{:.4g}')} TFLOP/s, "
            f"HBM {_f(run.get('hbm_bytes_per_s'), 1e-9, '{:.4g}')} GB/s, jax {run.get('jax')}, "
            f"args `{' '.join(run.get('argv') or [])}`"
        ]
    if r["kernels"]:
        out += [
            "",
            "| op | shape | impl | median ms | GB/s | % HBM | TFLOP/s | % bf16 peak | vs xla | speed-up "
            "| first s | error |",
            "|" + "---|" * 12,
        ]
        for k in r["kernels"]:
            out.append(
                "| "
                + " | ".join(
                    [
                        k["op"],
                        k["shape"],
                        k["impl"],
                        _f(k.get("median_s"), 1e3),
                        _f(k.get("bytes_per_s"), 1e-9, "{:.4g}"),
                        _f(k.get("hbm_frac"), pct=True),
                        _f(k.get("flops_per_s") or None, 1e-12, "{:.4g}"),
                        _f(k.get("peak_frac"), pct=True),
                        _f(k.get("vs_xla"), fmt="{:.1e}"),
                        _f(k.get("speedup_vs_xla"), fmt="{:.2f}x"),
                        _f(k.get("first_s")),
                        (k.get("error") or "").replace("|", "\\|"),
                    ]
                )
                + " |"
            )
    else:
        out += ["", "No kernel rows."]
    out += ["", "Raw logs, junit files and the kernels' JSON lines: logs.tar.gz.", ""]
    return "\n".join(out)


def cmd_report(a) -> int:
    rep = build_report(a.work, a.final)
    os.makedirs(a.out, exist_ok=True)
    write_json(os.path.join(a.out, "report.json"), rep)
    tmp = os.path.join(a.out, "report.md.tmp")
    with open(tmp, "w") as f:
        f.write(render_md(rep))
    os.replace(tmp, os.path.join(a.out, "report.md"))
    with tarfile.open(os.path.join(a.out, "logs.tar.gz.tmp"), "w:gz") as tar:
        for f in sorted(os.listdir(a.work)):
            path = os.path.join(a.work, f)
            if os.path.isfile(path) and not f.endswith(".tmp"):
                tar.add(path, arcname=f"gpu_check/{f}")
    os.replace(os.path.join(a.out, "logs.tar.gz.tmp"), os.path.join(a.out, "logs.tar.gz"))
    if a.final:
        print(f"verdict: {rep['verdict']}")
        for x in rep["problems"]:
            print(f"  - {x}")
    return {"PASS": 0, "NO GPU": 2}.get(rep["verdict"], 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--out", required=True)
    p.add_argument("--site", default=None, help="the wheel folder, to mark versions loaded from it")
    p.add_argument("--gpu-attempt", default=None, help="probe.json of a failed CUDA probe, for its error")
    p = sub.add_parser("install")
    p.add_argument("--wheelhouse", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--out", required=True)
    sub.add_parser("gpu-classes")
    p = sub.add_parser("report")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--final", action="store_true")
    a = ap.parse_args(argv)
    return {"probe": cmd_probe, "install": cmd_install, "gpu-classes": cmd_gpu_classes, "report": cmd_report}[
        a.cmd
    ](a)


if __name__ == "__main__":
    sys.exit(main())
