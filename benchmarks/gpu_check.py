"""Helper of benchmarks/gpu_check.sh: probe the machine, install missing wheels, find the GPU test
classes, and write the report (`gpu_report.py`). Standard library only (packaging where the
interpreter has it), so it runs before anything is installed and when jax itself is broken.

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
import time
import traceback
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
    if a.cmd == "report":
        from gpu_report import cmd_report  # the report half; it imports this module's helpers

        return cmd_report(a)
    return {"probe": cmd_probe, "install": cmd_install, "gpu-classes": cmd_gpu_classes}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
