"""Report half of benchmarks/gpu_check.sh: the phases' logs, junit files and kernel rows in the
work folder -> OUTDIR/report.md, report.json and logs.tar.gz, with a verdict (PASS / FAIL / NO GPU).
Standard library only, like gpu_check.py (which calls `cmd_report` for `gpu_check.py report`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import tarfile
import time
import xml.etree.ElementTree as ET

from gpu_check import REPO, first_line, load_json, write_json

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
