"""Steady-state training throughput on CPU: turbos-jax vs. a PyTorch model of the same family.

    pip install -e ".[bench]"      # torch + transformers, for the PyTorch side
    python benchmarks/train_step_throughput.py --config=configs/tiny.py
    python benchmarks/train_step_throughput.py --config=configs/tiny.py --json
    python benchmarks/train_step_throughput.py --config=configs/small.py --batch_size=2 \
        --torch_experts=eager,grouped_mm

What is timed, per implementation (same random-token batch every step, one document per row, no
packing; turbos-jax computes in config.model.dtype -- fp32 for tiny -- and PyTorch in fp32):

  turbos-jax  the trainer's own step (`turbos_jax.step.build_train_program`, as `python -m
              turbos_jax.train` runs it: its loss with the MoE aux losses, global-norm clipping
              (1.0), AdamW (b1 0.9, b2 0.95, wd 0.1, decay mask), the non-finite guard, the state's
              shardings, state donated), with `config.optim` set to those values and a constant LR
              (`bench_config`). Compile time is the `lower().compile()` time.
  pytorch     HF transformers' NemotronHForCausalLM (Mamba2 + attention + MoE, selected per layer),
              built with the shapes of `config.model` (see `nemotron_h_config`), random init,
              `torch.set_num_threads(--torch_threads)`: forward, cross-entropy, backward,
              `clip_grad_norm_(1.0)`, `torch.optim.AdamW` (same hyper-parameters). Without the
              CUDA mamba_ssm / causal_conv1d kernels HF runs its pure-torch Mamba2 path.
              Warm-up is the time of the first `--warmup` steps.

Each implementation runs `--warmup` untimed steps, then `--windows` windows of `--steps` steps; a
window's time is taken after `jax.block_until_ready` (torch on CPU is synchronous) and the reported
step time is the median over windows (min and max are printed too). tokens/s = batch * seq_len /
step. Every implementation runs in its own subprocess (JAX's and torch's thread pools in one process
slow each other down several-fold). "other procs' cores" is the CPU time other processes used during
the timed windows divided by wall time: PyTorch's OpenMP threads degrade badly (up to 20x) when
another process takes a core, so only rows with a value near 0 are comparable.

Both workers start through `cli.run`, as `python -m turbos_jax.train` does, so on a CPU backend both
run under the same host allocator setting (turbos_jax/host_memory.py), applied before JAX or torch
start threads: --host_malloc=keep (default, what the trainer gets on CPU) or =system (glibc's
defaults), passed to them as TURBOS_JAX_HOST_MALLOC.

Shapes of the PyTorch model (layer symbol A -> "full_attention" "*", M -> "linear_attention" "M",
F -> "moe" "E"): everything is copied from the config except where NemotronH differs by design:
  * experts (routed and shared) are non-gated `down(relu2(up x))` MLPs, ours SwiGLU
    `down(silu(gate x) * up x)`. --torch_expert_width=matched (default) gives them intermediate
    size 3/2 * expert_dim, which matches our parameter count and FLOPs per expert exactly;
    =same uses expert_dim (2/3 of our expert weights and FLOPs); =both runs both.
  * NemotronH attention has no RoPE and no QK-norm (ours: 2 * head_dim norm scales per layer).
  * NemotronH's router is sigmoid + top-k (renormalised), ours softmax + top-k (renormalised); HF's
    forward computes no load-balancing / z-loss, ours adds both to the loss.
  * our MoE runs in capacity mode (capacity_factor 1.5 -> expert buffers 1.5x the routed tokens,
    padded slots are computed) when capacity_factor > 0; HF computes exactly the routed tokens.

turbos-jax runs twice by default (--jax_rerun): first with the step compiled in the worker
process, as on a first `python -m turbos_jax.train` run, which writes it to a fresh persistent
compilation cache; then in a new process that loads the step from that cache, as every rerun of the
trainer does (config.compilation_cache_dir, on by default). On XLA:CPU the second is faster: the
in-process compile leaves the host heap fragmented (turbos_jax/compile_cache.py). The ratio column
gives turbos-jax / PyTorch for both rows.

--breakdown adds a turbos-jax profile: forward, forward+backward and the full step, then
forward+backward of one layer of each kind (A, M, F) and of the LM head + cross-entropy at the
benchmark's (batch, seq_len, d_model), and XLA's cost analysis of the step.

torch / transformers are optional: without them only turbos-jax is measured (with a note).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # config files import `configs.turbos`

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from throughput_report import breakdown_text, machine, table  # noqa: E402  (this folder: sys.path[0])

# cli.run applies the host allocator setting (turbos_jax/host_memory.py) in every process of the
# benchmark on a CPU backend, before JAX or torch start threads; --host_malloc picks it for the workers.
from turbos_jax import cli, host_memory  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config (model keys, batch, seq); default configs/tiny.py.", lock_config=True
)
_BATCH = flags.DEFINE_integer("batch_size", None, "Sequences per step (default: from the config).")
_SEQ = flags.DEFINE_integer("seq_len", None, "Tokens per sequence (default: config.seq_len).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps before the timing windows.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timing window.")
_WINDOWS = flags.DEFINE_integer("windows", 5, "Timing windows; the median window is reported.")
_IMPLS = flags.DEFINE_list("impls", ["jax", "torch"], "Implementations to run: jax, torch.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 2, "torch.set_num_threads.")
_TORCH_WIDTH = flags.DEFINE_enum(
    "torch_expert_width",
    "matched",
    ["matched", "same", "both"],
    "NemotronH expert intermediate size: matched = 3/2 * expert_dim (same params and FLOPs as our "
    "SwiGLU experts), same = expert_dim, both = run both.",
)
_TORCH_EXPERTS = flags.DEFINE_list(
    "torch_experts",
    ["default"],
    "HF experts_implementation(s) to run, one row each: default "
    "(HF's choice for this machine), eager, grouped_mm, batched_mm.",
)
_LR = flags.DEFINE_float("learning_rate", 3e-4, "Constant learning rate (both implementations).")
_SEED = flags.DEFINE_integer("seed", 0, "Init and data seed.")
_JAX_RERUN = flags.DEFINE_bool(
    "jax_rerun",
    True,
    "Also time turbos-jax with its step loaded from the persistent compilation "
    "cache the first run wrote (what a rerun of turbos_jax.train gets).",
)
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Also profile where turbos-jax's step goes.")
_HOST_MALLOC = flags.DEFINE_enum(
    "host_malloc",
    "keep",
    ["keep", "system"],
    "Host allocator for both workers: keep = turbos_jax's default (freed memory stays in the "
    "process, see turbos_jax/host_memory.py), system = glibc's defaults.",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
_WORKER = flags.DEFINE_string(
    "worker",
    "",
    "Internal: run one implementation in this process "
    "(jax:compiled, jax:cached, or torch:<width mode>:<experts>) and "
    "print its result.",
)
RESULT_TAG = "@@result "

# Optimizer hyper-parameters shared by both implementations (the training setup).
B1, B2, EPS, WEIGHT_DECAY, CLIP = 0.9, 0.95, 1e-8, 0.1, 1.0
NEMOTRON_LAYER = {"A": "full_attention", "M": "linear_attention", "F": "moe"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def time_windows(step, warmup: int, steps: int, windows: int):
    """Runs `step()` warmup times, then `windows` x `steps` times. `step` must block until its work
    is done. Returns (warm-up seconds, per-step seconds of each window, per-window CPU cores used
    by OTHER processes = (machine busy CPU time - this process's CPU time) / wall time, a direct
    measure of contention from the rest of the machine)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warm = time.perf_counter() - t0
    per_step, others = [], []
    for _ in range(windows):
        busy0, own0, t0 = _busy_cpu_seconds(), time.process_time(), time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
        busy1, own1 = _busy_cpu_seconds(), time.process_time()
        per_step.append(wall / steps)
        if busy0 is not None and busy1 is not None:
            others.append(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall)
    return warm, per_step, others


def summarize_times(per_step, others, tokens: int) -> dict:
    med = statistics.median(per_step)
    return {
        "other_processes_cores": statistics.median(others) if others else None,
        "other_processes_cores_windows": others,
        "step_ms": 1e3 * med,
        "step_ms_min": 1e3 * min(per_step),
        "step_ms_max": 1e3 * max(per_step),
        "tokens_per_s": tokens / med,
        "windows_ms": [1e3 * t for t in per_step],
    }


# ================================================================================== turbos-jax
def bench_config(config, batch: int, seq: int):
    """`config` with the benchmark's batch shape, seed and the optimizer both sides run: constant
    LR, AdamW (B1, B2, EPS, WEIGHT_DECAY) after global-norm clipping (CLIP)."""
    config = config.copy_and_resolve_references()
    config.batch_size, config.seq_len, config.seed = batch, seq, _SEED.value
    config.optim.schedule = (("constant", 1, _LR.value),)
    config.optim.b1, config.optim.b2, config.optim.eps = B1, B2, EPS
    config.optim.weight_decay, config.optim.grad_clip = WEIGHT_DECAY, CLIP
    return config


def run_jax(config, batch: int, seq: int, variant: str) -> dict:
    import jax

    from turbos_jax import accounting, sharding
    from turbos_jax.config import ModelConfig
    from turbos_jax.step import build_train_program, synthetic_batch

    config = bench_config(config, batch, seq)
    cfg = ModelConfig.from_config(config.model)
    mesh = sharding.train_mesh(config, cfg)
    program = build_train_program(config, cfg, mesh)  # the trainer's step, shardings and donation
    data = synthetic_batch(config, cfg.vocab_size, program.batch_sharding, seed=_SEED.value)
    with jax.set_mesh(mesh):
        train_state = jax.jit(program.setup.init_state, out_shardings=program.state_shardings)()

    cache_events = {"hits": 0, "misses": 0}

    def count_cache_event(event: str, **_):
        for kind in cache_events:
            if event == f"/jax/compilation_cache/cache_{kind}":
                cache_events[kind] += 1

    jax.monitoring.register_event_listener(count_cache_event)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = program.train_step.lower(train_state, data).compile()
    compile_s = time.perf_counter() - t0
    jax.monitoring.unregister_event_listener(count_cache_event)

    state = {"s": train_state}

    def step():
        state["s"], metrics = compiled(state["s"], data)
        jax.block_until_ready((state["s"], metrics))
        state["loss"] = metrics["loss"]

    warm, per_step, others = time_windows(step, _WARMUP.value, _STEPS.value, _WINDOWS.value)
    counts = accounting.count_params(cfg)
    moe = f"capacity {cfg.capacity_factor:g}" if cfg.capacity_factor else "dropless"
    flops = accounting.training_flops_per_token(cfg, seq, counts)["total"]
    out = {
        "implementation": "turbos-jax" + ("" if variant == "compiled" else ", step from cache"),
        "jax_variant": variant,
        "detail": f"jax {jax.__version__}, {jax.devices()[0].platform}, jit + donate, MoE {moe}, "
        + (
            "compiled in this process"
            if variant == "compiled"
            else "loaded from the persistent compilation cache"
        ),
        "params_total": counts.total,
        "params_active": counts.active,
        "compile_s": compile_s,
        "step_compile_cache": cache_events,  # persistent-cache hits / misses of the step's compile
        "warmup_s": warm,
        "final_loss": float(state["loss"]),
        "model_flops_per_token": flops,
        **summarize_times(per_step, others, batch * seq),
    }
    out["model_gflops_per_s"] = flops * out["tokens_per_s"] / 1e9
    if _BREAKDOWN.value and variant == "compiled":
        out["breakdown"] = jax_breakdown(cfg, program.setup.graphdef, state["s"]["params"], data, compiled)
    return out


def jax_breakdown(cfg, graphdef, params, data, compiled_step) -> dict:
    """Where a turbos-jax step goes: forward / backward / optimizer, then per layer kind."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from turbos_jax import step
    from turbos_jax.model import Block

    b, l = data["inputs"].shape
    targets = data["targets"]
    reps, nsteps = 3, _STEPS.value

    def bench(fn, *args):
        jax.block_until_ready(fn(*args))  # compile + one run
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(nsteps):
                jax.block_until_ready(fn(*args))
            times.append((time.perf_counter() - t0) / nsteps)
        return 1e3 * statistics.median(times)

    def loss_fn(p, batch):  # the trainer's loss
        return step.loss_fn(p, graphdef, batch)[0]

    res = {
        "forward_ms": bench(jax.jit(loss_fn), params, data),
        "forward_backward_ms": bench(jax.jit(jax.grad(loss_fn)), params, data),
    }

    # One layer of each kind, forward + backward w.r.t. its parameters and input.
    key = jax.random.PRNGKey(1)
    x = jax.random.normal(key, (b, l, cfg.d_model), cfg.dtype)
    seg = jnp.ones((b, l), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    layers = {}
    for sym in sorted(set(cfg.layout)):
        gd, st = nnx.split(Block(sym, cfg, rngs=nnx.Rngs(0)))

        def block_loss(st, x, gd=gd):
            y, aux = nnx.merge(gd, st)(x, seg, pos)
            return jnp.sum(y.astype(jnp.float32) ** 2) + sum(jnp.sum(v) for v in aux.values())

        layers[sym] = {
            "count": cfg.layout.count(sym),
            "forward_ms": bench(jax.jit(block_loss), st, x),
            "forward_backward_ms": bench(jax.jit(jax.grad(block_loss, argnums=(0, 1))), st, x),
        }

    def head_loss(p, x):
        m = nnx.merge(graphdef, p)
        logits = m.lm_head(m.final_norm(x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    emb_head = bench(jax.jit(jax.grad(head_loss, argnums=(0, 1))), params, x)
    res["layers"] = layers
    res["lm_head_ce_forward_backward_ms"] = emb_head
    res["sum_of_layers_forward_backward_ms"] = (
        sum(v["count"] * v["forward_backward_ms"] for v in layers.values()) + emb_head
    )
    cost = compiled_step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost:
        res["xla_cost_analysis"] = {
            k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals") if k in cost
        }
    return res


# ================================================================================== PyTorch
def nemotron_h_config(model_cfg, seq: int, expert_width: int):
    """A NemotronHConfig with the shapes of our `config.model` (see the module docstring)."""
    from transformers import NemotronHConfig

    m = model_cfg
    d_inner = m.mamba_heads * m.mamba_head_dim
    if m.num_shared_experts == 0:
        raise ValueError("NemotronH always has a shared expert; num_shared_experts=0 has no match")
    return NemotronHConfig(
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        layers_block_type=[NEMOTRON_LAYER[s] for s in m.layout],
        tie_word_embeddings=False,
        use_cache=False,
        num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads,
        head_dim=m.head_dim,
        max_position_embeddings=max(seq, 4096),
        mamba_num_heads=m.mamba_heads,
        mamba_head_dim=m.mamba_head_dim,
        n_groups=m.mamba_groups,
        ssm_state_size=m.mamba_d_state,
        chunk_size=m.mamba_chunk,
        conv_kernel=m.mamba_conv,
        expand=max(1, d_inner // m.d_model),  # unused by the model: d_inner = heads * head_dim
        time_step_limit=tuple(m.mamba_dt_limit),
        n_routed_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        n_shared_experts=m.num_shared_experts,
        moe_intermediate_size=expert_width,
        moe_shared_expert_intermediate_size=m.num_shared_experts * expert_width,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        layer_norm_epsilon=m.norm_eps,
        initializer_range=m.init_std,
    )


def run_torch(config, batch: int, seq: int, width_mode: str, experts: str) -> dict:
    import numpy as np
    import torch
    import transformers
    from transformers import NemotronHForCausalLM

    from turbos_jax.config import ModelConfig

    cfg = ModelConfig.from_config(config.model)
    if np.dtype(cfg.dtype) != np.float32:
        log(f"note: config.model.dtype={cfg.dtype}; the PyTorch model always runs in fp32")
    torch.set_num_threads(_TORCH_THREADS.value)
    torch.manual_seed(_SEED.value)
    width = cfg.expert_dim * 3 // 2 if width_mode == "matched" else cfg.expert_dim
    hf_cfg = nemotron_h_config(cfg, seq, width)
    kwargs = {} if experts == "default" else {"experts_implementation": experts}
    model = NemotronHForCausalLM._from_config(hf_cfg, dtype=torch.float32, **kwargs)
    model.train()
    used = model.config._experts_implementation
    opt = torch.optim.AdamW(
        model.parameters(), lr=_LR.value, betas=(B1, B2), eps=EPS, weight_decay=WEIGHT_DECAY
    )
    gen = torch.Generator().manual_seed(_SEED.value)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    state = {}

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        state["loss"] = loss.detach()

    warm, per_step, others = time_windows(step, _WARMUP.value, _STEPS.value, _WINDOWS.value)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    mamba_kernels = importlib.util.find_spec("mamba_ssm") is not None
    default = " = HF default" if experts == "default" else ""
    return {
        "implementation": f"PyTorch NemotronH (experts {used}{default}, width {width})",
        "detail": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{_TORCH_THREADS.value} threads, attn {model.config._attn_implementation}, "
        f"experts {model.config._experts_implementation}, "
        f"mamba {'mamba_ssm kernels' if mamba_kernels else 'pure-torch fallback'}",
        "expert_width": width,
        "params_total": total,
        "params_active": total - routed + routed * cfg.top_k // cfg.num_experts,
        "compile_s": None,
        "warmup_s": warm,
        "final_loss": float(state["loss"]),
        **summarize_times(per_step, others, batch * seq),
    }


# ================================================================================== workers
def torch_jobs() -> tuple[list[str], list[str]]:
    """Worker names for the PyTorch runs, plus notes when they cannot run."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return [], [
            f"PyTorch baseline skipped: {', '.join(missing)} not installed "
            "(pip install torch transformers); only turbos-jax was measured"
        ]
    import transformers

    if not hasattr(transformers, "NemotronHForCausalLM"):
        return [], [
            f"PyTorch baseline skipped: transformers {transformers.__version__} has no "
            "NemotronH (needs transformers >= 4.55)"
        ]
    modes = ["matched", "same"] if _TORCH_WIDTH.value == "both" else [_TORCH_WIDTH.value]
    return [f"torch:{m}:{e}" for m in modes for e in _TORCH_EXPERTS.value], []


def run_worker(job: str, config, batch: int, seq: int) -> dict:
    before = os.getloadavg()[0]
    if job.startswith("jax:"):
        out = run_jax(config, batch, seq, job.split(":")[1])
    else:
        _, mode, experts = job.split(":")
        out = run_torch(config, batch, seq, mode, experts)
    out["load_average_1min"] = [before, os.getloadavg()[0]]  # at the start and end of the run
    out["host_malloc"] = "keep" if host_memory.in_effect() else "system"
    return out


def spawn(job: str, cache_dir: str) -> dict:
    """Runs one implementation in a fresh interpreter (JAX's and torch's thread pools in one
    process slow each other down) and returns its result dict. turbos-jax workers share
    `cache_dir` as their persistent compilation cache (empty for the first)."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f"--worker={job}"]
    env = {
        **os.environ,
        host_memory.ENV_VAR: _HOST_MALLOC.value,
        "JAX_COMPILATION_CACHE_DIR": cache_dir,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"worker {job!r} failed with exit code {proc.returncode}")


def _config_name() -> str:
    if _CONFIG.value is None:
        return "configs/tiny.py"
    return os.path.relpath(config_flags.get_config_filename(flags.FLAGS["config"]), REPO)


def main(argv):
    del argv
    config = cli.config_or_tiny(_CONFIG.value)
    if not _WORKER.value:  # config mistakes: one line here, not a failed worker
        from turbos_jax.config import ModelConfig

        ModelConfig.from_config(config.model)
    batch = _BATCH.value or config.batch_size
    seq = _SEQ.value or config.seq_len
    if _WORKER.value:
        print(RESULT_TAG + json.dumps(run_worker(_WORKER.value, config, batch, seq)), flush=True)
        return

    jobs, notes = [], []
    if "jax" in _IMPLS.value:
        jobs = ["jax:compiled"] + (["jax:cached"] if _JAX_RERUN.value else [])
    if "torch" in _IMPLS.value:
        more, notes = torch_jobs()
        jobs += more
    results, cache_dir = [], tempfile.mkdtemp(prefix="turbos_bench_xla_cache_")
    try:
        for job in jobs:
            log(f"--- {job}: batch {batch} x seq {seq} (load average {os.getloadavg()[0]:.2f})")
            results.append(spawn(job, cache_dir))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    jax_rows = {r["jax_variant"]: r for r in results if "jax_variant" in r}
    jax_row = jax_rows.get("compiled")
    for r in results:
        if "jax_variant" not in r:
            for variant, j in jax_rows.items():
                key = "turbos_jax_speedup" + ("" if variant == "compiled" else f"_{variant}")
                r[key] = j["tokens_per_s"] / r["tokens_per_s"]
    report = {
        "config": _config_name(),
        "command": " ".join(["python", os.path.relpath(__file__, REPO), *sys.argv[1:]]),
        "batch_size": batch,
        "seq_len": seq,
        "tokens_per_step": batch * seq,
        "warmup": _WARMUP.value,
        "steps_per_window": _STEPS.value,
        "windows": _WINDOWS.value,
        "machine": machine(),
        "results": results,
        "notes": notes,
    }
    if _JSON.value:
        print(json.dumps(report, indent=2))
        return
    m = report["machine"]
    print(
        f"{m['cpu']}, {m['cores']} cores; load average {m['load_average'][0]:.2f} "
        f"{m['load_average'][1]:.2f} {m['load_average'][2]:.2f} (1, 5, 15 min) at the end"
    )
    print(
        f"{report['config']}: batch {batch} x seq_len {seq} = {batch * seq} tokens/step; median "
        f"of {_WINDOWS.value} windows x {_STEPS.value} steps after {_WARMUP.value} warm-up steps"
    )
    print(table(results))
    print(
        "other procs' cores: CPU cores used by other processes during the timed windows "
        "(median); > 0.1 means the numbers are contended"
    )
    for r in results:
        lo, hi = r["load_average_1min"]
        print(
            f"  {r['implementation']}: {r['detail']}; host malloc {r['host_malloc']}; "
            f"final loss {r['final_loss']:.3f}; step ms min {r['step_ms_min']:.1f} "
            f"max {r['step_ms_max']:.1f}; 1-min load average "
            f"{lo:.2f} -> {hi:.2f} (includes this benchmark)"
        )
    for note in notes:
        print(f"note: {note}")
    if jax_row is not None and "breakdown" in jax_row:
        print(breakdown_text(jax_row["breakdown"]))


if __name__ == "__main__":
    cli.run(main)
