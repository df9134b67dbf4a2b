"""Kernel micro-benchmarks: every Pallas op against its XLA reference on the current device.

    python benchmarks/kernels.py                      # TurboS shapes, all ops, impl xla and pallas
    python benchmarks/kernels.py --seq_lens=4096 --ops=chunk_scan_fwd,state_update
    python benchmarks/kernels.py --smoke              # tiny shapes, runs anywhere (CPU: seconds)
    python benchmarks/kernels.py --json               # one JSON object per row instead of a table
    python benchmarks/kernels.py --out=rows.jsonl     # also append each row to a file as it finishes

Ops and shapes (sizes from configs/turbos.py unless a flag overrides them):
  chunk_scan_fwd       `pallas_kernels.mamba2.chunk_scan` forward, x (b, L, h, p), B/C (b, L, g, n),
                       h=64, p=64, g=16, n=128, chunk Q=128, dt_bias + softplus, no D/z/final state.
  chunk_scan_fwd_bwd   the same op's forward + backward (jax.vjp, cotangent of y) w.r.t. x, dt, A,
                       B, C: what a training step runs per Mamba2 layer.
  state_update         `pallas_kernels.mamba2.state_update`, one decode token (D, z, dt_bias,
                       softplus as the layer calls it), batch --decode_batch. A decode step takes
                       microseconds, less than the host needs to dispatch a call, so the timed call
                       is a jitted `fori_loop` of --decode_steps steps feeding the fp32 state back
                       (updated in place, as the decode loop does); times are per step.
  moe_permute          `pallas_kernels.moe.permute`, (T, d) -> (T*k, d), T = --tokens, random top-k
                       routing over E experts (distinct experts per token).
  moe_gmm_up/down      `pallas_kernels.moe.grouped_matmul`, (T*k, d) x (E, d, f) -> (T*k, f) (up and
                       gate projections) and (T*k, f) x (E, f, d) -> (T*k, d) (down), f = expert_dim.
  moe_unpermute        `pallas_kernels.moe.unpermute`, (T*k, d) -> (T, d), gate-weighted.

Timing: per (op, shape, impl) one jitted function; the first call (compile + run) is reported as
"first s"; then --warmup untimed calls and --windows windows of --steps back-to-back calls, blocked
with `jax.block_until_ready` at the end of each window; the reported time is the median window's
time per call (min and max windows too). "vs xla" is max|out - out_xla| / max|out_xla| over the
outputs (gradients for fwd_bwd), a check that both ran the same op. impl="pallas" on CPU runs the
kernels in Pallas interpret mode: those timings are meaningless (a note is printed). Errors of one
row (an op not wired yet, a kernel that does not compile, out of memory) are printed in that row.

Rooflines: achieved bytes/s = minimal bytes / time, against the device's HBM bandwidth; achieved
FLOP/s = FLOPs / time, against the dense bf16 peak (`turbos_jax.metrics.PEAK_FLOPS`). Minimal bytes
count each input read once and each output written once (es = element size of --dtype, fp32 = 4):
  chunk_scan_fwd       bytes = b L (2 h p es [x, y] + 2 g n es [B, C] + h es [dt])
                       FLOPs = 2 b L (Q g n [C B^T per group] + Q h p [scores @ x] + 2 h p n
                               [chunk states and state outputs]); exps and elementwise not counted.
  chunk_scan_fwd_bwd   bytes = forward + b L (3 h p es [x, dy read, dx] + 4 g n es [B, C read, dB,
                       dC written] + 2 h es [dt, ddt]); FLOPs = 3 x forward (every matmul of the
                       forward has two in the backward; a recomputed forward is not counted).
  state_update         bytes = 2 b h p n 4 [fp32 state read + written] + 3 b h p es [x, z, y]
                       + 2 b g n es [B, C] + b h es [dt]; FLOPs = 5 b h p n (decay, dt x B, y = C).
  moe_permute          bytes = T d es [x read once] + T k d es [rows written] + 4 T k [order].
  moe_gmm (K -> N)     bytes = (M K + E K N + M N) es with M = T k; FLOPs = 2 M K N.
  moe_unpermute        bytes = T k d es [rows] + T d es [out] + 8 T k [order, fp32 gates];
                       FLOPs = 2 T k d.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

F32 = jnp.float32
# HBM bandwidth (bytes/s) of one JAX device, vendors' spec sheets: H100 SXM 3.35 TB/s, H100 PCIe
# 2.0 TB/s, H200 4.8 TB/s (NVIDIA datasheets); TPU v4 1.2 TB/s, v5e 819 GB/s, v5p 2.76 TB/s, v6e
# 1.64 TB/s (cloud.google.com/tpu/docs/<version>). Keys are turbos_jax.metrics.PEAK_FLOPS's.
HBM_BYTES_PER_S = {
    "tpu_v4": 1.2e12,
    "tpu_v5e": 8.1e11,
    "tpu_v5p": 2.76e12,
    "tpu_v6e": 1.64e12,
    "h100_sxm": 3.35e12,
    "h100_pcie": 2.0e12,
    "h200": 4.8e12,
}
OPS = (
    "chunk_scan_fwd",
    "chunk_scan_fwd_bwd",
    "state_update",
    "moe_permute",
    "moe_gmm_up",
    "moe_gmm_down",
    "moe_unpermute",
)
SMOKE = dict(
    seq_lens=[64],
    batch=1,
    mamba_heads=4,
    mamba_head_dim=16,
    mamba_groups=2,
    mamba_d_state=16,
    mamba_chunk=16,
    decode_batch=2,
    tokens=64,
    d_model=64,
    expert_dim=128,
    num_experts=4,
    top_k=2,
    warmup=1,
    steps=2,
    windows=2,
    decode_steps=2,
)


# ------------------------------------------------------------------------------------------ device
def device_roofline(device) -> tuple[str, float | None, float | None]:
    """(device kind, dense bf16 peak FLOP/s, HBM bytes/s); None where the kind is not in the tables."""
    from turbos_jax import metrics

    kind = " ".join(str(device.device_kind).lower().split())
    for pattern, key in metrics._DEVICE_KIND_PATTERNS:  # the same kind -> key mapping as MFU
        if re.search(pattern, kind):
            return device.device_kind, metrics.PEAK_FLOPS[key], HBM_BYTES_PER_S.get(key)
    return device.device_kind, None, None


# ------------------------------------------------------------------------------------------- cases
@dataclasses.dataclass
class Case:
    op: str
    shape: str
    flops: float
    bytes: float
    build: object  # impl -> step(): runs one timed call, returns its output
    calls_per_step: int = 1  # ops timed per step() call (state_update's in-jit loop)


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    impl: str
    median_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    first_s: float | None = None
    bytes_per_s: float | None = None
    flops_per_s: float | None = None
    hbm_frac: float | None = None
    peak_frac: float | None = None
    vs_xla: float | None = None
    error: str | None = None


def _keys(n):
    return iter(jax.random.split(jax.random.key(0), n))


def mamba_cases(a) -> list[Case]:
    from pallas_kernels import mamba2

    h, p, g, n, q = a.mamba_heads, a.mamba_head_dim, a.mamba_groups, a.mamba_d_state, a.mamba_chunk
    dtype = jnp.dtype(a.dtype)
    es = dtype.itemsize
    cases = []

    @functools.partial(jax.jit, static_argnums=(0, 1))
    def scan_inputs(b, L):
        ks = _keys(7)
        x = jax.random.normal(next(ks), (b, L, h, p), dtype)
        dt = jax.random.normal(next(ks), (b, L, h), dtype)
        A = -jnp.exp(jax.random.uniform(next(ks), (h,), F32, 0.0, 2.0))
        B = jax.random.normal(next(ks), (b, L, g, n), dtype)
        C = jax.random.normal(next(ks), (b, L, g, n), dtype)
        dt_bias = jax.random.uniform(next(ks), (h,), F32, -4.0, -1.0)
        dy = jax.random.normal(next(ks), (b, L, h, p), dtype)
        return x, dt, A, B, C, dt_bias, dy

    def scan(impl, x, dt, A, B, C, dt_bias):
        return mamba2.chunk_scan(x, dt, A, B, C, q, dt_bias=dt_bias, dt_softplus=True, impl=impl)

    for L in a.seq_lens:
        b = a.batch
        shape = f"b{b} L{L} h{h} p{p} g{g} n{n} Q{q}"
        fwd_flops = 2 * b * L * (q * g * n + q * h * p + 2 * h * p * n)
        fwd_bytes = b * L * (2 * h * p * es + 2 * g * n * es + h * es)
        bwd_bytes = b * L * (3 * h * p * es + 4 * g * n * es + 2 * h * es)

        def build_fwd(impl, b=b, L=L):
            x, dt, A, B, C, dt_bias, _ = scan_inputs(b, L)
            f = jax.jit(functools.partial(scan, impl))
            return lambda: f(x, dt, A, B, C, dt_bias)

        def build_fwd_bwd(impl, b=b, L=L):
            x, dt, A, B, C, dt_bias, dy = scan_inputs(b, L)

            @jax.jit
            def f(x, dt, A, B, C, dt_bias, dy):
                _, vjp = jax.vjp(lambda *t: scan(impl, *t, dt_bias), x, dt, A, B, C)
                return vjp(dy)

            return lambda: f(x, dt, A, B, C, dt_bias, dy)

        if "chunk_scan_fwd" in a.ops:
            cases.append(Case("chunk_scan_fwd", shape, fwd_flops, fwd_bytes, build_fwd))
        if "chunk_scan_fwd_bwd" in a.ops:
            cases.append(
                Case("chunk_scan_fwd_bwd", shape, 3 * fwd_flops, fwd_bytes + bwd_bytes, build_fwd_bwd)
            )

    if "state_update" in a.ops:
        b, steps = a.decode_batch, a.decode_steps

        def build_decode(impl):
            ks = _keys(9)
            state = jax.random.normal(next(ks), (b, h, p, n), F32)
            x = jax.random.normal(next(ks), (b, h, p), dtype)
            z = jax.random.normal(next(ks), (b, h, p), dtype)
            dt = jax.random.normal(next(ks), (b, h), dtype)
            A = -jnp.exp(jax.random.uniform(next(ks), (h,), F32, 0.0, 2.0))
            B = jax.random.normal(next(ks), (b, g, n), dtype)
            C = jax.random.normal(next(ks), (b, g, n), dtype)
            D = jax.random.normal(next(ks), (h,), F32)
            dt_bias = jax.random.uniform(next(ks), (h,), F32, -4.0, -1.0)
            y0 = jnp.zeros((b, h, p), dtype)

            @functools.partial(jax.jit, donate_argnums=(0,))
            def run(state, y):
                def body(_, carry):
                    s, _ = carry
                    y, s = mamba2.state_update(
                        s, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True, impl=impl
                    )
                    return s, y

                return jax.lax.fori_loop(0, steps, body, (state, y))

            carry = [state, y0]

            def step():
                # The state is donated and replaced by the new one: each call continues the decode.
                carry[:] = run(*carry)
                return carry

            return step

        shape = f"b{b} h{h} p{p} g{g} n{n} x{steps} steps"
        nbytes = 2 * b * h * p * n * 4 + 3 * b * h * p * es + 2 * b * g * n * es + b * h * es
        cases.append(
            Case("state_update", shape, 5 * b * h * p * n, nbytes, build_decode, calls_per_step=steps)
        )
    return cases


def moe_cases(a) -> list[Case]:
    from pallas_kernels import moe

    T, d, f, E, k = a.tokens, a.d_model, a.expert_dim, a.num_experts, a.top_k
    dtype = jnp.dtype(a.dtype)
    es = dtype.itemsize
    M = T * k

    @jax.jit
    def routing():
        ks = _keys(2)
        # top-k of random scores: k distinct experts per token, roughly balanced loads.
        ids = jnp.argsort(jax.random.uniform(next(ks), (T, E)), axis=-1)[:, :k].astype(jnp.int32)
        order, group_sizes = moe.sort_by_expert(ids, E)
        weights = jax.nn.softmax(jax.random.normal(next(ks), (T, k), F32), axis=-1)
        return order, group_sizes, weights

    def rows(shape, key):
        return jax.random.normal(jax.random.key(key), shape, dtype)

    def build_permute(impl):
        order, _, _ = routing()
        x = rows((T, d), 1)
        fn = jax.jit(functools.partial(moe.permute, top_k=k, impl=impl))
        return lambda: fn(x, order)

    def build_gmm(kdim, ndim, impl):
        _, group_sizes, _ = routing()
        lhs = rows((M, kdim), 2)
        rhs = rows((E, kdim, ndim), 3) * (kdim**-0.5)
        fn = jax.jit(functools.partial(moe.grouped_matmul, impl=impl))
        return lambda: fn(lhs, rhs, group_sizes)

    def build_unpermute(impl):
        order, _, weights = routing()
        y = rows((M, d), 4)
        fn = jax.jit(functools.partial(moe.unpermute, impl=impl))
        return lambda: fn(y, order, weights)

    base = f"T{T} k{k} E{E}"
    cases = []
    if "moe_permute" in a.ops:
        cases.append(Case("moe_permute", f"{base} d{d}", 0, T * d * es + M * d * es + 4 * M, build_permute))
    for op, kdim, ndim in (("moe_gmm_up", d, f), ("moe_gmm_down", f, d)):
        if op in a.ops:
            cases.append(
                Case(
                    op,
                    f"{base} {kdim}->{ndim}",
                    2 * M * kdim * ndim,
                    (M * kdim + E * kdim * ndim + M * ndim) * es,
                    functools.partial(build_gmm, kdim, ndim),
                )
            )
    if "moe_unpermute" in a.ops:
        cases.append(
            Case("moe_unpermute", f"{base} d{d}", 2 * M * d, M * d * es + T * d * es + 8 * M, build_unpermute)
        )
    return cases


# ------------------------------------------------------------------------------------------ timing
@jax.jit
def _rel_diff(out, ref):
    """max |out - ref| / max |ref| over all leaves (fp32)."""
    num = [
        jnp.max(jnp.abs(o.astype(F32) - r.astype(F32)))
        for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
    ]
    den = [jnp.max(jnp.abs(r.astype(F32))) for r in jax.tree.leaves(ref)]
    return jnp.max(jnp.stack(num)) / jnp.maximum(jnp.max(jnp.stack(den)), 1e-30)


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:160]


def time_case(case: Case, impls, a, peak, hbm) -> list[Row]:
    out_rows, ref = [], None
    for impl in impls:
        row = Row(case.op, case.shape, impl)
        out_rows.append(row)
        step = None
        try:
            step = case.build(impl)
            t0 = time.perf_counter()
            out = jax.block_until_ready(step())
            row.first_s = time.perf_counter() - t0
            # Snapshot the first output (state_update's carry is replaced by the next call).
            out = jax.tree.map(jnp.copy, out)
            if ref is None and impl == "xla":
                ref = out
            elif ref is not None:
                row.vs_xla = float(_rel_diff(out, ref))
            del out
            for _ in range(a.warmup):
                jax.block_until_ready(step())
            per_call = []
            for _ in range(a.windows):
                t0 = time.perf_counter()
                res = None
                for _ in range(a.steps):
                    res = step()
                jax.block_until_ready(res)
                per_call.append((time.perf_counter() - t0) / (a.steps * case.calls_per_step))
            row.median_s, row.min_s, row.max_s = statistics.median(per_call), min(per_call), max(per_call)
            row.bytes_per_s = case.bytes / row.median_s
            row.flops_per_s = case.flops / row.median_s
            row.hbm_frac = row.bytes_per_s / hbm if hbm else None
            row.peak_frac = row.flops_per_s / peak if peak and case.flops else None
        except Exception as e:  # noqa: BLE001 - one failing op/impl must not stop the others
            row.error = _short(e)
            if a.verbose:
                traceback.print_exc()
        finally:
            del step
    return out_rows


# ------------------------------------------------------------------------------------------ output
def _fmt(v, scale=1.0, digits=3, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v * scale:.{digits}g}"


def format_table(rows: list[Row]) -> str:
    head = [
        "op",
        "shape",
        "impl",
        "median ms",
        "min-max ms",
        "first s",
        "GB/s",
        "% HBM",
        "TFLOP/s",
        "% bf16 peak",
        "vs xla",
        "error",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        span = "-" if r.min_s is None else f"{r.min_s * 1e3:.3g}-{r.max_s * 1e3:.3g}"
        cells = [
            r.op,
            r.shape,
            r.impl,
            _fmt(r.median_s, 1e3),
            span,
            _fmt(r.first_s, 1, 3),
            _fmt(r.bytes_per_s, 1e-9),
            _fmt(r.hbm_frac, pct=True),
            _fmt(r.flops_per_s or None, 1e-12),
            _fmt(r.peak_frac, pct=True),
            "-" if r.vs_xla is None else f"{r.vs_xla:.1e}",
            r.error or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _append(path: str | None, obj: dict):
    """One JSON line appended to `path` (nothing when None), flushed at once."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(obj) + "\n")


def parse_args(argv):
    from configs import turbos

    m = turbos.get_config().model
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(v) for v in s.split(",") if v]
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (tests, CPU)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    ap.add_argument("--impls", default="xla,pallas", help="comma-separated: xla, pallas")
    ap.add_argument("--dtype", default=m.dtype, help="activation dtype (the config's)")
    ap.add_argument("--seq_lens", type=ints, default=[4096, 8192, 16384, 32768])
    ap.add_argument("--batch", type=int, default=1, help="chunk_scan batch")
    ap.add_argument("--decode_batch", type=int, default=8, help="state_update batch")
    ap.add_argument("--decode_steps", type=int, default=16, help="decode steps per timed call")
    ap.add_argument("--tokens", type=int, default=8192, help="MoE tokens T")
    for key in (
        "mamba_heads",
        "mamba_head_dim",
        "mamba_groups",
        "mamba_d_state",
        "mamba_chunk",
        "d_model",
        "expert_dim",
        "num_experts",
        "top_k",
    ):
        ap.add_argument(f"--{key}", type=int, default=m[key], help="default: configs/turbos.py")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls after the first")
    ap.add_argument("--steps", type=int, default=10, help="calls per timing window")
    ap.add_argument("--windows", type=int, default=5, help="timing windows; the median is reported")
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument(
        "--out",
        default=None,
        help="append to this file a JSON line describing the run, then one per row as it finishes "
        "(rows done before a crash or a timeout are kept; benchmarks/gpu_check.sh reads it)",
    )
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
    a = ap.parse_args(argv)
    if a.smoke:  # smoke sizes replace the defaults, not flags given explicitly
        given = {arg.split("=")[0].lstrip("-") for arg in argv if arg.startswith("--")}
        for key, v in SMOKE.items():
            if key not in given:
                setattr(a, key, v)
    a.ops = [o for o in a.ops.split(",") if o]
    a.impls = [i for i in a.impls.split(",") if i]
    unknown = set(a.ops) - set(OPS)
    if unknown:
        ap.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*donated buffers.*")
    dev = jax.devices()[0]
    kind, peak, hbm = device_roofline(dev)
    print(
        f"device: {kind} ({dev.platform}); bf16 peak {_fmt(peak, 1e-12)} TFLOP/s, HBM "
        f"{_fmt(hbm, 1e-9)} GB/s; jax {jax.__version__}; dtype {a.dtype}",
        flush=True,
    )
    if dev.platform == "cpu" and "pallas" in a.impls:
        print(
            "note: on CPU impl=pallas runs the kernels in Pallas interpret mode; its timings are "
            "meaningless (only that it runs and matches xla is).",
            flush=True,
        )
    _append(
        a.out,
        {
            "run": {
                "device": kind,
                "platform": dev.platform,
                "peak_flops": peak,
                "hbm_bytes_per_s": hbm,
                "jax": jax.__version__,
                "dtype": a.dtype,
                "argv": sys.argv[1:] if argv is None else list(argv),
            }
        },
    )
    rows = []
    for case in mamba_cases(a) + moe_cases(a):
        print(f"running {case.op} [{case.shape}] ...", file=sys.stderr, flush=True)
        new = time_case(case, a.impls, a, peak, hbm)
        rows += new
        for r in new:
            line = dataclasses.asdict(r) | {"device": kind}
            _append(a.out, line)
            if a.json:
                print(json.dumps(line), flush=True)
    if not a.json:
        print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
