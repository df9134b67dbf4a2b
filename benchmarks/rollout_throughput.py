"""RL rollout throughput: turbos-jax's batched sampling vs HF transformers' PyTorch `generate`.

    python benchmarks/rollout_throughput.py                       # small config, batch 64, 64 + 256
    python benchmarks/rollout_throughput.py --config=configs/tiny.py --repeats=5 --json

What is timed (both sides: random-init weights of the same shapes, fp32, batch --batch of prompts of
--prompt_len random tokens, exactly --new_tokens sampled tokens each at temperature 1.0, no top-k /
top-p, no stop token, so every row generates the full length):

  turbos-jax  `posttrain.rollouts.sample_groups`, the GRPO rollout path: --batch / --group prompts
              repeated --group times, prefill + cached decode in one jitted program (fp32 Mamba2
              state, dropless MoE), sampled tokens' log-probs returned too. Compile time is the
              first call; then the median of --repeats calls.
  pytorch     `NemotronHForCausalLM.generate` (Mamba2 + attention + MoE per layer, the shapes of
              config.model as in benchmarks/train_step_throughput.py's `nemotron_h_config`, experts
              of matched width), `do_sample=True, temperature=1.0, top_k=0`, KV / SSM cache on,
              `torch.set_num_threads(--torch_threads)`, under `torch.inference_mode()`; one
              warm-up call of --torch_warmup_tokens new tokens, then the median of --repeats
              calls.

tokens/s = batch * new_tokens / median seconds (generated tokens only). Each side runs in its own
subprocess (the two thread pools slow each other down). The last line reads
`turbos-jax / PyTorch: N.NNx`. Measurements on a shared machine move with its load: the load
average at the start and end of each worker is printed next to its row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
RESULT_TAG = "@@result "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        default="configs/small.py",
        help="config file whose model is measured (small: 77M parameters; tiny, 1.5M, measures "
        "per-op overhead more than the model)",
    )
    p.add_argument("--batch", type=int, default=64, help="sequences sampled at once")
    p.add_argument("--group", type=int, default=8, help="responses per prompt (turbos-jax groups)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed calls; the median is reported")
    p.add_argument("--impls", default="jax,torch", help="comma-separated: jax, torch")
    p.add_argument("--torch_threads", type=int, default=2)
    p.add_argument(
        "--torch_warmup_tokens",
        type=int,
        default=8,
        help="new tokens of PyTorch's untimed warm-up call (the same prefill and cached decode code "
        "as a full call; nothing is compiled, so a short one is enough)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--worker", default="", help="internal: run one implementation and print its result")
    args = p.parse_args(argv)
    if args.batch % args.group:
        p.error(f"--batch={args.batch} must be a multiple of --group={args.group}")
    return args


def load_model_config(path: str):
    import importlib.util

    from turbos_jax.config import ModelConfig

    spec = importlib.util.spec_from_file_location("bench_config", os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return ModelConfig.from_config(module.get_config().model)


def run_jax(args) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from turbos_jax.model import init_model
    from turbos_jax.posttrain.rollouts import sample_groups

    cfg = dataclasses.replace(load_model_config(args.config), dtype=jnp.float32, capacity_factor=0.0)
    graphdef, params = init_model(cfg, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    n_prompts = args.batch // args.group
    prompts = rng.integers(0, cfg.vocab_size, (n_prompts, args.prompt_len)).astype(np.int32)
    lengths = np.full(n_prompts, args.prompt_len, np.int32)

    def call(i):
        ro = sample_groups(
            graphdef,
            params,
            prompts,
            lengths,
            group_size=args.group,
            max_new_tokens=args.new_tokens,
            rng=jax.random.key(i),
            eos_id=None,
        )
        assert (ro.lengths == args.new_tokens).all()

    start = time.perf_counter()
    call(0)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        call(i + 1)
        times.append(time.perf_counter() - start)
    return {
        "implementation": "turbos-jax sample_groups",
        "detail": f"jax {jax.__version__}",
        "first_call_s": compile_s,
        "times": times,
    }


def run_torch(args) -> dict:
    import torch
    import transformers
    from train_step_throughput import nemotron_h_config  # noqa: E402 (benchmarks/ on sys.path)
    from transformers import NemotronHForCausalLM

    cfg = load_model_config(args.config)
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(args.seed)
    hf_cfg = nemotron_h_config(cfg, args.prompt_len + args.new_tokens, cfg.expert_dim * 3 // 2)
    hf_cfg.use_cache = True
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the GPU when there is one, as for jax
    model = NemotronHForCausalLM._from_config(hf_cfg, dtype=torch.float32).eval().to(device)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=gen).to(device)
    kwargs = dict(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        pad_token_id=0,
        eos_token_id=None,
        use_cache=True,
    )

    def call(new_tokens):
        with torch.inference_mode():
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                **kwargs | {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens},
            )
        assert out.shape == (args.batch, args.prompt_len + new_tokens), out.shape
        if device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    call(min(args.torch_warmup_tokens, args.new_tokens))
    warm = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        call(args.new_tokens)
        times.append(time.perf_counter() - start)
    detail = f"torch {torch.__version__}, transformers {transformers.__version__}, " + (
        torch.cuda.get_device_name() if device == "cuda" else f"{args.torch_threads} threads"
    )
    return {
        "implementation": "PyTorch NemotronH generate",
        "detail": detail,
        "first_call_s": warm,
        "times": times,
    }


def spawn(job: str, argv: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--worker={job}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.dirname(os.path.abspath(__file__))])}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(f"worker {job!r} failed with exit code {proc.returncode}")


def report(args, results: list[dict]) -> str:
    tokens = args.batch * args.new_tokens
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"config {args.config}; batch {args.batch} (groups of {args.group}), prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, T = 1.0",
        "",
        "| implementation | first call (s) | median (s) | min / max (s) | tokens/s | load avg start / end "
        "| detail |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results:
        med = statistics.median(r["times"])
        r["tokens_per_s"] = tokens / med
        load = "/".join(f"{x:.1f}" for x in r["load_average_1min"])
        lines.append(
            f"| {r['implementation']} | {r['first_call_s']:.1f} | {med:.2f} | {min(r['times']):.2f} / "
            f"{max(r['times']):.2f} | {r['tokens_per_s']:,.0f} | {load} | {r['detail']} |"
        )
    by = {r["implementation"].split()[0]: r["tokens_per_s"] for r in results}
    if "turbos-jax" in by and "PyTorch" in by:
        lines += ["", f"turbos-jax / PyTorch: {by['turbos-jax'] / by['PyTorch']:.2f}x"]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        before = os.getloadavg()[0]
        out = run_jax(args) if args.worker == "jax" else run_torch(args)
        out["load_average_1min"] = [before, os.getloadavg()[0]]
        print(RESULT_TAG + json.dumps(out), flush=True)
        return
    results = [spawn(job, argv) for job in args.impls.split(",")]
    if args.json:
        print(json.dumps({"args": vars(args), "results": results}))
    else:
        print(report(args, results))


if __name__ == "__main__":
    main()
