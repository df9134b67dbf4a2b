"""The matmul floor of a training step: how fast the step could be if only its dots took time.

    python benchmarks/matmul_floor.py --config=configs/tiny.py
    python benchmarks/matmul_floor.py --config=configs/tiny.py --config.batch_size=4 --json

Answers "how much faster can this step get on this machine without changing the work?". On the
2-core CPU it explains why the tiny config's step cannot reach a given target (benchmarks/RESULTS.md).

Algorithm:
  1. In a child process, build the trainer's own step (`turbos_jax.step.make_train_step`, the
     config's mesh on the local devices) and compile it into a temporary persistent cache (a
     compile fragments the host heap, which slows later matmuls: benchmarks/RESULTS.md).
  2. Read every dot in the optimised HLO, inside fusions too: operand shapes, dtypes, contracting and
     batch dims, and the function of this repository that produced it (from the HLO's stack frames,
     innermost frame under turbos_jax/ or pallas_kernels/).
  3. Time each distinct dot alone: `jax.jit` of one `lax.dot_general` on random operands, median of
     `--windows` windows of `--iters` calls; multiply by how many times the step runs it.
  4. Load the step from that cache, time it on a random batch (median of windows, like
     train_step_throughput.py), and print the dots grouped by source function, their sum and the
     step.

The sum is optimistic, so a lower bound for the step: every dot runs alone with both cores and a
warm cache, in row-major layouts (dots whose operands XLA laid out otherwise are counted in the
report). Dots inside a while loop (a scanned layer stack, a scan over microbatches, the SSD scan's
chunk loop) count once per iteration, by XLA's known trip count; the report says how many loops had
none (their dots are counted once per loop).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # config files import `configs.turbos`

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from turbos_jax import cli  # noqa: E402  (cli.run: the trainer's host allocator setting on CPU)

RESULT_TAG = "@@dots "


def _define_flags() -> None:
    """The script's absl flags, defined only when it runs as a script: tests import the HLO reader
    into a process where the trainer has defined --config already."""
    global _CONFIG, _ITERS, _WINDOWS, _JSON, _WORKER
    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Training config file (default: configs/tiny.py).", lock_config=True
    )
    _ITERS = flags.DEFINE_integer("iters", 30, "Calls per timing window (each dot; the step / 5).")
    _WINDOWS = flags.DEFINE_integer("windows", 5, "Timing windows; the median is reported.")
    _JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    _WORKER = flags.DEFINE_bool("worker", False, "Internal: compile the step, print its dots.")


# HLO element types -> numpy dtype names, for the operands of a timed dot.
HLO_DTYPES = {
    "f32": "float32",
    "bf16": "bfloat16",
    "f16": "float16",
    "f64": "float64",
    "s8": "int8",
    "u8": "uint8",
    "s32": "int32",
}
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\](?:\{([\d,]*)\})?\S* (\w[\w\-]*)\(")
_DOT_OPERANDS = re.compile(r" dot\(%([\w.\-]+), %([\w.\-]+)\)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")


class FloorError(RuntimeError):
    """The worker process could not compile the step (reported in one line)."""


class Dot(NamedTuple):
    """One distinct dot of a program: operand (dtype, shape) pairs, dimension numbers, source."""

    lhs: tuple[str, tuple[int, ...]]
    rhs: tuple[str, tuple[int, ...]]
    contracting: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]]
    source: str

    @property
    def flops(self) -> int:
        """2 * (lhs elements) * (rhs free elements)."""
        (_, ls), (_, rs) = self.lhs, self.rhs
        rhs_free = math.prod(
            d for i, d in enumerate(rs) if i not in self.contracting[1] and i not in self.batch[1]
        )
        return 2 * math.prod(ls) * rhs_free


def _dims(text: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", text)
    return tuple(int(v) for v in m.group(1).split(",") if v) if m else ()


def _stack_sources(hlo: str) -> dict[int, str]:
    """stack_frame_id -> "path:function" of the innermost frame in this repository's packages."""
    files, funcs, locs, frames, section = {}, {}, {}, {}, None
    for line in hlo.splitlines():
        s = line.strip()
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        if section is None or not s or not s[0].isdigit():
            section = None if not s else section
            continue
        idx = int(s.split()[0])
        fields = dict(re.findall(r"(\w+)=(\d+)", s))
        if section == "FileNames":
            files[idx] = s.split(" ", 1)[1].strip('"')
        elif section == "FunctionNames":
            funcs[idx] = s.split(" ", 1)[1].strip('"')
        elif section == "FileLocations":
            locs[idx] = (files[int(fields["file_name_id"])], funcs[int(fields["function_name_id"])])
        else:
            frames[idx] = (int(fields["file_location_id"]), int(fields["parent_frame_id"]))

    def source(frame: int) -> str:
        seen = set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            path, func = locs[frames[frame][0]]
            rel = os.path.relpath(path, REPO) if os.path.isabs(path) else path
            if rel.startswith(("turbos_jax", "pallas_kernels")):
                return f"{rel}:{func}"
            frame = frames[frame][1]
        return "other"

    return {f: source(f) for f in frames}


def hlo_dots(hlo: str) -> tuple[collections.Counter, int, int]:
    """Optimised HLO text -> (Counter of `Dot` -> executions per step, dots with non-row-major
    operands, while loops without a known trip count).

    A dot inside a while loop's body counts once per iteration (XLA's `known_trip_count`; once when
    the count is unknown), inside a fusion or call as often as its caller runs.
    """
    sources = _stack_sources(hlo)
    per_comp: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    callees: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    entry, comp, odd_layouts, unknown_loops = None, None, 0, 0
    shapes: dict[str, tuple[str, tuple[int, ...], str | None]] = {}
    for line in hlo.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            comp, shapes = head.group(1), {}  # instruction names are local to a computation
            entry = comp if line.startswith("ENTRY") else entry
            continue
        for kind, callee in re.findall(r"\b(calls|to_apply|body)=%([\w.\-]+)", line):
            trips = 1
            if kind == "body":
                n = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                trips = int(n.group(1)) if n else 1
                unknown_loops += n is None
            callees[comp].append((callee, trips))
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, layout, _ = m.groups()
        shapes[name] = (dtype, tuple(int(v) for v in dims.split(",") if v), layout)
        ops = _DOT_OPERANDS.search(line)
        if not ops:
            continue
        lhs, rhs = shapes[ops.group(1)], shapes[ops.group(2)]
        if any(
            lay and [int(v) for v in lay.split(",")] != list(range(len(s) - 1, -1, -1))
            for _, s, lay in (lhs, rhs)
        ):
            odd_layouts += 1
        frame = re.search(r"stack_frame_id=(\d+)", line)
        source = sources.get(int(frame.group(1)), "other") if frame else "other"
        per_comp[comp][
            Dot(
                lhs[:2],
                rhs[:2],
                (_dims(line, "lhs_contracting_dims"), _dims(line, "rhs_contracting_dims")),
                (_dims(line, "lhs_batch_dims"), _dims(line, "rhs_batch_dims")),
                source,
            )
        ] += 1

    runs: collections.Counter = collections.Counter()  # computation -> executions per step

    def visit(c: str, times: int) -> None:  # the call graph is acyclic
        runs[c] += times
        for callee, trips in callees.get(c, ()):
            visit(callee, times * trips)

    visit(entry, 1)
    dots: collections.Counter = collections.Counter()
    for c, counter in per_comp.items():
        for dot, n in counter.items():
            dots[dot] += n * runs[c]
    return dots, odd_layouts, unknown_loops


def _median_ms(fn, iters: int, windows: int) -> float:
    import jax

    jax.block_until_ready(fn())
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters * 1e3)
    return statistics.median(times)


def time_dot(dot: Dot, iters: int, windows: int) -> float:
    """Median ms of this dot alone on the default device, on random operands of its dtypes."""
    import jax
    import jax.numpy as jnp

    def operand(key, hlo_dtype: str, shape):
        if hlo_dtype not in HLO_DTYPES:
            raise FloorError(
                f"a dot of the step has operands of HLO type {hlo_dtype}, which this "
                f"script does not time (known: {', '.join(HLO_DTYPES)})"
            )
        return (jax.random.normal(key, shape, jnp.float32) * 8).astype(HLO_DTYPES[hlo_dtype])

    key_l, key_r = jax.random.split(jax.random.key(0))
    a, b = operand(key_l, *dot.lhs), operand(key_r, *dot.rhs)
    f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (dot.contracting, dot.batch)))
    return _median_ms(lambda: f(a, b), iters, windows)


def compile_train_step(config):
    """The trainer's step for `config` on the local devices -> (compiled, run-one-step callable)."""
    import jax

    from turbos_jax import sharding
    from turbos_jax.config import ModelConfig, check_train_config
    from turbos_jax.step import build_train_program, synthetic_batch

    model_cfg = ModelConfig.from_config(config.model)
    check_train_config(config)
    mesh = sharding.train_mesh(config, model_cfg)
    program = build_train_program(config, model_cfg, mesh)
    batch = synthetic_batch(config, model_cfg.vocab_size, program.batch_sharding)
    with jax.set_mesh(mesh):
        state = {"s": jax.jit(program.setup.init_state, out_shardings=program.state_shardings)()}
        compiled = program.train_step.lower(state["s"], batch).compile()

    def run():
        state["s"], metrics = compiled(state["s"], batch)
        return metrics["loss"]

    return compiled, run


def _step_dots(config) -> dict:
    """Worker: compile the step (this writes the persistent cache) -> its dots, for the parent."""
    compiled, _ = compile_train_step(config)
    dots, odd_layouts, unknown_loops = hlo_dots(compiled.as_text())
    return {
        "odd_layouts": odd_layouts,
        "unknown_loops": unknown_loops,
        "dots": [[d.lhs, d.rhs, d.contracting, d.batch, d.source, n] for d, n in dots.items()],
    }


def _as_tuples(v):
    return tuple(_as_tuples(x) for x in v) if isinstance(v, list) else v


def analyse(config, iters: int, windows: int) -> dict:
    """Steps 1-4 of the module doc. The step is compiled in a child process: a compile leaves this
    process's heap fragmented, which slows oneDNN's matmuls afterwards (benchmarks/RESULTS.md,
    "Compilation cache"); the parent times the dots, then the step loaded from the cache the child
    wrote, both on a clean heap."""
    import jax

    from turbos_jax.config import ModelConfig, check_train_config

    ModelConfig.from_config(config.model)  # config mistakes: one line here, not in the worker
    check_train_config(config)
    with tempfile.TemporaryDirectory(prefix="matmul_floor_cache_") as cache:
        env = {
            **os.environ,
            "JAX_COMPILATION_CACHE_DIR": cache,
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        }
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker"],
            env=env,
            capture_output=True,
            text=True,
        )
        found = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
        if proc.returncode or not found:
            raise FloorError(
                "compiling the step failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
            )
        worker = json.loads(found[0][len(RESULT_TAG) :])
        dots = {Dot(*_as_tuples(d[:5])): d[5] for d in worker["dots"]}
        rows = [
            {
                "source": d.source,
                "lhs": list(d.lhs[1]),
                "rhs": list(d.rhs[1]),
                "dtype": d.lhs[0],
                "contracting": [list(c) for c in d.contracting],
                "batch": [list(c) for c in d.batch],
                "count": n,
                "gflop": d.flops * n / 1e9,
                "ms_each": time_dot(d, iters, windows),
            }
            for d, n in dots.items()
        ]

        hits = []
        listener = lambda event, **_: hits.append(event == "/jax/compilation_cache/cache_hits")
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.monitoring.register_event_listener(listener)
        _, run = compile_train_step(config)
        jax.monitoring.unregister_event_listener(listener)
        step_ms = _median_ms(run, max(1, iters // 5), windows)
    floor = sum(r["ms_each"] * r["count"] for r in rows)
    return {
        "batch_size": config.batch_size,
        "seq_len": config.seq_len,
        "step_ms": step_ms,
        "step_from_cache": any(hits),
        "dots": sum(dots.values()),
        "distinct_dots": len(dots),
        "dots_with_non_row_major_operands": worker["odd_layouts"],
        "loops_without_trip_count": worker["unknown_loops"],
        "matmul_floor_ms": floor,
        "matmul_gflop": sum(r["gflop"] for r in rows),
        "rows": rows,
    }


def format_report(r: dict) -> str:
    by_source = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for row in r["rows"]:
        agg = by_source[row["source"]]
        agg[0] += row["count"]
        agg[1] += row["gflop"]
        agg[2] += row["ms_each"] * row["count"]
    head = ("source (innermost function)", "dots", "GFLOP", "floor ms", "GFLOP/s")
    body = [
        (src, str(n), f"{g:.3f}", f"{ms:.2f}", f"{g / ms * 1e3:.1f}")
        for src, (n, g, ms) in sorted(by_source.items(), key=lambda kv: -kv[1][2])
    ]
    body.append(
        (
            "all dots",
            str(r["dots"]),
            f"{r['matmul_gflop']:.3f}",
            f"{r['matmul_floor_ms']:.2f}",
            f"{r['matmul_gflop'] / r['matmul_floor_ms'] * 1e3:.1f}",
        )
    )
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"
    tokens = r["batch_size"] * r["seq_len"]
    return "\n".join(
        [
            f"batch {r['batch_size']} x seq_len {r['seq_len']} = {tokens} tokens/step; "
            f"{r['dots']} dots ({r['distinct_dots']} distinct), each timed alone",
            line(head),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *map(line, body),
            f"measured step ({'loaded from' if r['step_from_cache'] else 'NOT from'} the compile "
            f"cache): {r['step_ms']:.1f} ms ({tokens / r['step_ms'] * 1e3:,.0f} tokens/s); "
            f"dots alone: {r['matmul_floor_ms']:.1f} ms = {r['matmul_floor_ms'] / r['step_ms']:.0%} "
            f"of it (a step made only of its dots: {tokens / r['matmul_floor_ms'] * 1e3:,.0f} tokens/s)",
            f"{r['dots_with_non_row_major_operands']} dots have operands XLA laid out other than "
            f"row-major (timed row-major); {r['loops_without_trip_count']} while loops without a "
            "known trip count (their dots counted once per loop)",
        ]
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKER.value:
        print(RESULT_TAG + json.dumps(_step_dots(cli.config_or_tiny(_CONFIG.value))), flush=True)
        return
    report = analyse(cli.config_or_tiny(_CONFIG.value), _ITERS.value, _WINDOWS.value)
    print(json.dumps(report, indent=1) if _JSON.value else format_report(report))


if __name__ == "__main__":
    _define_flags()
    cli.run(main, FloorError)
