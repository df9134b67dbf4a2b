"""benchmarks/matmul_floor.py: the HLO dot reader on programs with known matmuls, and the script end
to end on small shapes (what the report is built from, not timings). Also the one-line errors of
both benchmark scripts that take a training config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import ROOT, subprocess_env

from benchmarks import matmul_floor
from turbos_jax.layers import moe

SCRIPT = os.path.join(ROOT, "benchmarks", "matmul_floor.py")


def _dots(fn, *args):
    return matmul_floor.hlo_dots(jax.jit(fn).lower(*args).compile().as_text())


def test_reads_chained_matmuls_with_shapes_dims_and_flops():
    a, b, c = jnp.ones((16, 8)), jnp.ones((8, 4)), jnp.ones((4, 2))
    dots, odd, unknown_loops = _dots(lambda a, b, c: jnp.tanh(a @ b) @ c, a, b, c)
    assert odd == 0 and unknown_loops == 0
    got = {(d.lhs, d.rhs, d.contracting, d.batch): n for d, n in dots.items()}
    assert got == {
        (("f32", (16, 8)), ("f32", (8, 4)), ((1,), (0,)), ((), ())): 1,
        (("f32", (16, 4)), ("f32", (4, 2)), ((1,), (0,)), ((), ())): 1,
    }
    assert sorted(d.flops for d in dots) == [2 * 16 * 4 * 2, 2 * 16 * 8 * 4]


def test_batched_expert_dots_are_attributed_to_their_function():
    e, g, c, d, f = 4, 2, 8, 16, 32
    xe = jax.random.normal(jax.random.key(0), (e, g, c, d))
    wg, wu, wo = jnp.ones((e, d, f)), jnp.ones((e, d, f)), jnp.ones((e, f, d))
    dots, _, _ = _dots(moe._capacity_experts, xe, wg, wu, wo)
    assert sum(dots.values()) == 3
    assert {dot.source for dot in dots} == {"turbos_jax/layers/moe.py:_capacity_experts"}
    assert sum(dot.flops * n for dot, n in dots.items()) == 3 * 2 * e * g * c * d * f
    for dot in dots:  # one batch dim (the experts), one contracting dim
        assert len(dot.batch[0]) == 1 and len(dot.contracting[0]) == 1
        assert dot.lhs[1][dot.batch[0][0]] == e


def test_dots_in_loops_count_once_per_iteration():
    w, x = jnp.ones((8, 8)), jnp.ones((4, 8))

    def scanned(w, x):  # 5 iterations, one dot each, then one more outside
        y, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ w), None), x, None, length=5)
        return y @ w.T

    dots, _, unknown_loops = _dots(scanned, w, x)
    assert sum(dots.values()) == 6 and unknown_loops == 0

    def dynamic(w, x, n):  # trip count only known at run time: counted once, and reported
        return jax.lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]

    dots, _, unknown_loops = _dots(dynamic, w, x, 3)
    assert sum(dots.values()) == 1 and unknown_loops == 1


@pytest.mark.parametrize("dtype", ["f32", "bf16", "s8"])
def test_time_dot_runs_the_dot_it_describes(dtype):
    dot = matmul_floor.Dot((dtype, (32, 16)), (dtype, (16, 8)), ((1,), (0,)), ((), ()), "x")
    assert matmul_floor.time_dot(dot, iters=2, windows=1) > 0
    assert dot.flops == 2 * 32 * 16 * 8


def test_time_dot_names_an_operand_type_it_cannot_time():
    dot = matmul_floor.Dot(("c64", (4, 4)), ("c64", (4, 4)), ((1,), (0,)), ((), ()), "x")
    with pytest.raises(matmul_floor.FloorError, match="c64"):
        matmul_floor.time_dot(dot, iters=1, windows=1)


def _env():  # the script manages its own compilation cache
    return subprocess_env(share_cache=False, fast_compile=True, JAX_PLATFORMS="cpu")


def test_script_reports_dots_and_step_on_small_shapes():
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--config=configs/tiny.py",
            "--config.batch_size=2",
            "--config.seq_len=32",
            "--iters=2",
            "--windows=1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["step_from_cache"]  # the parent loaded the step the worker compiled
    assert (r["batch_size"], r["seq_len"]) == (2, 32)
    assert r["dots"] == sum(row["count"] for row in r["rows"]) > 0
    assert math.isclose(r["matmul_floor_ms"], sum(x["ms_each"] * x["count"] for x in r["rows"]))
    assert "turbos_jax/layers/moe.py:_capacity_experts" in {row["source"] for row in r["rows"]}
    assert r["step_ms"] > 0 and r["matmul_floor_ms"] > 0


@pytest.mark.parametrize("script", ["matmul_floor.py", "train_step_throughput.py"])
@pytest.mark.parametrize(
    "flags, culprit",
    [
        (["--config=configs/tiny.py", "--config.no_such_key=1"], "no_such_key"),
        (["--config=configs/tiny.py", "--config.model.num_heads=3"], "num_heads"),
        (["--config.batch_size=2"], "config.batch_size"),  # an override needs --config=FILE first
    ],
)
def test_bad_config_is_one_line_error(script, flags, culprit):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", script), *flags, "--impls=jax"]
        if script.startswith("train")
        else [sys.executable, os.path.join(ROOT, "benchmarks", script), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=_env(),
    )
    assert proc.returncode != 0
    first = next(ln for ln in proc.stderr.splitlines() if ln.startswith(("error: ", "FATAL ")))
    assert culprit in first, proc.stderr[-2000:]
