"""benchmarks/kernels.py runs on CPU with --smoke and prints its table; failing rows do not crash it.

The script runs in a subprocess (as a user runs it) with the test process's XLA flags and platform.
The full smoke run (every op, both impls, Pallas interpret mode) takes over a minute on a shared
2-core host, so it is marked slow (`-m "not slow"` leaves it out of a quick pass).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "kernels.py")
HEADER = "| op | shape | impl | median ms |"


def run_script(*flags, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def table_rows(stdout):
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(HEADER))
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2 :] if line.startswith("|")
    ]
    return {(r[0], r[2]): r for r in rows}


def test_smoke_subset_prints_table():
    out = run_script("--ops=state_update,moe_permute", timeout=300)
    assert "interpret mode" in out  # the CPU note about impl=pallas timings
    rows = table_rows(out)
    assert set(rows) == {(op, impl) for op in ("state_update", "moe_permute") for impl in ("xla", "pallas")}
    # No error and a positive median for the references and the decode kernel (the MoE kernels are
    # another engineer's: their row may carry an error while they are being wired).
    for key in [("state_update", "xla"), ("moe_permute", "xla"), ("state_update", "pallas")]:
        assert rows[key][-1] == "" and float(rows[key][3]) > 0, (key, rows[key])
    assert float(rows["state_update", "pallas"][10]) < 1e-5  # "vs xla": same result as the reference


@pytest.mark.slow
def test_smoke_all_ops_prints_table():
    from benchmarks import kernels

    rows = table_rows(run_script())
    assert set(rows) == {(op, impl) for op in kernels.OPS for impl in ("xla", "pallas")}
    for op in kernels.OPS:  # the references always run; a kernel row may carry an error instead
        assert rows[op, "xla"][-1] == "" and float(rows[op, "xla"][3]) > 0, rows[op, "xla"]


def test_failing_row_is_reported_not_raised():
    from benchmarks import kernels

    def build(impl):
        if impl == "pallas":
            raise NotImplementedError("not wired yet\nsecond line")
        return lambda: kernels.jnp.ones((4,))

    args = kernels.parse_args(["--smoke"])
    case = kernels.Case("fake", "s", flops=8.0, bytes=16.0, build=build)
    xla, pallas = kernels.time_case(case, ["xla", "pallas"], args, peak=1e12, hbm=1e9)
    assert xla.error is None and xla.median_s > 0 and xla.hbm_frac == pytest.approx(16 / xla.median_s / 1e9)
    assert pallas.error == "NotImplementedError: not wired yet" and pallas.median_s is None
    table = kernels.format_table([xla, pallas])
    assert "NotImplementedError: not wired yet" in table and table.startswith(HEADER)


def test_device_rooflines():
    from benchmarks import kernels

    class Dev:
        def __init__(self, kind):
            self.device_kind = kind

    assert kernels.device_roofline(Dev("NVIDIA H100 80GB HBM3"))[1:] == (989e12, 3.35e12)
    assert kernels.device_roofline(Dev("NVIDIA H200"))[1:] == (989e12, 4.8e12)
    assert kernels.device_roofline(Dev("TPU v5p"))[1:] == (459e12, 2.76e12)
    assert kernels.device_roofline(Dev("TPU v6 lite"))[1:] == (918e12, 1.64e12)
    assert kernels.device_roofline(Dev("cpu"))[1:] == (None, None)


def test_decode_throughput_smoke_prints_both_tables():
    """benchmarks/decode_throughput.py --smoke: the step-time tables against context (a) and
    against max_len (b), the latter with XLA's bytes accessed, which does not depend on max_len
    once the block size is the same (a decode step reads only the filled blocks)."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    script = os.path.join(ROOT, "benchmarks", "decode_throughput.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    rows = lambda header: [
        [c.strip() for c in line.strip("|").split("|")]
        for line in lines[next(i for i, line in enumerate(lines) if line.startswith(header)) + 2 :]
        if line.startswith("|")
    ][:2]
    by_context = rows("| context T (max_len 1,024)")
    by_max_len = rows("| max_len (context 32)")
    assert [r[0] for r in by_context] == ["32", "1,020"] and all(float(r[3]) > 0 for r in by_context)
    assert [r[0] for r in by_max_len] == ["1,024", "4,096"] and all(float(r[3]) > 0 for r in by_max_len)
    assert by_max_len[0][4] == by_max_len[1][4]  # compiled bytes accessed, max_len 1024 vs 4096


@pytest.mark.parametrize("impls", ["jax", "jax,torch"])
def test_rollout_throughput_smoke(impls):
    """benchmarks/rollout_throughput.py at toy shapes: a row per implementation with positive
    tokens/s, and with both the ratio line the issue asks for as the last line. PyTorch's side
    needs torch + transformers (not CI dependencies)."""
    if "torch" in impls:
        pytest.importorskip("transformers", reason="the PyTorch side needs transformers (not in CI)")
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    script = os.path.join(ROOT, "benchmarks", "rollout_throughput.py")
    flags = ["--config=configs/tiny.py", "--batch=4", "--group=2", "--prompt_len=4", "--new_tokens=3"]
    proc = subprocess.run(
        [sys.executable, script, *flags, "--repeats=1", f"--impls={impls}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [
        line.split("|")
        for line in proc.stdout.splitlines()
        if line.startswith("| turbos-jax") or line.startswith("| PyTorch")
    ]
    assert len(rows) == len(impls.split(",")) and all(float(r[5].replace(",", "")) > 0 for r in rows)
    if "torch" in impls:
        assert re.fullmatch(r"turbos-jax / PyTorch: \d+\.\d\dx", proc.stdout.strip().splitlines()[-1])


def test_decode_step_profile_smoke():
    """benchmarks/decode_step_profile.py --smoke (tiny config, batch 4): every row of its table
    with a number, the layer kinds of the tiny layout among them, and the HLO copy line."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    script = os.path.join(ROOT, "benchmarks", "decode_step_profile.py")
    proc = subprocess.run(
        [sys.executable, script, "--smoke"], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [r for r in proc.stdout.splitlines() if r.startswith("| ") and not r.startswith("| ---")]
    rows = {r.split("|")[1].strip(): r.split("|")[2] for r in lines[1:]}  # after the header
    assert len(rows) == 8 and all(float(v) == float(v) for v in rows.values())  # numbers, not NaN
    assert {k.split()[0] for k in rows if "layers (x" in k} == {"A", "M", "F"}
    assert re.search(r"CPU loop body HLO: \d+ copy ops", proc.stdout)
