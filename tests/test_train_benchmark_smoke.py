"""benchmarks/train_step_throughput.py end to end on tiny shapes (turbos-jax only, --json).

Checks what the table is built from, not timings: both turbos-jax rows are produced, the second
really loads the step the first compiled (same program, so the same loss after the same steps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT, subprocess_env

SCRIPT = os.path.join(ROOT, "benchmarks", "train_step_throughput.py")


def test_jax_rows_compiled_then_from_cache():
    env = subprocess_env(share_cache=False, fast_compile=True, JAX_PLATFORMS="cpu")  # its own cache
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--impls=jax",
            "--warmup=1",
            "--steps=2",
            "--windows=1",
            "--batch_size=2",
            "--seq_len=32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    rows = {r["jax_variant"]: r for r in report["results"]}
    assert set(rows) == {"compiled", "cached"}
    compiled, cached = rows["compiled"], rows["cached"]
    assert "compiled in this process" in compiled["detail"]
    assert "loaded from the persistent compilation cache" in cached["detail"]
    assert compiled["step_compile_cache"] == {"hits": 0, "misses": 1}
    assert cached["step_compile_cache"] == {"hits": 1, "misses": 0}
    assert compiled["final_loss"] == cached["final_loss"]  # the same program ran
    assert report["tokens_per_step"] == 64
    for r in (compiled, cached):
        assert r["tokens_per_s"] > 0 and r["host_malloc"] in ("keep", "system")
